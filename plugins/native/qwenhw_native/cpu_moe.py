"""The CPU experts kernel (cpu_moe.c): built once per machine with the system C compiler, called via ctypes.

Built with `-march=native`, so it uses AVX512-BF16 dot products where the CPU has them and plain vectorised
fp32 arithmetic elsewhere. It is optional: without a compiler (or with KernelConfig.cpu_kernel off) the hybrid
engine falls back to torch GEMVs and says why in its stats. The shared object binds to the OpenMP runtime
torch already loaded (same soname), so there is one thread team in the process, not two.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from qwenhw import settings

SOURCE = Path(__file__).with_name("cpu_moe.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
MAX_TOKENS = 256

_loaded: tuple[ctypes.CDLL | None, str] | None = None


def cache_dir() -> Path:
    return settings.cache_root() / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders (ranks, tests) never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not). Cached per process; the build is cached per machine."""
    global _loaded
    if _loaded is not None:
        return _loaded
    prebuilt = settings.get("QWENHW_CPU_KERNEL_LIB")  # a build made elsewhere, for hosts without a compiler
    if prebuilt:
        return _open(Path(prebuilt))
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _loaded = (None, "no C compiler (cc/gcc) on PATH; install gcc for the fused CPU experts kernel")
        return _loaded
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / f"cpu_moe-{key[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, target)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        _loaded = (None, f"building the CPU experts kernel failed: {detail.strip()[:300]}")
        return _loaded
    return _open(target)


def _open(path: Path) -> tuple[ctypes.CDLL | None, str]:
    global _loaded
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        _loaded = (None, f"loading the CPU experts kernel {path} failed: {exc}")
        return _loaded
    fn = lib.qwenhw_moe_experts
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    _loaded = (lib, "")
    return _loaded


def usable(gate_up: torch.Tensor, down: torch.Tensor) -> str:
    """Why the kernel cannot run these expert weights ("" when it can)."""
    lib, why = load()
    if lib is None:
        return why
    if gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16:
        return f"the kernel runs bf16 experts, these are {gate_up.dtype}"
    if not (gate_up.is_contiguous() and down.is_contiguous()) or gate_up.device.type != "cpu":
        return "expert weights must be contiguous host tensors"
    return ""


def moe_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor, out: torch.Tensor, skip: torch.Tensor | None = None,
                counts: torch.Tensor | None = None, threads: int | None = None) -> int:
    """out[t] = sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) over experts not marked in `skip`.

    gate_up [E, 2I, H], down [E, H, I], x [T, H], weights [T, K] (bf16); idx [T, K] int64; out [T, H] bf16;
    skip [E] uint8; counts [E] int64, incremented per routed token. Returns the number of skipped pairs.
    """
    why = usable(gate_up, down)
    if why:
        raise RuntimeError(why)
    lib = load()[0]
    E, two_i, H = gate_up.shape
    T, K = idx.shape
    if T > MAX_TOKENS:
        raise ValueError(f"the CPU experts kernel takes up to {MAX_TOKENS} tokens a call, got {T}")
    if x.shape != (T, H) or weights.shape != (T, K) or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bf16 [{T}, {H}] and weights [{T}, {K}] for idx {list(idx.shape)}, got "
                         f"{x.dtype} {list(x.shape)} and {list(weights.shape)}")
    if out.shape != (T, H) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bf16 [{T}, {H}] tensor, got {out.dtype} {list(out.shape)}")
    for name, t, dtype in (("skip", skip, torch.uint8), ("counts", counts, torch.int64)):
        if t is not None and (t.shape != (E,) or t.dtype != dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {dtype} [{E}] tensor")
    x, idx = x.contiguous(), idx.contiguous().to(torch.int64)
    weights = weights.contiguous().to(torch.bfloat16)
    rc = lib.qwenhw_moe_experts(gate_up.data_ptr(), down.data_ptr(), E, H, two_i // 2, x.data_ptr(), T,
                                idx.data_ptr(), weights.data_ptr(), K,
                                None if skip is None else skip.data_ptr(),
                                None if counts is None else counts.data_ptr(), out.data_ptr(),
                                int(threads or torch.get_num_threads()))
    if rc < 0:
        raise ValueError(f"CPU experts kernel: expert index out of range 0..{E - 1}" if rc == -1
                         else f"CPU experts kernel failed ({rc})")
    return rc


def fastest_threads(gate_up: torch.Tensor, down: torch.Tensor, threads: int, repeats: int = 6) -> dict:
    """The thread count among `threads`, /2 and /4 at which one token's top-8 experts (of these matrices)
    run fastest, with each one's median milliseconds. Core counts can mislead: on a 64-vCPU host (4x H200)
    the kernel took 6.4 ms per layer at 64 threads and 0.62 ms at 32 (docs/benchmarks.md); vCPUs sharing
    cores or a container's CPU quota do that. A few calls settle it."""
    import statistics
    import time

    E, _, H = gate_up.shape
    k = min(8, E)
    x = torch.randn(1, H).to(torch.bfloat16)
    w = torch.full((1, k), 1.0 / k).to(torch.bfloat16)
    out = torch.empty(1, H, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    times = {}
    for n in sorted({max(1, threads // d) for d in (1, 2, 4)}, reverse=True):
        runs = []
        for _ in range(repeats):
            idx = torch.randperm(E, generator=gen)[:k][None]
            start = time.perf_counter()
            moe_experts(gate_up, down, x, idx, w, out, threads=n)
            runs.append(time.perf_counter() - start)
        times[n] = statistics.median(runs[1:]) * 1e3  # the first call wakes the threads
    return {"threads": min(times, key=times.get), "ms": times}
