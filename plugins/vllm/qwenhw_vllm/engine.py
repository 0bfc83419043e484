"""vLLM in this process: `LLM(**engine_args)` behind qwenhw's Engine protocol.

Prompts go in as token ids that we encode ourselves (add_special_tokens=False, as the HF engine does), so
`chat()` renders Qwen3's template once, here, exactly as `LLM.chat(..., chat_template_kwargs=
{"enable_thinking": ...})` would, and greedy tokens match plain transformers. Streaming uses the engine's
step API (`llm_engine.add_request` / `step` with DELTA outputs): real token-by-token deltas, no second engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import warnings
from typing import Any, Callable, Iterator

from qwenhw.engine.base import Completion, Engine, Piece, Sampling
from qwenhw.engine.preflight import checkpoint_dir

log = logging.getLogger("qwenhw.vllm")


def supported_fields() -> set[str]:
    """Keyword arguments the installed vLLM's EngineArgs (and so LLM) accepts."""
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def engine_kwargs(plan: Any, model: str, fields: set[str] | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """(kwargs for LLM, dropped unknown names, notes). None values are left to vLLM's defaults."""
    args = {k: v for k, v in dict(plan.config.get("engine_args") or {}).items() if v is not None}
    args["model"] = model
    notes = []
    if args.get("data_parallel_size", 1) > 1:
        # LLM() refuses data_parallel_size > 1 in one process; `vllm serve --data-parallel-size` runs replicas
        notes.append(f"data_parallel_size={args['data_parallel_size']} needs `vllm serve` (see the plan's "
                     f"artifacts); this process runs one replica (TP x PP)")
        args["data_parallel_size"] = 1
    if args.get("cpu_offload_gb") == 0:
        args.pop("cpu_offload_gb")
    fields = supported_fields() if fields is None else fields
    dropped = sorted(k for k in args if k not in fields)
    return {k: v for k, v in args.items() if k in fields}, dropped, notes


class VllmEngine(Engine):
    def __init__(self, plan: Any):
        super().__init__(plan)
        # the plan's environment (KV space on CPU, NCCL settings) unless the user set those variables
        for key, value in (plan.config.get("env") or {}).items():
            os.environ.setdefault(key, str(value))
        path = checkpoint_dir(plan)
        kwargs, dropped, notes = engine_kwargs(plan, path)
        if dropped:
            msg = (f"this vLLM ({_version()}) does not know the engine argument(s) {', '.join(dropped)}; "
                   f"dropped them (the plan was made for another vLLM version)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            notes.append(msg)
        for note in notes:
            log.warning(note)
        self.dropped = dropped
        self.notes = notes
        self.engine_args = kwargs
        self.cluster = self._join_cluster(plan, kwargs)
        from vllm import LLM

        try:
            self.llm = LLM(**kwargs)
        except BaseException:
            if self.cluster is not None:
                self.cluster.close()
            raise
        if self.cluster is not None:
            self.cluster.watch(self._node_lost)
        self.tokenizer = self.llm.get_tokenizer()
        self._ids = itertools.count()
        self._eos = self._eos_ids()

    # --- several nodes ---------------------------------------------------------------------------
    def _join_cluster(self, plan: Any, kwargs: dict[str, Any]) -> Any:
        """A multi-node plan: the Ray cluster checked against it; on vLLM's CPU platform the other nodes'
        ranks started (this process is rank 0); on GPUs vLLM's Ray executor pointed at the cluster."""
        ranked = int(kwargs.get("nnodes") or 1) > 1
        if not ranked and kwargs.get("distributed_executor_backend") != "ray":
            return None
        from .artifacts import artifacts
        from .cluster import Cluster

        cluster = Cluster(plan)
        os.environ["RAY_ADDRESS"] = cluster.address
        if ranked:
            from qwenhw.engine.ranks import free_port

            kwargs["master_port"] = free_port("")
            env = {k: str(v) for k, v in (plan.config.get("env") or {}).items()}
            try:
                cluster.start_ranks(artifacts(plan)["vllm-serve.sh"], {**env, "MASTER_PORT": str(kwargs["master_port"])})
            except BaseException:
                cluster.close()
                raise
        return cluster

    def _node_lost(self, why: str) -> None:
        """The watchdog's call: stop the engine core, and wake a request waiting for its output (vLLM's sync
        client would wait on its output queue for ever once the core is gone), so it fails now."""
        log.error("qwenhw: %s; stopping the engine", why)
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is None:
            return
        resources = getattr(core, "resources", None)
        if resources is not None and hasattr(resources, "engine_dead"):
            resources.engine_dead = True
        try:
            core.shutdown()
        except Exception:
            pass
        waiting = getattr(core, "outputs_queue", None)
        if waiting is not None:
            from .cluster import NodeLost

            waiting.put_nowait(NodeLost(why))

    def _check_cluster(self, exc: BaseException | None = None) -> None:
        if self.cluster is not None and self.cluster.lost:
            from .cluster import NodeLost

            raise NodeLost(f"{self.cluster.lost}: the request cannot finish; load the plan again once the "
                           f"cluster is whole") from exc

    def health(self) -> dict[str, Any]:
        state = super().health()
        if self.cluster is not None:
            state["cluster"] = self.cluster.state()
            if self.cluster.lost:
                state["status"] = "degraded"
        return state

    # --- tokens and templates ------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        """generation_config's eos ids (vLLM already stops on them) plus <|im_end|>."""
        ids = {self.tokenizer.eos_token_id}
        try:
            eos = self.llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos])
        except Exception:  # older vLLM: the tokenizer's ids are enough
            pass
        ids = {i for i in ids if isinstance(i, int) and i >= 0}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        # chat turns end with <|im_end|> even where generation_config forgets it: only then ask for it
        self._extra_stops = [im_end] if isinstance(im_end, int) and im_end >= 0 and im_end not in ids else []
        return ids | set(self._extra_stops)

    def render_chat(self, messages: list[dict], enable_thinking: bool | None) -> str:
        # the same call vLLM's LLM.chat makes with chat_template_kwargs={"enable_thinking": ...}
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode(self, prompt: str) -> dict[str, Any]:
        return {"prompt_token_ids": self.tokenizer.encode(prompt, add_special_tokens=False)}

    def _params(self, sampling: Sampling) -> Any:
        from vllm import SamplingParams

        greedy = sampling.greedy
        # only what differs from vLLM's defaults: per-token work stays exactly that of a direct LLM call
        kw: dict[str, Any] = {"max_tokens": sampling.max_tokens, "temperature": 0.0 if greedy else sampling.temperature}
        if not greedy and sampling.top_p < 1.0:
            kw["top_p"] = sampling.top_p
        if not greedy and sampling.top_k > 0:
            kw["top_k"] = sampling.top_k
        if sampling.stop:
            kw["stop"] = list(sampling.stop)
        if self._extra_stops:
            kw["stop_token_ids"] = self._extra_stops
        if sampling.seed is not None:
            kw["seed"] = sampling.seed
        if sampling.ignore_eos:
            kw["ignore_eos"] = True
        return SamplingParams(**kw)

    def _completion(self, output: Any, prompt_tokens: int) -> Completion:
        out = output.outputs[0]
        ids = list(out.token_ids)
        while ids and ids[-1] in self._eos:  # the end-of-turn token is not part of the answer
            ids.pop()
        finish = "stop" if out.finish_reason == "stop" else "length"
        return Completion(text=out.text, token_ids=tuple(ids), prompt_tokens=prompt_tokens, finish_reason=finish)

    # --- generation -------------------------------------------------------------------------------
    def _complete(self, prompts: list[str], sampling: Sampling) -> list[Completion]:
        self._check_cluster()
        inputs = [self._encode(p) for p in prompts]
        try:
            outputs = self.llm.generate(inputs, self._params(sampling), use_tqdm=False)
        except Exception as exc:
            self._check_cluster(exc)
            raise
        return [self._completion(o, len(i["prompt_token_ids"])) for o, i in zip(outputs, inputs)]

    def _stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        for piece in self._stream_batch([prompt], [sampling], lambda row: True, True):
            if piece.text:
                yield piece.text

    @property
    def max_batch(self) -> int:
        """vLLM schedules the requests it holds together: up to its max_num_seqs."""
        try:
            return max(1, int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs))
        except AttributeError:  # another vLLM layout: what the plan asked for
            return max(1, int(self.engine_args.get("max_num_seqs") or 1))

    def batch_key(self, sampling: Sampling) -> Any:
        return "vllm"  # each request keeps its own sampling parameters and seed inside one vLLM batch

    def _stream_batch(self, prompts: list[str], samplings: list[Sampling], alive: Callable[[int], bool],
                      stream: bool) -> Iterator[Piece]:
        """Every row is a request of vLLM's engine, stepped together; a row whose client left is aborted.
        Token counts leave out the end-of-turn token, as `_completion` does."""
        from vllm.sampling_params import RequestOutputKind

        self._check_cluster()
        engine = self.llm.llm_engine
        rows: dict[str, int] = {}
        for row, (prompt, sampling) in enumerate(zip(prompts, samplings)):
            params = self._params(sampling)
            params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
            rid = f"qwenhw-batch-{next(self._ids)}"
            engine.add_request(rid, self._encode(prompt), params)
            rows[rid] = row
        counts = dict.fromkeys(rows, 0)
        try:
            while rows and engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as exc:
                    self._check_cluster(exc)
                    raise
                for out in outputs:
                    row = rows.get(out.request_id)
                    if row is None:
                        continue
                    if not alive(row):
                        engine.abort_request([out.request_id])
                        del rows[out.request_id]
                        continue
                    done = out.outputs[0] if out.outputs else None
                    ids = list(done.token_ids) if done else []
                    counts[out.request_id] += len(ids)
                    text = done.text if done else ""
                    if out.finished:
                        del rows[out.request_id]
                        n = counts[out.request_id] - (1 if ids and ids[-1] in self._eos else 0)
                        yield Piece(row, text, "stop" if done and done.finish_reason == "stop" else "length", n)
                    elif text:
                        yield Piece(row, text)
        finally:
            if rows:  # the reader stopped early (or an error): free the rest's KV pages
                engine.abort_request(list(rows))

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        cluster, self.cluster = getattr(self, "cluster", None), None
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:  # v1 runs the engine core in a child process: stop it now, not at interpreter exit
                shutdown = getattr(llm.llm_engine, "engine_core", None)
                if shutdown is not None and hasattr(shutdown, "shutdown"):
                    shutdown.shutdown()
            except Exception:
                pass
        del llm
        if cluster is not None:  # the other nodes' ranks and this process's connection to the cluster
            cluster.close()
        import gc

        gc.collect()


def _version() -> str:
    try:
        import vllm

        return f"vllm {vllm.__version__}"
    except Exception:
        return "vllm"
