"""The native plan's configuration, typed: what `Plan.config` holds for this backend, and which kernels run.

`NativeConfig.to_dict()` is what the planner writes into a plan (plain JSON); `NativeConfig.of(plan)` is
what the loader reads back, refusing keys it does not know. Pure: no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from qwenhw import settings
from qwenhw.errors import BadInput

from .limits import PREFILL_THRESHOLD, PREFILL_TOKENS


@dataclass(frozen=True)
class KernelConfig:
    """Which of the engine's own kernels run. Defaults come from the QWENHW_* switches (qwenhw.settings); a
    plan's `config["kernels"]` overrides them; a loaded engine reports the result (`engine.info["kernels"]`)."""

    triton: bool = True  # Triton decode kernels at all (off: torch's kernels everywhere)
    linear: bool = True  # q/k/v and o_proj decode GEMMs in Triton (off: cuBLAS + the rope/cache kernel)
    moe: bool = True  # the routed experts in Triton (off: transformers' experts kernels)
    norm: bool = True  # one GPU: the RMSNorms inside the router and MoE-sum kernels
    moe_slots: bool = True  # a MoE program per expert the batch can touch (off: one per local expert)
    prompt: bool = True  # prompt passes: rope/cache kernel, the experts around grouped GEMMs (off: transformers')
    # one GPU: prompt passes carry the decoding rows' tokens (Runtime.fill_and_decode); off: they delayed new
    # requests' first token and saved no time per token (docs/benchmarks.md)
    mixed: bool = False
    async_steps: bool = True  # the next pass and decode step launch before the last one's tokens go out
    pdl: bool = True  # dependent launches on Hopper and later
    symm_mem: bool = True  # TP: all-reduce over symmetric memory (off: torch.distributed)
    fused_reduce: bool = True  # TP: the all-reduce and the next RMSNorm in one kernel
    push_reduce: bool = True  # TP, 16-bit models: the fused all-reduce pushes partial sums to the peers
    cpu_kernel: bool = True  # hybrid: the fused C experts kernel (off: torch's GEMVs)

    @classmethod
    def resolve(cls, overrides: Mapping[str, Any] | None = None) -> "KernelConfig":
        env = {field: settings.get(name) for field, name in _SETTINGS.items()}
        return cls(**{**env, **_checked(cls, dict(overrides or {}), "kernels")})

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


# KernelConfig field -> the variable that gives its default
_SETTINGS = {"triton": "QWENHW_FUSED", "linear": "QWENHW_FUSED_LINEAR", "moe": "QWENHW_FUSED_MOE",
             "norm": "QWENHW_FUSED_NORM", "moe_slots": "QWENHW_MOE_SLOTS", "prompt": "QWENHW_PROMPT_KERNELS",
             "mixed": "QWENHW_MIXED_PASSES", "async_steps": "QWENHW_ASYNC_STEPS", "pdl": "QWENHW_PDL",
             "symm_mem": "QWENHW_SYMM_MEM", "fused_reduce": "QWENHW_FUSED_REDUCE",
             "push_reduce": "QWENHW_PUSH_REDUCE", "cpu_kernel": "QWENHW_CPU_KERNEL"}


@dataclass(frozen=True)
class NativeConfig:
    dtype: str = "bf16"  # the weights' dtype (bf16, fp16, fp32)
    main_device: str = "cpu"  # where the model runs in one process (cuda:0; the CPU only when forced)
    threads: int | None = None  # torch's CPU threads (the host's physical cores)
    cuda_graphs: bool | str = True  # one graph per decode step; "emulate": the graph code paths, eagerly
    decode_experts: str | None = "grouped_mm"  # transformers' experts kernel where the Triton one does not run
    prefill_tokens: int = PREFILL_TOKENS  # prompt tokens a pass holds while no row decodes (the plan's reserve)
    kv_tokens: int = 0  # the batched runtime's KV cache: a pool of this many slots in pages (0: static, context per row)
    # a paged pool keeps the pages of prompts that went in, for prompts that start alike (vLLM's automatic prefix
    # caching; kv_cache.py)
    prefix_caching: bool = True
    load_format: str = "auto"  # "dummy": random weights from config.json
    # the hybrid: routed experts in host RAM
    expert_cache_bytes: int = 0  # GPU cache of hot experts
    prefill_threshold: int = PREFILL_THRESHOLD  # tokens from which a layer's experts go to the GPU
    cache_policy: str = "static"  # static (placed once from a calibration prompt) or dynamic
    cpu_kernel: str = "fused"  # the CPU experts kernel: fused (C) or torch
    calibration_prompt: str | None = None  # routing statistics for the static cache
    # tensor-parallel and replica rank jobs
    world: int = 1  # processes (GPUs)
    tp: int = 1  # GPUs per replica
    experts: str | None = None  # how TP ranks hold the experts: replicated, ep (whole) or tp (split)
    env: dict[str, str] = field(default_factory=dict)  # the rank job's environment
    kernels: dict[str, bool] = field(default_factory=dict)  # KernelConfig overrides

    @classmethod
    def of(cls, plan: Any) -> "NativeConfig":
        return cls(**_checked(cls, dict(plan.config or {}), "config"))

    def to_dict(self) -> dict[str, Any]:
        """The plan's config: the dtype and the fields that differ from the defaults."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default or f.name == "dtype":
                out[f.name] = value
        return out

    def replace(self, **changes: Any) -> "NativeConfig":
        return dataclasses.replace(self, **changes)

    def kernel_config(self) -> KernelConfig:
        return KernelConfig.resolve(self.kernels)


def _checked(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        hints = "; ".join(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, names, 1))
                                        else "") for k in unknown)
        raise BadInput(f"the native backend's plan {what} has unknown keys {hints}; it knows {', '.join(names)}. "
                       f"Re-plan with `qwenhw plan`, or remove them from the plan's JSON.")
    return data
