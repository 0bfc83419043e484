"""The routed experts of a prompt pass: torch's grouped GEMMs (CUTLASS on Hopper) for the two projections, and
the element-wise work around them in two kernels instead of transformers' six (profiled on an H100, 16 x 2048
tokens: the gathers, the routing-weight multiply, the top-k sum and SiLU x up took 1.4x the grouped GEMMs'
time).

    pairs (token, j) sorted by expert; x = flat[their tokens]     one gather
    gate_up = grouped_mm(x, W_gate_up^T)                          [pairs, 2I]
    act = silu(gate) * up                                          _silu_mul, one pass
    down = grouped_mm(act, W_down^T)                               [pairs, H]
    out[t] = (residual[t] +) sum_j w[t, j] * down[where (t, j) went]   _combine, one pass, fp32 sums
"""

from __future__ import annotations

from typing import Any

import torch

from .common import _round, jit, tl, triton


@jit
def _silu_mul(gu_ptr, out_ptr, I, BLOCK: tl.constexpr):
    """One pair's row: silu(gate) rounded to the model dtype, times up (transformers' two ops, one pass)."""
    ty = out_ptr.dtype.element_ty
    s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(gu_ptr + s * 2 * I + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + s * 2 * I + I + c, mask=m, other=0.0).to(tl.float32)
    act = _round(g / (1.0 + tl.exp(-g)), ty)
    tl.store(out_ptr + s * I + c, (act * u).to(ty), mask=m)


@jit
def _combine(down_ptr, at_ptr, w_ptr, res_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr,
             RESIDUAL: tl.constexpr):
    """One token's hidden block: the routing-weighted sum of its K experts' rows (each row where the sort put
    its pair), in fp32, rounded once; then + the residual in the model dtype."""
    ty = out_ptr.dtype.element_ty
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(at_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * K + j).to(tl.float32)
        acc += _round(tl.load(down_ptr + row * H + c, mask=m, other=0.0).to(tl.float32) * w, ty).to(tl.float32)
    y = acc.to(ty)
    if RESIDUAL:
        y = (tl.load(res_ptr + t * H + c, mask=m, other=0.0).to(tl.float32) + y.to(tl.float32)).to(ty)
    tl.store(out_ptr + t * H + c, y, mask=m)


def experts(flat: torch.Tensor, module: Any, idx: torch.Tensor, weights: torch.Tensor,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """flat [tokens, H]; idx, weights [tokens, k] (the router's); module: transformers' fused experts
    (moe.supported). Returns the experts' weighted sum per token [tokens, H], plus `residual` if given."""
    tokens, hidden = flat.shape
    k = idx.shape[1]
    e, two_i, _ = module.gate_up_proj.shape
    ids, order = torch.sort(idx.reshape(-1))
    # pairs per expert; histc, not bincount: no device-to-host copy of the largest id
    counts = torch.histc(ids.to(torch.int32 if flat.is_cuda else torch.float32), bins=e, min=0, max=e - 1)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = flat[order // k]
    gate_up = torch._grouped_mm(x, module.gate_up_proj.transpose(-2, -1), offs=offsets)
    act = torch.empty((x.shape[0], two_i // 2), dtype=flat.dtype, device=flat.device)
    block = min(1024, triton.next_power_of_2(two_i // 2))
    _silu_mul[(x.shape[0], triton.cdiv(two_i // 2, block))](gate_up, act, two_i // 2, BLOCK=block)
    down = torch._grouped_mm(act, module.down_proj.transpose(-2, -1), offs=offsets)
    at = torch.empty_like(order)  # where each (token, j) pair's row went in the sort
    at[order] = torch.arange(order.numel(), device=flat.device)
    out = torch.empty_like(flat)
    block = min(1024, triton.next_power_of_2(hidden))
    _combine[(tokens, triton.cdiv(hidden, block))](
        down, at, weights.contiguous(), residual if residual is not None else flat, out, hidden, K=k, BLOCK=block,
        RESIDUAL=residual is not None)
    return out
