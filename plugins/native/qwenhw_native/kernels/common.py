"""What every decode kernel shares: Triton (optional), whether the fused kernels can run on a device, the
dependent-launch switch, Triton helpers, and the per-device counters of kernels whose last program finishes.

The kernels follow transformers' Qwen3 arithmetic, rounding to the model dtype where it rounds. On CUDA they
compile; on the CPU the tests run them through Triton's interpreter (TRITON_INTERPRET=1, read by Triton when
these modules are imported).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the runtime falls back to torch
    triton = tl = None


def jit(fn: Callable) -> Any:
    """triton.jit where Triton is installed; without it the kernel is never launched (`available` is False)."""
    return triton.jit(fn) if triton is not None else fn


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA, or the CPU under Triton's interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def row_stride(pos: torch.Tensor, rows: int) -> int:
    """How far apart the decode kernels read each sequence's position in `pos`: 1 for one position per
    sequence (continuous batching: each row at its own length), 0 for one position shared by all."""
    return 1 if rows > 1 and pos.numel() == rows else 0


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (CUDA, compute capability 9.0 and later, Triton 3.3 and later): a decode
    kernel's programs may start while the kernel before it is finishing, and wait (griddepcontrol.wait)
    before they read anything it wrote; before that they touch weights only. It hides the gap between two
    kernels of a step, a large part of each at decode sizes. Kept in CUDA graphs as programmatic edges."""
    if device.type != "cuda" or not _triton_pdl():
        return False
    return _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def _triton_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and hasattr(cuda, "gdc_wait")


def launch(pdl: bool) -> dict[str, Any]:
    """A kernel's PDL switch and Triton's launch option, which go together (see `pdl_supported`)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


_COUNTS: dict[tuple[torch.device, str], torch.Tensor] = {}


def counts(device: torch.device, n: int, kernel: str) -> torch.Tensor:
    """Zeroed int32 counters for a kernel whose last program finishes the work (split-K GEMMs, the router),
    kept per device: each call leaves them at zero, so a tensor made once (outside any CUDA graph capture:
    the runtime's warm-up calls come first) serves every call and replay. Grown, never shrunk."""
    have = _COUNTS.get((device, kernel))
    if have is None or have.numel() < n:
        _COUNTS[(device, kernel)] = have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return have


@jit
def _round(x, ty: tl.constexpr):
    return x.to(ty).to(tl.float32)


@jit
def _after_previous(PDL: tl.constexpr):
    """With PDL (see `pdl`): wait until the kernel before has finished and flushed its writes (and so,
    through its own wait, every earlier one), then let the next kernel's programs start launching."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs` (no registers, no wait): weights a program will read once
    the kernel before it has finished."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                              pack=1)


@jit
def _dot(a, b, acc, EXACT: tl.constexpr):
    """acc + a @ b with fp32 accumulation. EXACT (the CPU interpreter, whose bf16 dot is wrong): in fp32."""
    if EXACT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)
