"""Every QWENHW_* environment variable, declared once: its name, type, default and what it does.

The rest of qwenhw reads them through `get` (or `engine_python` for the per-backend interpreters), never
through `os.environ`. Values are read when asked for, so a test or a parent process may set them at any
time; a value that does not parse is bad input (exit 2), not a silent default. Pure: no torch.
Also here: the cache folders qwenhw and Hugging Face use, which the same variables steer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import BadInput

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _flag(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise BadInput(f"{name}={raw!r} is not a switch: use 1 (on) or 0 (off), or unset it for the default.")


def _text(name: str, raw: str) -> str:
    return raw


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str, str], Any]
    default: Any
    doc: str


_DECLARED = (
    # --- the CLI and the plugin registry -------------------------------------------------------------------
    Setting("QWENHW_DEBUG", _flag, False, "print the traceback of an unexpected error instead of one paragraph"),
    Setting("QWENHW_QUIET", _flag, False, "no progress bars (they are off anyway when stderr is not a terminal)"),
    Setting("QWENHW_API_KEY", _text, None, "`qwenhw serve` requires `Authorization: Bearer <key>` (= --api-key)"),
    Setting("QWENHW_LOAD_PLUGINS", _text, None,
            "comma-separated plugin distributions (or entry names) to load; set but empty: none"),
    Setting("QWENHW_TRACE_PLUGINS", _flag, False, "print every plugin hook call to stderr"),
    Setting("QWENHW_CACHE", _text, None,
            "qwenhw's cache folder (tiny models, the CPU kernel build, engine environments); "
            "default $XDG_CACHE_HOME/qwenhw or ~/.cache/qwenhw"),
    # --- engines in environments of their own (worker processes) -------------------------------------------
    Setting("QWENHW_VLLM_PYTHON", _text, None, "the interpreter of the environment that holds vLLM"),
    Setting("QWENHW_INTEL_PYTHON", _text, None, "the interpreter of the pinned Intel environment (ipex-llm, IPEX)"),
    # --- set by qwenhw for the rank jobs it starts (not for users) -----------------------------------------
    Setting("QWENHW_RANK_JOB", _flag, False, "set inside a torchrun job qwenhw started: load this rank's share"),
    Setting("QWENHW_RANK_BACKEND", _text, "gloo", "torch.distributed backend of the intel rank jobs (ccl on XPUs)"),
    # --- the native engine's kernels: defaults of its KernelConfig (a plan's config["kernels"] overrides) --
    Setting("QWENHW_FUSED", _flag, True, "native: Triton decode kernels at all (0: torch's kernels everywhere)"),
    Setting("QWENHW_FUSED_LINEAR", _flag, True, "native: q/k/v and o_proj decode GEMMs in Triton (0: cuBLAS)"),
    Setting("QWENHW_FUSED_MOE", _flag, True, "native: the routed experts in Triton (0: transformers' kernels)"),
    Setting("QWENHW_FUSED_NORM", _flag, True, "native, one GPU: RMSNorms inside the router and MoE-sum kernels"),
    Setting("QWENHW_MOE_SLOTS", _flag, True,
            "native: a MoE program per expert the batch can touch (0: one per local expert, for A/B runs)"),
    Setting("QWENHW_PROMPT_KERNELS", _flag, True,
            "native: prompt passes' q/k norms + RoPE + cache write and the experts' element-wise work in Triton"),
    Setting("QWENHW_MIXED_PASSES", _flag, False,
            "native, one GPU: a pass of whole prompts carries the decoding rows' tokens too (0: a pass, then a step)"),
    Setting("QWENHW_ASYNC_STEPS", _flag, True,
            "native: a decode step launches before the last one's tokens go out (0: one step at a time)"),
    Setting("QWENHW_PDL", _flag, True, "native: launch decode kernels dependent on the one before (Hopper+)"),
    Setting("QWENHW_SYMM_MEM", _flag, True, "native TP: all-reduce over symmetric memory (0: torch.distributed)"),
    Setting("QWENHW_FUSED_REDUCE", _flag, True, "native TP: the all-reduce and the next RMSNorm in one kernel"),
    Setting("QWENHW_PUSH_REDUCE", _flag, True,
            "native TP, 16-bit models: the fused all-reduce pushes partial sums to the peers (0: reads them)"),
    Setting("QWENHW_CPU_KERNEL", _flag, True, "native hybrid: the fused C experts kernel (0: torch's GEMVs)"),
    Setting("QWENHW_CPU_KERNEL_LIB", _text, None, "native hybrid: a CPU kernel library built elsewhere, to load"),
)
SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}


def get(name: str) -> Any:
    """The variable's value now, parsed, or its default where unset."""
    setting = SETTINGS[name]  # a KeyError here is a bug: declare the variable above
    raw = os.environ.get(name)
    return setting.default if raw is None else setting.parse(name, raw)


def engine_python(backend: str) -> str | None:
    """QWENHW_<BACKEND>_PYTHON: the interpreter of the environment holding that backend's engine (any
    backend may use the pattern; the built-in ones are declared above)."""
    return os.environ.get(f"QWENHW_{backend.upper().replace('-', '_')}_PYTHON") or None


def cache_root() -> Path:
    """qwenhw's cache folder (QWENHW_CACHE, else the XDG cache)."""
    explicit = get("QWENHW_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "qwenhw"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, by huggingface_hub's rules, read from the environment now (not at its
    import time)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def describe() -> list[dict[str, Any]]:
    """Every declared variable with its default and current value (`qwenhw settings`)."""
    return [{"name": s.name, "default": s.default, "value": os.environ.get(s.name), "doc": s.doc}
            for s in _DECLARED]
