"""Ask every backend for candidate plans, rank them, and explain the choice. Pure over its inputs.

The registry (plugins) is passed in; faults inside a backend are recorded on the plan, never raised.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any, Mapping

from ..errors import BadInput
from ..hardware.profile import GiB, HardwareProfile
from ..models import memory as mm
from ..models.spec import ModelSpec
from .footprint import GPU_UTILISATION
from .plan import Plan, Rejection, Request
from .renames import renamed_request
from .workload import DUMMY_WARNING, Workload, from_rates, trade_off, verdict, workload

MAX_ALTERNATIVES = 4
LOSSY_GAIN = 2.0  # a plan that quantizes at load (lossy) wins unasked only by this much over the best lossless one


def choose(spec: ModelSpec, hardware: HardwareProfile, request: Request, backends: Mapping[str, Any],
           faults: list | None = None) -> Plan:
    if request.backend and request.backend not in backends:
        close = difflib.get_close_matches(request.backend, list(backends), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise BadInput(
            f"No backend named {request.backend!r} is registered (registered: {', '.join(sorted(backends)) or 'none'})."
            f"{hint} `qwenhw backends` lists them with why each is or is not available; built-in backends install "
            f"with `pip install ./plugins/<name>`."
        )
    request = renamed_request(request, backends)
    _check_engine(request, backends)
    candidates: list[Plan] = []
    rejected: list[Rejection] = []
    for name, backend in backends.items():
        if request.backend and name != request.backend:
            continue
        try:
            availability = backend.probe(hardware)
        except Exception as exc:
            _fault(faults, name, "probe", exc)
            rejected.append(Rejection(name, f"its probe raised {type(exc).__name__}: {exc}"))
            continue
        hardware_reason = backend.supports(hardware)
        if hardware_reason:
            rejected.append(Rejection(name, hardware_reason))
            continue
        if request.load_format not in getattr(backend, "load_formats", ("auto",)):
            rejected.append(Rejection(name, f"cannot make random weights (--load-format {request.load_format})"))
            continue
        try:
            plans = list(backend.plans(spec, hardware, request))
        except BadInput:
            raise
        except Exception as exc:
            _fault(faults, name, "plans", exc)
            rejected.append(Rejection(name, f"planning raised {type(exc).__name__}: {exc}"))
            continue
        if request.engine and plans:  # a forced engine ("ipex-llm:asym_int4" names ipex-llm plus a format)
            wanted = request.engine.split(":")[0]
            engines = sorted({p.engine for p in plans})
            plans = [p for p in plans if p.engine == wanted]
            if not plans:
                rejected.append(Rejection(name, f"has no engine {wanted!r} for this model and hardware (its engines "
                                                f"here: {', '.join(engines)})"))
                continue
        if not plans:
            rejected.append(Rejection(name, "proposed no plan for this model and hardware"))
        w = workload(request)
        for p in plans:
            if request.load_format == "dummy" and p.fits:
                p = p.replace(warnings=(DUMMY_WARNING,) + p.warnings, config={**p.config, "load_format": "dummy"})
            candidates.append(p.replace(
                available=availability.ok,
                install=None if availability.ok else (availability.install or getattr(backend, "install", None)),
                hardware=hardware.name,
                warnings=p.warnings + (() if availability.ok else (f"{name}: {availability.reason}",)),
                estimate=from_rates(p.estimate, w) if p.fits else p.estimate,
                prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens, goal=w.goal,
            ))
    return rank(spec, hardware, request, candidates, rejected, backends)


def _check_engine(request: Request, backends: Mapping[str, Any]) -> None:
    """--engine must name an engine of the forced backend (or of some backend): a misspelt or misplaced one
    is bad input, not "nothing fits"."""
    if not request.engine:
        return
    wanted = request.engine.split(":")[0]
    declared = {name: tuple(getattr(b, "engine_names", ()) or ()) for name, b in backends.items()}
    if request.backend:
        names = declared.get(request.backend, ())
        if not names or wanted in names:
            return
        owner = next((b for b, engines in declared.items() if wanted in engines), None)
        close = difflib.get_close_matches(wanted, names, n=2)
        raise BadInput(f"--engine {wanted!r} is not an engine of the {request.backend} backend"
                       + (f" but of the {owner} backend" if owner else "")
                       + f"; {request.backend}'s engines are {', '.join(names)}"
                       + (f" (closest: {', '.join(close)})" if close else "")
                       + (f". Drop --backend or use --backend {owner}." if owner else "."))
    every = sorted({e for engines in declared.values() for e in engines})
    if every and all(declared.values()) and wanted not in every:
        close = difflib.get_close_matches(wanted, every, n=3)
        raise BadInput(f"--engine {wanted!r} is no engine of any registered backend"
                       + (f"; did you mean {', '.join(close)}?" if close else ".")
                       + f" Engines: {', '.join(every)}.")


def rank(spec: ModelSpec, hardware: HardwareProfile, request: Request, candidates: list[Plan],
         rejected: list[Rejection], backends: Mapping[str, Any]) -> Plan:
    fitting = sorted((p for p in candidates if p.fits), key=_order)
    runnable = [p for p in fitting if p.available]
    if runnable:
        best = runnable[0]
        lossless = next((p for p in runnable if not p.config.get("quantized_at_load")), None)
        if best is not lossless and lossless is not None and best.score < LOSSY_GAIN * lossless.score:
            # precision changes unasked only for a large gain: keep the weights as stored, name the option
            lossy, best = best, lossless
            runnable = [best] + [p for p in runnable if p is not best]
            best = best.replace(reasons=best.reasons + (
                f"--dtype {lossy.dtype} ({lossy.backend} {lossy.engine}, quantized while loading, lossy) would be "
                f"{lossy.score / best.score:.1f}x better for this workload; qwenhw changes the precision unasked "
                f"only for {LOSSY_GAIN:g}x or more",))
        reasons = list(best.reasons)
        w = workload(request)
        for p in fitting:
            if p.score <= best.score:
                break
            if p.available:
                continue
            # a faster plan exists but its software is not installed here
            reasons.append(f"{label(p)} is not installed here ({p.install}), though for this workload "
                           + trade_off(p.estimate, best.estimate, p.engine, best.engine, w))
        rival = next((p for p in runnable[1:] if (p.backend, p.engine) != (best.backend, best.engine)
                      and p.score <= best.score), None)
        if rival is not None:  # the choice in numbers: what the next-best other engine would do
            reasons.append(f"chosen over {label(rival)}: "
                           + trade_off(best.estimate, rival.estimate, best.engine, rival.engine, w))
        reasons += _idle_gpus(best, hardware, runnable, candidates, w)
        best = best.replace(reasons=tuple(reasons))
        gpus_only = [p for p in fitting if not (p.offload.cpu_gib or p.offload.disk_gib)
                     and any(d.kind.endswith("gpu") for d in p.devices)]
        if hardware.accelerators and (best.offload.cpu_gib or best.offload.disk_gib) and not gpus_only:
            offloaded = best.offload.cpu_gib + best.offload.disk_gib
            best = best.replace(reasons=best.reasons + (
                "without offload it does not fit: " + "; ".join(fit_advice(spec, hardware, request, offloaded)),))
    elif fitting:
        best = fitting[0]
        best = best.replace(reasons=best.reasons + (f"{best.backend} is the best fit but is not installed here: {best.install}",))
    elif candidates:
        best = min(candidates, key=lambda p: (_shortfall(p), -p.score))
        best = best.replace(reasons=best.reasons + tuple(fit_advice(spec, hardware, request)))
    else:
        best = Plan(model=spec.name, backend="none", engine="none", fits=False, hardware=hardware.name,
                    reasons=("no registered backend can serve this hardware",) + tuple(fit_advice(spec, hardware, request)))
    rejected = list(rejected) + _why_others_lost(best, candidates, workload(request))
    alternatives = tuple(p for p in runnable if p is not best and p.config != best.config)[:MAX_ALTERNATIVES]
    spec_dict = json.loads(json.dumps(spec.to_dict()))  # JSON-shaped, so plans round-trip exactly
    best = best.replace(
        candidates=tuple(_candidate(p) for p in sorted(candidates, key=lambda p: (not p.fits, _order(p)))),
        rejected=tuple(rejected),
        alternatives=tuple(a.replace(spec=spec_dict, model_path=spec.path) for a in alternatives),
        spec=spec_dict,
        model_path=spec.path,
    )
    backend = backends.get(best.backend)
    if backend is not None:
        try:
            best = best.replace(artifacts=backend.artifacts(best))
        except Exception as exc:
            best = best.replace(warnings=best.warnings + (f"artifacts failed: {type(exc).__name__}: {exc}",))
    return best


def _order(p: Plan) -> tuple:
    # best for the goal first; among equals, fewer devices, no offload
    return (-round(p.score, 9), len([d for d in p.devices if d.kind.endswith("gpu")]), p.offload.cpu_gib + p.offload.disk_gib)


def label(p: Plan) -> str:
    return f"{p.backend} ({p.engine}, {p.parallel})"


def _gpus(p: Plan) -> int:
    return len([d for d in p.devices if d.kind.endswith("gpu")])


def _idle_gpus(best: Plan, hardware: HardwareProfile, runnable: list[Plan], candidates: list[Plan],
               w: Workload) -> list[str]:
    """Why a plan leaves some of the machine's GPUs idle, in numbers."""
    total, used = len(hardware.accelerators), _gpus(best)
    if not used or used >= total:
        return []
    wider = [p for p in runnable if _gpus(p) > used]
    if wider:
        other = wider[0]
        return [f"uses {used} of the {total} GPUs: the best plan on more of them, {label(other)}, is not better "
                f"for this workload ({verdict(best.estimate, other.estimate, best.engine, w)}); more sequences "
                f"at once (--concurrency) put the others to work"]
    unfit = next((p for p in candidates if _gpus(p) > used and not p.fits and p.reasons), None)
    why = f": {label(unfit)}: {unfit.reasons[0]}" if unfit else ""
    return [f"uses {used} of the {total} GPUs: no layout over more of them fits or applies here{why}"]


def _candidate(p: Plan) -> dict[str, Any]:
    """One line of `--json`'s candidates: every plan a backend proposed, fitting or not."""
    pa = p.parallel
    return {"backend": p.backend, "engine": p.engine, "parallel": {"tp": pa.tp, "pp": pa.pp, "dp": pa.dp, "ep": pa.ep},
            "fits": p.fits, "available": p.available, "context": p.context, "max_context": p.max_context,
            "offload": {"cpu_gib": round(p.offload.cpu_gib, 4), "disk_gib": round(p.offload.disk_gib, 4)},
            "estimate": p.estimate.to_dict(), "why": "" if p.fits else (p.reasons[0] if p.reasons else "does not fit")}


def _shortfall(p: Plan) -> float:
    over = [max(0.0, d.total_gib - d.capacity_gib) for d in p.devices]
    return sum(over) if over else math.inf


def _why_others_lost(best: Plan, candidates: list[Plan], w: Workload) -> list[Rejection]:
    out: list[Rejection] = []
    seen_backends = set()
    for p in sorted(candidates, key=_order):
        if p is best or p.config == best.config and p.backend == best.backend:
            continue
        if not p.fits:
            why = p.reasons[0] if p.reasons else "does not fit"
        elif not p.available:
            why = f"not installed here ({p.install})"
        elif p.score > best.score:  # only a plan that quantizes at load (lossy) loses while scoring higher
            why = (f"quantized while loading (lossy), {p.score / best.score:.1f}x better for this workload: below "
                   f"the {LOSSY_GAIN:g}x that changes the precision unasked (pass --dtype {p.dtype} for it)")
        elif p.score >= best.score * 0.995:
            why = "as fast for this workload, on more GPUs or with more offloaded: the leaner plan is taken"
        else:
            why = "fits but slower: " + verdict(best.estimate, p.estimate, best.engine, w)
        # keep one line per engine for fitting-but-slower, every non-fitting layout (they teach the rules)
        if p.fits and (p.backend, p.engine) in seen_backends:
            continue
        seen_backends.add((p.backend, p.engine))
        out.append(Rejection(label(p), why))
    return out


def _fault(faults: list | None, plugin: str, stage: str, exc: Exception) -> None:
    if faults is not None:
        from ..plugins import PluginFault

        faults.append(PluginFault(plugin, stage, f"{type(exc).__name__}: {exc}"))


def fit_advice(spec: ModelSpec, hardware: HardwareProfile, request: Request,
               offloaded: float | None = None) -> list[str]:
    """What would make the model fit: quantization, offload or more GPUs, with numbers (`offloaded`: GiB the
    chosen plan already keeps off the GPUs)."""
    wb = mm.weight_bytes_split(spec)
    gpus = hardware.accelerators
    gpu_total = sum(a.memory_bytes for a in gpus) * GPU_UTILISATION
    ram = sum(n.cpu.ram_bytes for n in hardware.nodes)
    out = [f"weights need {wb.total / GiB:.1f} GiB in {spec.dtype if spec.quant.method is None else spec.quant.method}"]
    if gpus:
        out.append(f"the GPUs offer {gpu_total / GiB:.1f} GiB at {GPU_UTILISATION:.0%} of their memory")
        for label, factor in (("fp8", 0.5), ("int4 (AWQ/GPTQ)", 0.27)):
            if spec.quant.method is None and wb.total * factor < gpu_total * 0.85:
                out.append(f"quantized to {label} the weights take about {wb.total * factor / GiB:.1f} GiB and fit")
        biggest = max(a.memory_bytes for a in gpus)
        need = math.ceil(wb.total * 1.15 / (biggest * GPU_UTILISATION))
        out.append(f"unquantized it needs about {need} GPUs of {biggest / GiB:.0f} GiB")
    spill = max(0.0, wb.total * 1.05 - gpu_total)
    if offloaded:
        out.append(f"this plan keeps {offloaded:.1f} GiB of the weights in host RAM or on disk")
    elif ram:
        if spill and spill < ram * 0.85:
            out.append(f"offloading {spill / GiB:.1f} GiB to host RAM ({ram / GiB:.0f} GiB) would fit, slower")
        elif spill:
            out.append(f"host RAM ({ram / GiB:.0f} GiB) is too small to take the {spill / GiB:.1f} GiB that do not fit")
    return out
