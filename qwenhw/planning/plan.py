"""A plan: which backend, which layout, which memory split, and why. Plain data that serialises to JSON.

A `Plan` can be executed later or on another machine (`qwenhw.load(plan)`), so it carries everything the
backend needs (`config`) and the launch files it implies (`artifacts`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..hardware.profile import GiB


@dataclass(frozen=True)
class Request:
    """What the user asks for. None means "let the planner choose"."""

    context: int | None = None  # tokens per sequence (prompt + output)
    concurrency: int = 1  # sequences decoded together
    dtype: str | None = None  # weight dtype: auto, bf16, fp16, fp32, fp8, int4
    kv_dtype: str | None = None  # auto, bf16, fp8
    backend: str | None = None
    engine: str | None = None  # force one engine of the backend (e.g. offload's deepspeed-zero3)
    gpu_memory_gib: float | None = None  # per-GPU budget override (below the card's size)
    cpu_memory_gib: float | None = None  # host RAM budget override
    allow_offload: bool = True
    prompt_tokens: int | None = None  # tokens per prompt (default: workload.DEFAULT_PROMPT_TOKENS)
    output_tokens: int | None = None  # tokens per answer (default: workload.DEFAULT_OUTPUT_TOKENS)
    goal: str | None = None  # "latency" or "throughput" (default: latency at concurrency 1, else throughput)
    load_format: str = "auto"  # "dummy": random weights from the checkpoint's config (benchmarks)
    ray_address: str | None = None  # the Ray cluster a multi-node plan runs on (default: RAY_ADDRESS)
    prefix_caching: bool = True  # reuse the KV cache of prompts' shared beginnings (vLLM's automatic prefix caching)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # 1 = experts not distributed (split by TP instead)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"DP={self.dp}"]
        if self.ep > 1:
            parts.append(f"EP={self.ep}")
        return " ".join(parts)


@dataclass(frozen=True)
class DeviceUse:
    """Predicted memory on one device. Sizes in GiB, as the JSON contract states."""

    id: str  # cuda:0, node1/cuda:3, xpu:0, cpu, disk
    kind: str  # nvidia-gpu, intel-gpu, cpu, disk
    capacity_gib: float  # what the plan may use on it (after utilisation caps / budgets)
    weights_gib: float = 0.0
    kv_cache_gib: float = 0.0
    overhead_gib: float = 0.0

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.overhead_gib

    def to_dict(self) -> dict[str, Any]:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}
        d["total_gib"] = round(d["weights_gib"] + d["kv_cache_gib"] + d["overhead_gib"], 4)  # round-trips exactly
        return d


@dataclass(frozen=True)
class Offload:
    cpu_gib: float = 0.0  # weights kept in host RAM
    disk_gib: float = 0.0  # weights memory-mapped from disk
    experts_on_cpu: bool = False
    gpu_expert_cache_gib: float = 0.0


@dataclass(frozen=True)
class Estimate:
    """What the plan's engine does with the request's workload, from speed models fitted to measurements
    (`basis` names them): the prompts of `concurrency` requests arriving together, then their answers."""

    decode_tok_s: float = 0.0  # per sequence while it decodes (1 / the decode step)
    throughput_tok_s: float = 0.0  # decode: all sequences together
    prefill_tok_s: float = 0.0  # prompt tokens per second until every prompt has its first token
    bound: str = ""  # what limits decode: "GPU memory bandwidth", "host RAM bandwidth", "PCIe", ...
    ttft_s: float = 0.0  # time to first token: until every prompt of the batch has one
    tpot_s: float = 0.0  # time per output token after the first, the median request's (workload.estimate)
    latency_s: float = 0.0  # one request: ttft_s + (output_tokens - 1) decode steps
    total_tok_s: float = 0.0  # output tokens per second over the requests' whole time, prefill included
    basis: tuple[str, ...] = ()  # the measurements the figures were fitted to

    def to_dict(self) -> dict[str, Any]:
        d = {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        d["basis"] = list(self.basis)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Estimate":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["basis"] = tuple(d.get("basis", ()))
        return cls(**d)


@dataclass(frozen=True)
class Rejection:
    backend: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "why": self.why}


@dataclass(frozen=True)
class Plan:
    model: str
    backend: str
    engine: str  # the backend's engine: vllm, transformers, one-gpu, hybrid, deepspeed-zero3, ipex-llm, ...
    fits: bool
    parallel: Parallel = Parallel()
    devices: tuple[DeviceUse, ...] = ()
    offload: Offload = Offload()
    context: int = 0  # context the plan was sized for
    max_context: int = 0  # largest context that still fits this layout
    concurrency: int = 1
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    estimate: Estimate = Estimate()
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)  # backend-specific settings (engine args, device map)
    artifacts: dict[str, str] = field(default_factory=dict)
    hardware: str = ""
    model_path: str | None = None
    available: bool = True  # the backend's software is installed where the plan was made (or assumed)
    install: str | None = None  # pip command when not available
    history: tuple[str, ...] = ()  # load attempts and fallbacks
    alternatives: tuple["Plan", ...] = ()  # ranked runners-up that also fit (fallback order)
    spec: dict[str, Any] = field(default_factory=dict)  # ModelSpec as a dict (for loading elsewhere)
    prompt_tokens: int = 0  # the workload the estimate is for
    output_tokens: int = 0
    goal: str = "latency"
    candidates: tuple[dict[str, Any], ...] = ()  # every plan the backends proposed, with its estimate

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", str(self.engine))  # a backend's engine enum is plain text here

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)

    @property
    def score(self) -> float:
        """Higher is better for the plan's goal: 1 / request latency, or output tokens per second."""
        e = self.estimate
        if self.goal == "throughput":
            return e.total_tok_s or e.throughput_tok_s
        return 1.0 / e.latency_s if e.latency_s > 0 else e.decode_tok_s * 1e-6

    # --- output ---------------------------------------------------------------------------------
    def to_dict(self, alternatives: bool = True) -> dict[str, Any]:
        p = self.parallel
        d: dict[str, Any] = {
            "model": self.model,
            "backend": self.backend,
            "engine": self.engine,
            "fits": self.fits,
            "available": self.available,
            "install": self.install,
            "hardware": self.hardware,
            "parallel": {"tp": p.tp, "pp": p.pp, "dp": p.dp, "ep": p.ep},
            "devices": [dev.to_dict() for dev in self.devices],
            "offload": dataclasses.asdict(self.offload),
            "context": self.context,
            "max_context": self.max_context,
            "concurrency": self.concurrency,
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "estimate": self.estimate.to_dict(),
            "workload": {"prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                         "concurrency": self.concurrency, "goal": self.goal},
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "rejected": [r.to_dict() for r in self.rejected],
            "config": self.config,
            "artifacts": dict(self.artifacts),
            "history": list(self.history),
            "model_path": self.model_path,
            "spec": self.spec,
        }
        if alternatives:
            d["alternatives"] = [a.to_dict(alternatives=False) for a in self.alternatives]
            d["candidates"] = [dict(c) for c in self.candidates]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        d["parallel"] = Parallel(**d.get("parallel", {}))
        d["devices"] = tuple(
            DeviceUse(**{k: v for k, v in dev.items() if k != "total_gib"}) for dev in d.get("devices", [])
        )
        d["offload"] = Offload(**d.get("offload", {}))
        d["estimate"] = Estimate.from_dict(d.get("estimate", {}))
        work = d.pop("workload", None) or {}
        for key in ("prompt_tokens", "output_tokens", "goal"):
            if key in work:
                d.setdefault(key, work[key])
        d["candidates"] = tuple(d.get("candidates", ()))
        d["rejected"] = tuple(Rejection(**r) for r in d.get("rejected", []))
        d["alternatives"] = tuple(cls.from_dict(a) for a in d.get("alternatives", []))
        for key in ("reasons", "warnings", "history"):
            d[key] = tuple(d.get(key, ()))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def estimate_lines(self) -> list[str]:
        """The estimate for the plan's workload in words, and what its figures were fitted to."""
        e = self.estimate
        work = (f"{self.concurrency} x ({self.prompt_tokens}-token prompt + {self.output_tokens}-token answer)"
                if self.prompt_tokens else f"concurrency {self.concurrency}")
        lines = [f"estimate for {work}, goal {self.goal}: first token {e.ttft_s * 1e3:.0f} ms, "
                 f"{e.tpot_s * 1e3:.1f} ms per output token (decode steps of "
                 f"{1e3 / e.decode_tok_s if e.decode_tok_s else 0:.1f} ms, {e.decode_tok_s:.1f} tok/s per sequence), "
                 f"request {e.latency_s:.2f} s; {e.throughput_tok_s:.1f} tok/s decoding together, "
                 f"{e.total_tok_s:.1f} tok/s over the whole requests; bound by {e.bound}"]
        lines += [f"fitted to: {b}" for b in e.basis]
        return lines

    def explain(self) -> str:
        """Why this backend, this layout and this memory split; what the others would have needed."""
        lines = []
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"{self.model} on {self.hardware}: {self.backend} ({self.engine}), {self.parallel}, {verdict}")
        if self.fits:
            lines += [f"  {line}" for line in self.estimate_lines()]
            lines.append(
                f"  weights {self.dtype}, KV cache {self.kv_dtype}, context {self.context} (max {self.max_context})"
            )
        for dev in self.devices:
            lines.append(
                f"  {dev.id:<12} {dev.total_gib:7.2f} / {dev.capacity_gib:7.2f} GiB  (weights {dev.weights_gib:.2f}, "
                f"KV {dev.kv_cache_gib:.2f}, overhead {dev.overhead_gib:.2f})"
            )
        o = self.offload
        if o.cpu_gib or o.disk_gib:
            what = "routed experts" if o.experts_on_cpu else "weights"
            lines.append(f"  offload: {o.cpu_gib:.2f} GiB of {what} in host RAM, {o.disk_gib:.2f} GiB on disk")
        lines += [f"  why: {r}" for r in self.reasons]
        lines += [f"  warning: {w}" for w in self.warnings]
        if not self.available and self.install:
            lines.append(f"  not installed here: {self.install}")
        for r in self.rejected:
            lines.append(f"  not {r.backend}: {r.why}")
        lines += [f"  load: {h}" for h in self.history]
        return "\n".join(lines)


def gib(nbytes: float) -> float:
    """Bytes to GiB.

    >>> gib(3 * 1024**3)
    3.0
    """
    return nbytes / GiB
