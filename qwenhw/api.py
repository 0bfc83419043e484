"""The public Python API: detect -> plan -> load. The CLI calls exactly these."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from . import plugins
from .engine.base import Engine
from .errors import BadInput, DoesNotFit, LoadFailed, QwenhwError
from .hardware import HardwareProfile, resolve_hardware
from .hardware import detect as _detect_local
from .models import ModelSpec, resolve_model
from .planning.plan import Plan, Request
from .planning.renames import renamed_plan
from .planning.precision import KV_DTYPES, check_dtype
from .planning.select import choose
from .planning.workload import GOALS, LOAD_FORMATS, workload

log = logging.getLogger("qwenhw")


def detect() -> HardwareProfile:
    """This machine, including devices found by plugin probes."""
    reg = plugins.load()
    return _detect_local(extra_probes=list(reg.probes.values()))


def hardware_profile(hardware: HardwareProfile | str | None, ray_address: str | None = None) -> HardwareProfile:
    """This machine (None), a profile, a bundled name or file, or "cluster": the Ray cluster at `ray_address`
    (default RAY_ADDRESS), probed node by node."""
    if hardware is None:
        return detect()
    if isinstance(hardware, HardwareProfile):
        return hardware
    if str(hardware) == "cluster":
        from .hardware.cluster import probe

        return probe(ray_address)
    return resolve_hardware(str(hardware))


def model_spec(model: ModelSpec | str, weights: bool = True) -> ModelSpec:
    """`weights` false: a checkpoint directory need not hold weights (random ones are made from its config)."""
    if isinstance(model, ModelSpec):
        return model
    reg = plugins.load()
    if model in reg.models:
        return reg.models[model]
    return resolve_model(str(model), weights=weights)


def make_request(context: int | None = None, concurrency: int = 1, dtype: str | None = None,
                 kv_dtype: str | None = None, backend: str | None = None, engine: str | None = None,
                 gpu_memory_gib: float | None = None, cpu_memory_gib: float | None = None, allow_offload: bool = True,
                 prompt_tokens: int | None = None, output_tokens: int | None = None,
                 goal: str | None = None, load_format: str | None = None, ray_address: str | None = None,
                 prefix_caching: bool = True) -> Request:
    if context is not None and context < 16:
        raise BadInput(f"--context {context} is too small: a request needs at least 16 tokens (try 4096).")
    if concurrency < 1:
        raise BadInput(f"--concurrency {concurrency} must be at least 1.")
    for name, value in (("gpu_memory_gib", gpu_memory_gib), ("cpu_memory_gib", cpu_memory_gib)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise BadInput(f"{name}={value!r} is not a budget: give a finite number of GiB of at least 0, e.g. 20.")
    for name, value in (("context", context), ("concurrency", concurrency), ("prompt_tokens", prompt_tokens),
                        ("output_tokens", output_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadInput(f"{name}={value!r} must be a whole number of tokens or sequences, e.g. 4096.")
    for name, value in (("--prompt-tokens", prompt_tokens), ("--output-tokens", output_tokens)):
        if value is not None and value < 1:
            raise BadInput(f"{name} {value} must be at least 1 (a chat turn is about 1024 prompt and 256 answer "
                           f"tokens).")
    if load_format not in (None, *LOAD_FORMATS):
        raise BadInput(f"--load-format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}: auto reads the "
                       f"checkpoint's weights, dummy makes random ones from its config.json (for benchmarks).")
    if goal is not None and goal not in GOALS:
        raise BadInput(f"--goal {goal!r} is not one of {', '.join(GOALS)}: latency ranks plans by how soon a "
                       f"request finishes, throughput by output tokens per second.")
    if context is not None and (prompt_tokens or output_tokens):  # lengths left open shrink to fit the context
        w = workload(Request(context=context, prompt_tokens=prompt_tokens, output_tokens=output_tokens))
        if w.prompt_tokens + w.output_tokens > context:
            raise BadInput(f"--context {context} cannot hold a {w.prompt_tokens}-token prompt and a "
                           f"{w.output_tokens}-token answer ({w.prompt_tokens + w.output_tokens} tokens); ask for "
                           f"--context {w.prompt_tokens + w.output_tokens} or more, or shorten --prompt-tokens or "
                           f"--output-tokens.")
    return Request(
        context=context,
        concurrency=concurrency,
        dtype=check_dtype(dtype),
        kv_dtype=check_dtype(kv_dtype, KV_DTYPES, "--kv-dtype"),
        backend=backend,
        engine=engine,
        gpu_memory_gib=gpu_memory_gib,
        cpu_memory_gib=cpu_memory_gib,
        allow_offload=allow_offload,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        goal=goal,
        load_format=load_format or "auto",
        ray_address=ray_address,
        prefix_caching=bool(prefix_caching),
    )


def plan(model: ModelSpec | str, hardware: HardwareProfile | str | None = None, **request: Any) -> Plan:
    """Plan how to run `model` (catalog name, hub id or checkpoint dir) on `hardware` (default: this machine).

    Keyword arguments: context, concurrency, dtype, kv_dtype, backend, engine, gpu_memory_gib,
    cpu_memory_gib, load_format ("dummy": random weights from the config), and the workload the plans are
    ranked for: prompt_tokens, output_tokens, goal.
    """
    req = make_request(**request)
    spec = model_spec(model, weights=req.load_format != "dummy")
    if hardware is None and req.ray_address:  # named a Ray cluster: plan for what it holds
        hardware = "cluster"
    hw = hardware_profile(hardware, req.ray_address)
    if req.context is not None and req.context > spec.max_position:
        raise BadInput(
            f"--context {req.context} exceeds {spec.name}'s maximum of {spec.max_position} tokens "
            f"(max_position_embeddings). Ask for at most {spec.max_position}."
        )
    w = workload(req)
    if w.prompt_tokens + w.output_tokens > spec.max_position:
        raise BadInput(
            f"A {w.prompt_tokens}-token prompt and a {w.output_tokens}-token answer ({w.prompt_tokens + w.output_tokens} "
            f"tokens) exceed {spec.name}'s maximum of {spec.max_position} tokens; shorten --prompt-tokens or "
            f"--output-tokens."
        )
    reg = plugins.load()
    return choose(spec, hw, req, reg.backends, reg.faults)


def load(model: ModelSpec | str | Plan, **overrides: Any) -> Engine:
    """Detect, plan and load. Falls back to the next-ranked plan if loading fails, and says so."""
    chosen = model if isinstance(model, Plan) else plan(model, None, **overrides)
    if not chosen.fits:
        raise DoesNotFit(
            f"{chosen.model} does not fit {chosen.hardware}: " + "; ".join(chosen.reasons) + ".", plan=chosen
        )
    reg = plugins.load()
    chosen = renamed_plan(chosen, reg.backends)  # a plan saved under an engine's old name
    history: list[str] = list(chosen.history)
    failures: list[str] = []
    for candidate in (chosen,) + tuple(chosen.alternatives):
        label = f"{candidate.backend} ({candidate.engine}, {candidate.parallel})"
        backend = reg.backends.get(candidate.backend)
        if backend is None:
            failures.append(f"{label}: backend not registered here")
            continue
        if not candidate.available:
            failures.append(f"{label}: not installed ({candidate.install})")
            history.append(f"skipped {label}: not installed here ({candidate.install})")
            continue
        try:
            engine = backend.load(candidate.replace(history=tuple(history)))
        except QwenhwError:
            raise  # missing weights, bad config: another plan will not help
        except Exception as exc:  # OOM or a backend fault: try the next plan, loudly
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            kind = "out of memory" if _is_oom(exc) else "backend fault"
            note = f"{label} failed to load ({kind}: {reason}); falling back to the next-ranked plan"
            history.append(note)
            failures.append(f"{label}: {reason}")
            log.warning(note)
            print(f"qwenhw: {note}", file=sys.stderr)
            continue
        engine.plan = candidate.replace(history=tuple(history) + (f"loaded {label}",))
        return engine
    raise LoadFailed(f"Every plan for {chosen.model} failed to load: " + "; ".join(failures) + ".")


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "outofmemory" in text
