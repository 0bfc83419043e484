"""The Engine over the runtime: the one-GPU engine, the hybrid and each rank of a parallel job share it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch

from qwenhw.engine.base import Completion, Join, Piece, Sampling
from qwenhw.engine.hf import HFEngine
from qwenhw.engine.text import RowTexts, completion

from .config import NativeConfig
from .limits import ARCHITECTURES, runtime_batches
from .runtime import Runtime, supported
from .sampling import SampleParams


# texts counted (a server checks each prompt's length before it goes in) whose ids the engine keeps for when the
# prompt goes in, so it is encoded once
COUNTED = 256


class RuntimeEngine(HFEngine):
    """Prompts through the runtime: a list of prompts, or a server's concurrent requests, decode continuously on
    `batched` (a finished row takes the next prompt) when the plan is for several concurrent sequences; single
    prompts and streams use `runtime` (batch 1, or the paged `batched` itself)."""

    def __init__(self, model: Any, tokenizer: Any, runtime: Runtime, plan: Any = None,
                 batched: Runtime | None = None):
        super().__init__(model, tokenizer, plan=plan, device=str(runtime.device))
        self.runtime = runtime
        self.batched = batched
        self.hybrid = None
        self.info = {"kernels": runtime.kernels.to_dict(), "fused": runtime.step.fused, "pdl": runtime.step.pdl}
        self._counted: OrderedDict[str, list[int]] = OrderedDict()

    def count_tokens(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        self._counted[text] = ids
        if len(self._counted) > COUNTED:
            self._counted.popitem(last=False)
        return len(ids)

    def _prompt_ids(self, prompts: list[str], runtime: Runtime) -> list[list[int]]:
        """The prompts' token ids: those counted before (`count_tokens`) as they were, the others encoded as one
        batch (the fast tokenizer spreads a batch over the host's cores: 16 prompts of ~3000 tokens in half the
        time on 2 cores)."""
        batch = [self._counted.pop(p, None) for p in prompts]
        todo = [p for p, ids in zip(prompts, batch) if ids is None]
        encoded = iter(self.tokenizer(todo, add_special_tokens=False).input_ids if todo else [])
        batch = [ids if ids is not None else next(encoded) for ids in batch]
        for ids in batch:
            if len(ids) >= runtime.max_len:
                raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {runtime.max_len}-token "
                                 f"context this plan was made for; plan a longer --context")
        return batch

    def _complete(self, prompts: list[str], sampling: Sampling) -> list[Completion]:
        """Each prompt's tokens up to its EOS or max_tokens (capped by the cache): a list of prompts goes
        through the batched runtime, one prompt through the batch-1 runtime."""
        rt = self.batched if self.batched is not None and len(prompts) > 1 else self.runtime
        ids = self._prompt_ids(prompts, rt)
        params = SampleParams(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed)
        generated = rt.generate_batch(ids, sampling.max_tokens, params, self._ends(sampling))
        return [completion(self.tokenizer, tokens, len(prompt_ids), self._ends(sampling), sampling.stop)
                for tokens, prompt_ids in zip(generated, ids)]

    def _stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        for piece in self._decode_rows(self.runtime, [prompt], [sampling], lambda row: True, True):
            if piece.text:
                yield piece.text

    def kv_cache(self) -> dict[str, float] | None:
        rt = self.batched if self.batched is not None else self.runtime
        if rt is None:
            return None
        state = {"usage": rt.kv_usage(), "preemptions": rt.preemptions}
        if rt.cache.prefix:
            state.update(prefix_queries=rt.cache.queried, prefix_hits=rt.cache.hit)
        return state

    @property
    def max_batch(self) -> int:
        return self.batched.batch if self.batched is not None else 1

    @property
    def continuous(self) -> bool:
        return self.batched is not None

    def _stream_batch(self, prompts: list[str], samplings: list[Sampling], alive: Callable[[int], bool],
                      stream: bool, join: Join | None = None) -> Iterator[Piece]:
        """Prompts decode together on the batched runtime, continuously (one alone: the batch-1 runtime),
        each with its own max_tokens and stop strings, when they share their sampling; else one after
        another. `join`: see Engine.stream_batch."""
        shared = {self.batch_key(s) for s in samplings}
        rt = self.runtime if len(prompts) == 1 and join is None else self.batched
        if rt is None or len(shared) > 1:
            yield from super()._stream_batch(prompts, samplings, alive, stream)
            return
        yield from self._decode_rows(rt, prompts, samplings, alive, stream, join)

    def _decode_rows(self, rt: Runtime, prompts: list[str], samplings: list[Sampling],
                     alive: Callable[[int], bool], stream: bool, join: Join | None = None) -> Iterator[Piece]:
        ids = self._prompt_ids(prompts, rt)
        s = samplings[0]
        params = SampleParams(s.temperature, s.top_p, s.top_k, s.seed)
        eos = self._ends(s)  # a batch shares it (Engine.batch_key)
        rows = RowTexts(self.tokenizer, samplings, eos, 0, stream)

        def joining(free: int) -> list[tuple[list[int], int]]:
            new = join(free) if join is not None else []
            rows.extend([sampling for _, sampling in new])
            joined = self._prompt_ids([prompt for prompt, _ in new], rt)
            return [(prompt_ids, sampling.max_tokens) for prompt_ids, (_, sampling) in zip(joined, new)]

        for i, token, last in rt.stream_batch(ids, [x.max_tokens for x in samplings], params, eos,
                                              lambda i: alive(i) and not rows.ended[i], join=joining):
            piece = rows.add(i, token, last)
            if piece is not None:
                yield piece

    def calibrate(self, prompt: str) -> None:
        """Route a calibration prompt, then cache the most-used experts on the GPU."""
        if self.hybrid is None:
            return
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids[: self.runtime.max_len - 1]
        self.hybrid.counts.zero_()
        self.runtime.reset()
        self.runtime.prefill(ids)
        self.hybrid.place_cache()

    def close(self) -> None:
        if self.hybrid is not None:
            self.hybrid.close()
        self.runtime = self.batched = None
        self.hybrid = None
        super().close()


def load_one_gpu(plan: Any, path: str, dtype: Any) -> RuntimeEngine:
    from transformers import AutoTokenizer

    from qwenhw.engine.torch_model import pretrained

    model = pretrained(plan, path, dtype, NativeConfig.of(plan).main_device)
    return build_one_gpu(model, AutoTokenizer.from_pretrained(path), plan)


def build_one_gpu(model: Any, tokenizer: Any, plan: Any) -> RuntimeEngine:
    """Everything on one GPU: the runtime with a CUDA graph per decode step, batched expert matmuls."""
    model.eval()
    if not supported(model):
        raise ValueError(f"the native engine runs {', '.join(ARCHITECTURES)} models, not {model.config.model_type}")
    return runtime_engine(model, tokenizer, plan, NativeConfig.of(plan).main_device, plan.concurrency)


def runtime_engine(model: Any, tokenizer: Any, plan: Any, device: str, sequences: int | None,
                   group: Any = None) -> RuntimeEngine:
    """The engine over the runtimes a plan needs (limits.runtime_batches): batch 1, and `sequences` at once
    for prompt lists when that is more than one, or the one paged runtime that takes both (`group`: this rank's
    tensor-parallel group)."""
    cfg = NativeConfig.of(plan)
    kernels = cfg.kernel_config()
    runtimes = [Runtime(model, max_len=int(plan.context), device=device, batch=b, graphs=cfg.cuda_graphs,
                        decode_experts=cfg.decode_experts, group=group, kernels=kernels,
                        prefill_tokens=cfg.prefill_tokens, kv_tokens=cfg.kv_tokens if b > 1 else 0,
                        prefix_caching=cfg.prefix_caching)
                for b in runtime_batches(sequences, paged=cfg.kv_tokens > 0)]
    for rt in runtimes:
        rt.warm()
    batched = runtimes[-1] if runtimes[-1].batch > 1 else None
    return RuntimeEngine(model, tokenizer, runtimes[0], plan=plan, batched=batched)
