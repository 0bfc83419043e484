"""Engines over the lean runtime: the all-on-GPU fast path and the MoE hybrid share this Engine."""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch

from qwenhw.engine.base import Completion, Sampling
from qwenhw.engine.hf import HFEngine, _cut_at_stop

from .planner import runtime_batches
from .runtime import Runtime, SampleParams, supported


class RuntimeEngine(HFEngine):
    """Prompts through the runtime's static cache: a list of prompts decodes `batched.batch` at a time when
    the plan is for several concurrent sequences; single prompts and streams use the batch-1 runtime."""

    def __init__(self, model: Any, tokenizer: Any, runtime: Runtime, plan: Any = None,
                 batched: Runtime | None = None):
        super().__init__(model, tokenizer, plan=plan, device=str(runtime.device))
        self.runtime = runtime
        self.batched = batched
        self.hybrid = None

    def _prompt_ids(self, prompt: str, runtime: Runtime) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) >= runtime.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {runtime.max_len}-token "
                             f"context this plan was made for; plan a longer --context")
        return ids

    def _tokens(self, prompt: str, sampling: Sampling) -> Iterator[int]:
        ids = self._prompt_ids(prompt, self.runtime)
        budget = self.runtime.max_len - len(ids)
        params = SampleParams(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed)
        self.runtime.reset()
        yield from self.runtime.generate(ids, min(sampling.max_tokens, budget), params, set(self._eos_ids()))

    def _batches(self, prompts: list[str], sampling: Sampling) -> list[list[int]]:
        """Each prompt's generated tokens, `batched.batch` prompts per run of the batched runtime."""
        rt = self.batched
        ids = [self._prompt_ids(p, rt) for p in prompts]
        params = SampleParams(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed)
        out: list[list[int]] = []
        for k in range(0, len(ids), rt.batch):
            out += rt.generate_batch(ids[k:k + rt.batch], sampling.max_tokens, params, set(self._eos_ids()))
        return out

    def _complete(self, prompts: list[str], sampling: Sampling) -> list[Completion]:
        out = []
        eos = set(self._eos_ids())
        many = self.batched is not None and len(prompts) > 1
        generated = self._batches(prompts, sampling) if many else None
        for n, prompt in enumerate(prompts):
            tokens = list(generated[n]) if many else list(self._tokens(prompt, sampling))
            finish = "length"
            if tokens and tokens[-1] in eos:
                tokens.pop()
                finish = "stop"
            text, stopped = _cut_at_stop(self.tokenizer.decode(tokens), sampling.stop)
            n_prompt = len(self.tokenizer(prompt, add_special_tokens=False).input_ids)
            out.append(Completion(text, tuple(tokens), n_prompt, "stop" if stopped else finish))
        return out

    def _stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        eos = set(self._eos_ids())
        tokens: list[int] = []
        sent = ""
        for token in self._tokens(prompt, sampling):
            if token in eos:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            cut, stopped = _cut_at_stop(text, sampling.stop)
            if len(cut) > len(sent):
                yield cut[len(sent):]
                sent = cut
            if stopped:
                return

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


def load_fast(plan: Any, path: str, dtype: Any) -> RuntimeEngine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = plan.config.get("main_device", "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    return build_fast(model, AutoTokenizer.from_pretrained(path), plan)


def build_fast(model: Any, tokenizer: Any, plan: Any) -> RuntimeEngine:
    """Everything on one GPU: the runtime with a CUDA graph per decode step, batched expert matmuls."""
    device = plan.config.get("main_device", "cpu")
    model.eval()
    if not supported(model):
        raise ValueError(f"the fast path covers Qwen3 / Qwen3-MoE / Qwen2 models, not {model.config.model_type}")
    if device == "cpu":
        torch.set_num_threads(min(int(plan.config.get("threads") or 1), os.cpu_count() or 1))
    return runtime_engine(model, tokenizer, plan, device, plan.concurrency,
                          decode_experts=plan.config.get("decode_experts", "grouped_mm"))


def runtime_engine(model: Any, tokenizer: Any, plan: Any, device: str, sequences: int | None,
                   **runtime_args: Any) -> RuntimeEngine:
    """The engine over the runtimes a plan needs (planner.runtime_batches): batch 1, and `sequences` at once
    for prompt lists when that is more than one."""
    runtimes = [Runtime(model, max_len=int(plan.context or 4096), device=device, batch=b,
                        graphs=plan.config.get("cuda_graphs", True), **runtime_args)
                for b in runtime_batches(sequences)]
    return RuntimeEngine(model, tokenizer, runtimes[0], plan=plan, batched=runtimes[1] if len(runtimes) > 1 else None)
