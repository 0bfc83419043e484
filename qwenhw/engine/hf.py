"""An Engine over a Hugging Face-style causal LM (transformers, accelerate dispatch, ipex-llm, DeepSpeed).

Backends build the model their way and hand it here; generation, streaming and the chat template are shared.
torch and transformers are imported only when an engine is created.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from .base import Completion, Engine, Piece, Sampling
from .text import RowTexts, completion, cut_at_stop


class HFEngine(Engine):
    """`batch`: sequences one generate() call decodes together when a server hands it several (the plan's
    concurrency); 1 runs them one after another."""

    def __init__(self, model: Any, tokenizer: Any, plan: Any = None, device: str | None = None,
                 on_close: Any = None, batch: int = 1):
        super().__init__(plan)
        self.batch = max(1, int(batch or 1))
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or _input_device(model)
        self._on_close = on_close
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # --- templates and tokens -------------------------------------------------------------------
    def render_chat(self, messages: list[dict], enable_thinking: bool | None) -> str:
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0 and im_end not in ids:
            ids.append(im_end)  # chat turns end with <|im_end|> even where generation_config forgets it
        return [i for i in ids if i is not None]

    def _ends(self, sampling: Sampling) -> set[int]:
        """The tokens that end a row of this sampling: the end-of-turn ones, none with ignore_eos."""
        return set() if sampling.ignore_eos else set(self._eos_ids())

    def _generate_kwargs(self, sampling: Sampling) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "eos_token_id": None if sampling.ignore_eos else self._eos_ids(),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
        if sampling.stop:
            kw.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        return kw

    def _encode(self, prompts: list[str]) -> Any:
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left so new tokens line up
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    # --- generation -----------------------------------------------------------------------------
    def _complete(self, prompts: list[str], sampling: Sampling) -> list[Completion]:
        import torch

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        enc = self._encode(prompts)
        with torch.inference_mode():
            out = self.model.generate(**enc, **self._generate_kwargs(sampling))
        width = enc["input_ids"].shape[1]
        ends = set(self._eos_ids()) | {self.tokenizer.pad_token_id}  # a batch's shorter rows end in padding
        return [completion(self.tokenizer, row[width:].tolist(), int(mask.sum()), ends, sampling.stop)
                for row, mask in zip(out, enc["attention_mask"])]

    def _stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        enc = self._encode([prompt])
        from transformers import StoppingCriteria, StoppingCriteriaList

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        cancel = threading.Event()

        class Cancelled(StoppingCriteria):  # lets a consumer that stops reading (Ctrl-C, client gone) end generate()
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**enc, **self._generate_kwargs(sampling), streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([Cancelled()]))
            except BaseException as exc:  # surface in the consumer, not a stray thread traceback
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        text, sent = "", 0
        try:
            for piece in streamer:  # generate() itself stops at stop strings; we only trim them off
                text += piece
                cut, stopped = cut_at_stop(text, sampling.stop)
                if len(cut) > sent:
                    yield cut[sent:]
                    sent = len(cut)
                if stopped:
                    break
        finally:
            # also on close()/KeyboardInterrupt: stop generating before the engine lock is released, so the
            # next request never shares the model with a run nobody reads
            cancel.set()
            worker.join()
        if errors:
            raise errors[0]

    @property
    def max_batch(self) -> int:
        return self.batch

    def _stream_batch(self, prompts: list[str], samplings: list[Sampling], alive: Callable[[int], bool],
                      stream: bool) -> Iterator[Piece]:
        """Up to `batch` rows through one generate() call (left-padded); each row keeps its own max_tokens
        and stop strings and ends on its own (a stopping criterion per row). The server batches rows of one
        sampling (Engine.batch_key), so generate() takes the first row's."""
        if (self.batch == 1 or len(prompts) == 1) and stream:
            yield from super()._stream_batch(prompts, samplings, alive, stream)
            return
        if self.batch == 1:  # whole texts one after another, each generate() stoppable at every step
            for row, (prompt, sampling) in enumerate(zip(prompts, samplings)):
                if alive(row):
                    yield from self._generate_rows([prompt], [sampling], lambda i, row=row: alive(row), row, False)
            return
        for k in range(0, len(prompts), self.batch):
            rows = range(k, min(k + self.batch, len(prompts)))
            yield from self._generate_rows([prompts[r] for r in rows], [samplings[r] for r in rows],
                                           lambda i: alive(k + i), k, stream)

    def _generate_rows(self, prompts: list[str], samplings: list[Sampling], alive: Callable[[int], bool],
                       first: int, stream: bool) -> Iterator[Piece]:
        import queue

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        n = len(prompts)
        # rows of one batch share their sampling's ignore_eos (Engine.batch_key)
        rows = RowTexts(self.tokenizer, samplings, self._ends(samplings[0]), first, stream)
        steps: queue.Queue = queue.Queue()
        errors: list[BaseException] = []
        cancel = threading.Event()
        enc = self._encode(prompts)
        width = enc["input_ids"].shape[1]

        class Steps(BaseStreamer):  # generate() hands it the prompts, then each step's token per row
            def __init__(self) -> None:
                self.prompt = True

            def put(self, value: Any) -> None:
                if self.prompt:
                    self.prompt = False
                else:
                    steps.put(value.reshape(-1).tolist())

            def end(self) -> None:
                steps.put(None)

        class RowsDone(StoppingCriteria):  # its own max_tokens, a stop string seen, its client gone
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                made = input_ids.shape[1] - width
                done = [cancel.is_set() or rows.ended[i] or made >= rows.limits[i] for i in range(n)]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        sampling = Sampling(max(rows.limits), samplings[0].temperature, samplings[0].top_p, samplings[0].top_k,
                            (), samplings[0].seed)

        def run() -> None:
            try:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                with torch.inference_mode():
                    self.model.generate(**enc, **self._generate_kwargs(sampling), streamer=Steps(),
                                        stopping_criteria=StoppingCriteriaList([RowsDone()]))
            except BaseException as exc:  # surface in the consumer
                errors.append(exc)
                steps.put(None)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while (step := steps.get()) is not None:
                for i, token in enumerate(step):
                    if not rows.ended[i] and not alive(i):
                        rows.drop(i)
                    piece = rows.add(i, token)
                    if piece is not None:
                        yield piece
        finally:
            cancel.set()  # a reader that stopped early: generate() ends at its next step
            worker.join()
        if errors:
            raise errors[0]
        yield from rows.unended()  # generate() ended first (the model's length limit)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self._on_close:
            self._on_close()
        self.model = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


def _input_device(model: Any) -> str:
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for key in ("model.embed_tokens", "embed_tokens", ""):
            if key in device_map and device_map[key] not in ("disk",):
                dev = device_map[key]
                return f"cuda:{dev}" if isinstance(dev, int) else str(dev)
    try:
        return str(next(model.parameters()).device)
    except Exception:
        return "cpu"
