"""The MoE router in one kernel: softmax, top-k, renormalisation and the cast (6 kernels in transformers),
for decode-sized calls with the router's GEMM too (`router`), and on one GPU also the post-attention RMSNorm
from the sums of squares o_proj left (linear.linear_residual(row_sq=True)).
"""

from __future__ import annotations

from typing import Any

import torch

from .common import _after_previous, _dot, _prefetch_l2, _round, counts, jit, launch, tl, triton
from .tiles import for_device


@jit
def _top_k(p, e, K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """The K largest of each row of p [rows, BLOCK_E] (softmax probabilities; e: the column ids), largest
    first, and their columns; renormalised to sum to one if NORM (Qwen3MoeTopKRouter's norm_topk_prob)."""
    ks = tl.arange(0, BLOCK_K)
    vals = tl.zeros([p.shape[0], BLOCK_K], dtype=tl.float32)
    idxs = tl.zeros([p.shape[0], BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(p, 1)
        at = tl.argmax(p, 1)
        vals = tl.where(ks[None, :] == j, best[:, None], vals)
        idxs = tl.where(ks[None, :] == j, at[:, None].to(tl.int64), idxs)
        p = tl.where(e[None, :] == at[:, None], -1.0, p)
    if NORM:
        vals = vals / tl.sum(vals, 1)[:, None]
    return vals, idxs


@jit
def _route(logits_ptr, w_ptr, idx_ptr, E, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
           NORM: tl.constexpr, PDL: tl.constexpr):
    """softmax (fp32) -> top-k -> renormalise -> cast, one token per program (Qwen3MoeTopKRouter)."""
    _after_previous(PDL)
    ty = w_ptr.dtype.element_ty
    n = tl.program_id(0)
    o = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + n * E + o, mask=o < E, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, 0))
    vals, idxs = _top_k((e / tl.sum(e, 0))[None, :], o, K, BLOCK_K, NORM)
    ks = tl.arange(0, BLOCK_K)[None, :]
    tl.store(w_ptr + n * K + ks, vals.to(ty), mask=ks < K)
    tl.store(idx_ptr + n * K + ks, idxs, mask=ks < K)


@jit
def _router(x_ptr, g_ptr, part_ptr, cnt_ptr, w_ptr, idx_ptr, nw_ptr, xn_ptr, sq_ptr, pos_ptr, N, E, SQ, eps, idle,
            H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
            SPLIT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
            PRENORM: tl.constexpr, BSQ: tl.constexpr, EXACT: tl.constexpr, PDL: tl.constexpr,
            LINE: tl.constexpr, LINES: tl.constexpr, SKIP: tl.constexpr):
    """The router GEMM and `_route` in one kernel, for up to BT tokens: program (b, s) sums hidden slice s
    of SPLIT for experts b*BE.. (fp32, into `part` [SPLIT, BT, BLOCK_E]); the last program to finish (an
    atomic count, put back to zero) adds the slices in order, rounds the logits to the model dtype as
    F.linear does, and routes every token. With PDL the gate's rows are asked of L2 before the wait.
    PRENORM (one GPU, where no all-reduce normalises): x is the un-normalised hidden state and sq [N, SQ]
    the partial sums of its rows' squares that the kernel before left (`_linear_residual` with ROW_SQ);
    every program adds them up in order, normalises its slice (rounded once, as F.rms_norm), and the
    programs of expert block 0 write the slices into xn for the experts' kernels.
    SKIP: tokens whose pos is `idle` (a decode step's rows that do not decode) get expert id -1, which the
    experts' kernels skip: their garbage tokens would otherwise bring experts of their own to read."""
    ty = w_ptr.dtype.element_ty
    b = tl.program_id(0)
    s = tl.program_id(1)
    ex = b * BE + tl.arange(0, BE)
    KS: tl.constexpr = H // SPLIT  # the wrapper checks that BK divides it
    if PDL:
        lines = tl.minimum(s * KS + tl.arange(0, LINES) * LINE, H - 1)
        _prefetch_l2(g_ptr + tl.minimum(ex, E - 1)[:, None] * H + lines[None, :])
    _after_previous(PDL)
    t = tl.arange(0, BT)
    rows = t[:, None] < N
    if PRENORM:  # a pass over the rows here took 7 us at 16 rows (H200): the sums come from o_proj
        q = tl.arange(0, BSQ)
        ss = tl.sum(tl.load(sq_ptr + t[:, None] * SQ + q[None, :], mask=rows & (q[None, :] < SQ), other=0.0), 1)
        rstd = (1.0 / tl.sqrt(ss / H + eps))[:, None]
    acc = tl.zeros([BT, BE], dtype=tl.float32)
    for k0 in range(0, KS, BK):
        k = s * KS + k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + t[:, None] * H + k[None, :], mask=rows, other=0.0)
        if PRENORM:
            x = (x.to(tl.float32) * rstd * tl.load(nw_ptr + k)[None, :].to(tl.float32)).to(x.dtype)
            if b == 0:
                tl.store(xn_ptr + t[:, None] * H + k[None, :], x, mask=rows)
        g = tl.load(g_ptr + ex[None, :] * H + k[:, None], mask=ex[None, :] < E, other=0.0)
        acc = _dot(x, g, acc, EXACT)
    tl.store(part_ptr + (s * BT + t[:, None]) * BLOCK_E + ex[None, :], acc)
    tl.debug_barrier()  # every thread's sums written before the count says so (release)
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == tl.num_programs(0) * SPLIT - 1
    if last:
        tl.store(cnt_ptr, 0)  # for the next call (and the next replay of a CUDA graph)
        e = tl.arange(0, BLOCK_E)
        logits = tl.zeros([BT, BLOCK_E], dtype=tl.float32)
        for j in tl.static_range(SPLIT):  # .cg: from L2, where the other programs wrote
            logits += tl.load(part_ptr + (j * BT + t[:, None]) * BLOCK_E + e[None, :], cache_modifier=".cg")
        x = tl.where(e[None, :] < E, _round(logits, ty), float("-inf"))
        p = tl.exp(x - tl.max(x, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        vals, idxs = _top_k(p, e, K, BLOCK_K, NORM)
        if SKIP:
            skip = tl.load(pos_ptr + t, mask=t < N, other=0) == idle
            idxs = tl.where(skip[:, None], -1, idxs)
        ks = tl.arange(0, BLOCK_K)
        out = (t[:, None] < N) & (ks[None, :] < K)
        tl.store(w_ptr + t[:, None] * K + ks[None, :], vals.to(ty), mask=out)
        tl.store(idx_ptr + t[:, None] * K + ks[None, :], idxs, mask=out)


def route(logits: torch.Tensor, top_k: int, normalise: bool,
          pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, k] in the logits' dtype, expert ids [n, k] int64) from router logits [n, E]."""
    n, experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty((n, top_k), dtype=logits.dtype, device=logits.device)
    idx = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    _route[(n,)](logits, weights, idx, experts, K=top_k, BLOCK_E=triton.next_power_of_2(experts),
                 BLOCK_K=triton.next_power_of_2(top_k), NORM=normalise, **launch(pdl))
    return weights, idx


def _router_tiles(x: torch.Tensor) -> tuple[int, int, int]:
    # (experts per program, BK, hidden slices); the interpreter: small ones for the tiny test models
    return for_device(x.device).router_tiles if x.is_cuda else (16, 32, 2)


def router(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalise: bool,
           norm: tuple[torch.Tensor, float, torch.Tensor] | None = None,
           xn: torch.Tensor | None = None, pdl: bool = False,
           skip: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """route(x @ gate_weight.T, ...) in one kernel for up to Tiles.router_max_tokens rows of x [n, hidden].
    `norm` = (weight, eps, sq): x is the hidden state before the RMSNorm, which the kernel applies, with
    sq [n, parts] partial sums of its rows' squares (`linear_residual(row_sq=...)`), writing the
    normalised rows into `xn` (the experts' input). `skip` = (pos [n], idle): rows at position `idle` get
    expert ids -1 (for the decode experts' kernels, which skip them; not for torch's experts)."""
    n, hidden = x.shape
    experts = gate_weight.shape[0]
    be, bk, split = _router_tiles(x)
    bt, block_e = max(16, triton.next_power_of_2(n)), max(be, triton.next_power_of_2(experts))
    part = torch.empty((split, bt, block_e), dtype=torch.float32, device=x.device)
    weights = torch.empty((n, top_k), dtype=x.dtype, device=x.device)
    idx = torch.empty((n, top_k), dtype=torch.int64, device=x.device)
    line = 128 // gate_weight.element_size()
    nw, eps, sq = norm or (x, 0.0, part)
    pos, idle = skip or (idx, 0)
    _router[(triton.cdiv(experts, be), split)](
        x, gate_weight, part, counts(x.device, 1, "router"), weights, idx, nw, xn if xn is not None else x, sq, pos,
        n, experts, sq.shape[-1], float(eps), idle, H=hidden, K=top_k, BT=bt, BE=be, BK=bk, SPLIT=split,
        BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), NORM=normalise, PRENORM=norm is not None,
        BSQ=triton.next_power_of_2(sq.shape[-1]),
        EXACT=not x.is_cuda or x.dtype == torch.float32, LINE=line,
        LINES=triton.next_power_of_2(triton.cdiv(hidden // split, line)), SKIP=skip is not None, **launch(pdl))
    return weights, idx


def _qwen3_router(gate: Any) -> bool:
    return hasattr(gate, "top_k") and hasattr(gate, "norm_topk_prob") and gate.weight.shape[0] == getattr(
        gate, "num_experts", -1)


def router_fits(gate: Any, flat: torch.Tensor) -> bool:
    """Whether `router` takes this transformers MoE router and input (Qwen3-style top-k, decode-sized)."""
    _, bk, split = _router_tiles(flat)
    return (_qwen3_router(gate) and flat.shape[0] <= for_device(flat.device).router_max_tokens and flat.is_contiguous()
            and flat.shape[1] % (bk * split) == 0 and gate.weight.is_contiguous() and gate.weight.dtype == flat.dtype)


def gate_route(gate: Any, flat: torch.Tensor, pdl: bool = False,
               skip: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) of a transformers MoE router: fused kernels for Qwen3-style top-k routers (the GEMM
    too for decode-sized calls). `skip`: as `router`'s."""
    if router_fits(gate, flat):
        return router(flat, gate.weight, gate.top_k, bool(gate.norm_topk_prob), pdl=pdl, skip=skip)
    if _qwen3_router(gate):
        weights, idx = route(torch.nn.functional.linear(flat, gate.weight), gate.top_k, bool(gate.norm_topk_prob), pdl)
    else:
        _, weights, idx = gate(flat)
    if skip is not None:
        idx = idx.masked_fill(skip[0][:, None] == skip[1], -1)
    return weights, idx
