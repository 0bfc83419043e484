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
