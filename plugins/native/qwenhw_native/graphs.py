"""CUDA graph capture for the decode steps, and its CPU stand-in (the tests walk the graph code paths)."""

from __future__ import annotations

from typing import Any, Callable

import torch


class Emulated:
    """Stands in for a CUDA graph: replay() re-runs the function and copies into the captured outputs."""

    def __init__(self, fn: Callable, outs: Any):
        self.fn, self.outs = fn, outs

    @classmethod
    def capture(cls, fn: Callable) -> tuple["Emulated", Any]:
        outs = fn()
        return cls(fn, outs), outs

    def replay(self) -> None:
        new = self.fn()
        pairs = zip(self.outs, new) if isinstance(new, tuple) else [(self.outs, new)]
        for static, fresh in pairs:
            if static is not fresh:
                static.copy_(fresh)


def capture(fn: Callable[[], torch.Tensor], pool: Any = None) -> tuple[Any, torch.Tensor]:
    """Warm up on a side stream (as CUDA graphs require), then capture `fn` once.

    Graphs of one runtime share a memory pool: they replay in capture order, one at a time, so one graph's
    temporaries may reuse another's (49 private pools held ~1.4 GiB at 48 layers). Warm-ups share one side
    stream: cuBLAS keeps a workspace per stream it has run on, and torch hands out up to 32 pooled streams
    (measured: ~0.9 GiB of workspaces for 48 layer graphs, each warmed up on a fresh stream).
    """
    stream = _warmup_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


_WARMUP: dict[int, Any] = {}


def _warmup_stream() -> Any:
    device = torch.cuda.current_device()
    if device not in _WARMUP:
        _WARMUP[device] = torch.cuda.Stream()
    return _WARMUP[device]


class Upload:
    """Host values into a device tensor the graphs read (`dst`), queued behind the kernels before without waiting
    for them: from pageable memory PyTorch's copy waits for every kernel queued before it (a stream sync), so a
    step's launch would wait for the step before. Goes through `buffers` pinned buffers in turn, each rewritten
    once its last copy has left it. On the CPU: a plain copy."""

    def __init__(self, dst: torch.Tensor, buffers: int = 2):
        self.dst = dst
        pinned = dst.is_cuda
        self._staging = [torch.empty(dst.shape, dtype=dst.dtype, pin_memory=True) for _ in range(buffers)] \
            if pinned else []
        self._copied = [torch.cuda.Event() for _ in self._staging]
        self._turn = 0

    def __call__(self, values: torch.Tensor) -> None:
        if not self._staging:
            self.dst.copy_(values)
            return
        self._turn = (self._turn + 1) % len(self._staging)
        stage, copied = self._staging[self._turn], self._copied[self._turn]
        copied.synchronize()  # this buffer's last copy has left it
        stage.copy_(values)
        self.dst.copy_(stage, non_blocking=True)
        copied.record()


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a device tensor, the copy queued behind the kernels before (through pinned memory, which
    torch keeps until the copy has left it) rather than waiting for them as a copy of pageable memory does."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
