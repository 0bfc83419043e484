"""Decode GEMMs in Triton for a few rows: q/k/v with the q/k norms, RoPE and the cache write in one kernel
(`qkv_rope`), and o_proj with the residual added (`linear_residual`).

Split-K: each program takes a slice of the hidden size and the last of a tile's programs to finish adds the
slices up in order (fp32), so the result does not depend on which finished first. Under PDL a program may
prefetch its weight slice into L2 before it waits for the kernel before (small GEMMs only: tiles.py).
"""

from __future__ import annotations

from typing import Any

import torch

from .common import _after_previous, _dot, _prefetch_l2, _round, counts, jit, launch, row_stride, tl, triton
from .attention import identity_table
from .rope_cache import _norm_rope
from .tiles import DEFAULT, Tiles, for_device


@jit
def _rows_gemm(x_ptr, w_rows, N, s, K: tl.constexpr, KS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               EXACT: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr):
    """The decode GEMMs' main loop: fp32 [BT, rows] = x[:N, slice s] @ (weight rows starting at `w_rows`,
    each K long)[slice s].T, slice s being KS elements. With PDL (and LINES) each row's first LINES lines
    of the slice are asked of L2 before the wait for the kernel before, which x comes from."""
    if PDL and LINES > 0:
        lines = tl.minimum(s * KS + tl.arange(0, LINES) * LINE, K - 1)
        _prefetch_l2(w_rows[:, None] + lines[None, :])
    _after_previous(PDL)
    t = tl.arange(0, BT)
    acc = tl.zeros([BT, w_rows.shape[0]], dtype=tl.float32)
    for k0 in range(0, KS, BK):
        k = s * KS + k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=t[:, None] < N, other=0.0)
        acc = _dot(x, tl.load(w_rows[None, :] + k[:, None]), acc, EXACT)
    return acc


@jit
def _split_k_last(part_ptr, cnt_ptr, acc, slot, slots, rows, cols, BT: tl.constexpr, BN: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Split-K bookkeeping of the decode GEMMs: program (slot, s) leaves its fp32 sums [BT, BN] in
    part [SPLIT, slots, BT, BN] and counts itself in (an atomic per slot, put back to zero by the last,
    for the next call and the next graph replay). Returns whether this program is the last of its
    slot's SPLIT, which then reads the sums back in order (the same bits whichever finished last)."""
    s = tl.program_id(1)
    tl.store(part_ptr + ((s * slots + slot) * BT + rows[:, None]) * BN + cols[None, :], acc)
    tl.debug_barrier()  # every thread's sums written before the count says so (release)
    last = tl.atomic_add(cnt_ptr + slot, 1, sem="acq_rel") == SPLIT - 1
    if last:
        tl.store(cnt_ptr + slot, 0)
    return last


@jit
def _split_k_sum(part_ptr, slot, slots, rows, cols, BT: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    """The SPLIT partial sums of `_split_k_last`, added in slice order (.cg: from L2, where they were
    written); `cols` may be any subset of the BN columns."""
    acc = tl.zeros([BT, cols.shape[0]], dtype=tl.float32)
    for j in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + ((j * slots + slot) * BT + rows[:, None]) * BN + cols[None, :],
                       cache_modifier=".cg")
    return acc


@jit
def _qkv_rope(x_ptr, w_ptr, bias_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, table_ptr, part_ptr, cnt_ptr,
              qo_ptr, kc_ptr, vc_ptr, N, HQ, HK, PAGE, PAGES, sc_b, POS_B, eps, H: tl.constexpr, HALF: tl.constexpr,
              BT: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr,
              EXACT: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr):
    """A decode step's q/k/v projection and `_qk_rope_cache` in one kernel (one new token per sequence,
    N <= BT sequences): program (c, s) multiplies hidden slice s of SPLIT by the 2*HALF weight rows of
    output head c (q heads, then k, then v, as in the merged weight); the last of a head's programs adds
    the slices up, rounds as F.linear does, and normalises, rotates and writes the head where
    `_qk_rope_cache` would. With PDL the weight slice is asked of L2 before the wait, while the kernel
    before (a norm, an all-reduce) finishes."""
    D: tl.constexpr = 2 * HALF
    KS: tl.constexpr = H // SPLIT  # the wrapper checks that BK divides it
    ty = qo_ptr.dtype.element_ty
    c = tl.program_id(0)
    s = tl.program_id(1)
    heads = tl.num_programs(0)
    d = tl.arange(0, D)
    t = tl.arange(0, BT)
    acc = _rows_gemm(x_ptr, w_ptr + (c * D + d).to(tl.int64) * H, N, s, H, KS, BT, BK, EXACT, PDL, LINE, LINES)
    # the halves of each head go through the partial sums (a register tile cannot be cut in two)
    last = _split_k_last(part_ptr, cnt_ptr, acc, c, heads, t, d, BT, D, SPLIT)
    if last:
        o = tl.arange(0, HALF)
        y1 = _split_k_sum(part_ptr, c, heads, t, o, BT, D, SPLIT)
        y2 = _split_k_sum(part_ptr, c, heads, t, HALF + o, BT, D, SPLIT)
        if BIAS:  # Qwen2: F.linear adds the bias before it rounds
            y1 += tl.load(bias_ptr + c * D + o)[None, :].to(tl.float32)
            y2 += tl.load(bias_ptr + c * D + HALF + o)[None, :].to(tl.float32)
        y1, y2 = _round(y1, ty), _round(y2, ty)
        seq = t[:, None]
        pos = tl.load(pos_ptr + seq * POS_B, mask=seq < N, other=0)
        page = tl.load(table_ptr + seq * PAGES + pos // PAGE, mask=seq < N, other=0).to(tl.int64)
        slot = page * HK * PAGE + pos % PAGE  # kv head 0's slot; kv_cache.py
        if c < HQ + HK:  # a query or key head: normalised and rotated
            co = seq * sc_b + o[None, :]
            is_q = c < HQ
            y1, y2 = _norm_rope(y1, y2, tl.where(is_q, qw_ptr, kw_ptr), tl.load(cos_ptr + co).to(tl.float32),
                                tl.load(cos_ptr + HALF + co).to(tl.float32), tl.load(sin_ptr + co).to(tl.float32),
                                tl.load(sin_ptr + HALF + co).to(tl.float32), eps, HALF, NORM, ty)
            dst = tl.where(is_q, qo_ptr + (seq * HQ + c) * D, kc_ptr + (slot + (c - HQ) * PAGE) * D)
        else:  # a value head: into its cache slot as it is
            dst = vc_ptr + (slot + (c - HQ - HK) * PAGE) * D
        tl.store(dst + o[None, :], y1.to(ty), mask=seq < N)
        tl.store(dst + HALF + o[None, :], y2.to(ty), mask=seq < N)


@jit
def _linear_residual(x_ptr, w_ptr, res_ptr, out_ptr, part_ptr, cnt_ptr, sq_ptr, N, NOUT, K: tl.constexpr,
                     BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                     RESIDUAL: tl.constexpr, ROW_SQ: tl.constexpr, EXACT: tl.constexpr, PDL: tl.constexpr,
                     LINE: tl.constexpr, LINES: tl.constexpr):
    """out = (residual +) x @ w.T for decode-sized x [N <= BT, K], rounded once (as addmm): program
    (tile, s) sums K slice s of SPLIT for BN output columns; the last of a tile's programs adds the
    slices and the residual. The residual may be `out` itself (each element is read and written by one
    program). With PDL the weight slice is asked of L2 before the wait. ROW_SQ: each tile also leaves
    its rows' sums of squares (of the rounded output) in sq [N, tiles], for the RMSNorm that reads out
    next (`_router` with PRENORM)."""
    KS: tl.constexpr = K // SPLIT
    tile = tl.program_id(0)
    s = tl.program_id(1)
    j = tile * BN + tl.arange(0, BN)
    jc = tl.minimum(j, NOUT - 1)  # columns past NOUT read the last row (never stored)
    t = tl.arange(0, BT)
    acc = _rows_gemm(x_ptr, w_ptr + jc.to(tl.int64) * K, N, s, K, KS, BT, BK, EXACT, PDL, LINE, LINES)
    last = True
    if SPLIT > 1:
        last = _split_k_last(part_ptr, cnt_ptr, acc, tile, tl.num_programs(0), t, tl.arange(0, BN), BT, BN, SPLIT)
        if last:
            acc = _split_k_sum(part_ptr, tile, tl.num_programs(0), t, tl.arange(0, BN), BT, BN, SPLIT)
    if last:
        at = t[:, None] * NOUT + j[None, :]
        m = (t[:, None] < N) & (j[None, :] < NOUT)
        if RESIDUAL:
            acc += tl.load(res_ptr + at, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=m)
        if ROW_SQ:
            y = tl.where(j[None, :] < NOUT, _round(acc, out_ptr.dtype.element_ty), 0.0)
            tl.store(sq_ptr + t * tl.num_programs(0) + tile, tl.sum(y * y, 1), mask=t < N)


def split(tiles_n: int, k: int, programs: int, bk: int = DEFAULT.linear_bk) -> int:
    """Hidden slices for a decode GEMM of `tiles_n` output tiles: the largest power of two that keeps the
    programs at most `programs` and every slice at least two `bk` steps (and a whole number of them).

    >>> [split(heads, 2048, DEFAULT.qkv_programs) for heads in (40, 20, 10)]  # q/k/v at TP = 1, 2, 4
    [2, 4, 8]
    >>> [split(64, k, DEFAULT.proj_programs) for k in (4096, 2048, 1024)]  # o_proj at TP = 1, 2, 4
    [8, 8, 4]
    """
    n = 1
    while tiles_n * n * 2 <= programs and k % (n * 2 * bk) == 0 and k // (n * 2) >= 2 * bk:
        n *= 2
    return n


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the decode GEMM kernels take x [rows, k] @ weight.T: few rows, one dtype, contiguous."""
    t = for_device(x.device)
    return (x.dim() == 2 and x.shape[0] <= t.linear_max_tokens and x.shape[1] % t.linear_bk == 0
            and x.is_contiguous() and weight.is_contiguous() and weight.dtype == x.dtype)


def _prefetch_lines(t: Tiles, weight: torch.Tensor, k: int) -> int:
    """128-byte lines of each weight row's slice of `k` elements to prefetch (see Tiles.linear_prefetch_bytes)."""
    if weight.numel() * weight.element_size() > t.linear_prefetch_bytes:
        return 0
    line = 128 // weight.element_size()
    return min(t.linear_prefetch, triton.next_power_of_2(triton.cdiv(k, line)))


def _shapes(x: torch.Tensor, t: Tiles, shape: tuple[int, ...] | None, warps: int) -> dict[str, Any]:
    bt = max(16, triton.next_power_of_2(x.shape[0]))
    exact = not x.is_cuda or x.dtype == torch.float32
    if not x.is_cuda:  # the interpreter: small steps for the tiny test models
        return dict(BT=bt, BK=32, EXACT=exact, num_warps=4, num_stages=1)
    bk, warps, stages = shape or (t.linear_bk, warps, t.linear_stages)
    return dict(BT=bt, BK=bk, EXACT=exact, num_warps=warps, num_stages=stages)


def qkv_rope(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: list[int], q_norm: Any,
             k_norm: Any, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slices: int | None = None, shape: tuple[int, int, int] | None = None,
             pdl: bool = False, table: torch.Tensor | None = None) -> torch.Tensor:
    """q/k/v = x @ weight.T (+ bias) for one new token per sequence (x [b, hidden], the merged weight of
    `heads` = [q, k, v] heads), then the rope_cache arithmetic: writes k and v into the caches at `pos` ([b]:
    each sequence's own slot; one element: shared; caches and `table` as rope_cache.qk_rope_cache takes them) and
    returns q as [b, q heads, 1, head_dim]. One kernel (`_qkv_rope`). `slices` / `shape` = (BK, warps,
    stages) override the hidden slices and tile shape (bench/decode_linear.py sweeps them)."""
    b, hidden = x.shape
    hq, hk, _ = heads
    d = weight.shape[0] // sum(heads)
    n = sum(heads)
    t = for_device(x.device)
    cfg = _shapes(x, t, shape, t.qkv_warps)
    slices = slices or split(n, hidden, t.qkv_programs, cfg["BK"])
    if hidden % (slices * cfg["BK"]):
        raise ValueError(f"hidden size {hidden} is not {slices} slices of {cfg['BK']}")
    q_out = torch.empty((b, hq, 1, d), dtype=x.dtype, device=x.device)
    part = torch.empty((slices, n, cfg["BT"], d), dtype=torch.float32, device=x.device)
    norm = q_norm is not None
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    if table is None:
        table = identity_table(b, x.device)
    _qkv_rope[(n, slices)](
        x, weight, bias if bias is not None else weight, q_norm.weight if norm else x, k_norm.weight if norm else x,
        cos, sin, pos, table, part, counts(x.device, n, "qkv"), q_out, k_cache, v_cache, b, hq, hk, k_cache.shape[2],
        table.stride(0), cos_b, row_stride(pos, b), float(q_norm.variance_epsilon) if norm else 0.0, H=hidden,
        HALF=d // 2, SPLIT=slices, NORM=norm, BIAS=bias is not None, LINE=128 // weight.element_size(),
        LINES=_prefetch_lines(t, weight, hidden // slices), **cfg, **launch(pdl))
    return q_out


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, slices: int | None = None, bn: int | None = None,
                    shape: tuple[int, int, int] | None = None, row_sq: bool = False, pdl: bool = False) -> Any:
    """(residual +) x @ weight.T for decode-sized x [rows, k], rounded once as addmm; into `out` (which may
    be `residual` itself: the one-GPU step adds o_proj into the hidden state in place). One kernel
    (`_linear_residual`); `slices`, `bn` and `shape` = (BK, warps, stages) override its shapes. `row_sq`:
    returns (out, sq), sq [rows, column tiles] the partial sums of out's rows' squares (for the router
    kernel, which applies the RMSNorm from them)."""
    rows, k = x.shape
    nout = weight.shape[0]
    t = for_device(x.device)
    cfg = _shapes(x, t, shape, t.proj_warps)
    bn = bn or (t.proj_bn if x.is_cuda else 16)
    tiles_n = triton.cdiv(nout, bn)
    slices = slices or split(tiles_n, k, t.proj_programs, cfg["BK"])
    if k % (slices * cfg["BK"]):
        raise ValueError(f"input size {k} is not {slices} slices of {cfg['BK']}")
    out = torch.empty((rows, nout), dtype=x.dtype, device=x.device) if out is None else out
    part = torch.empty((slices, tiles_n, cfg["BT"], bn), dtype=torch.float32, device=x.device) if slices > 1 else out
    sq = torch.empty((rows, tiles_n), dtype=torch.float32, device=x.device) if row_sq else part
    _linear_residual[(tiles_n, slices)](
        x, weight, residual if residual is not None else out, out, part, counts(x.device, tiles_n, "linear"), sq,
        rows, nout, K=k, BN=bn, SPLIT=slices, RESIDUAL=residual is not None, ROW_SQ=row_sq,
        LINE=128 // weight.element_size(), LINES=_prefetch_lines(t, weight, k // slices), **cfg, **launch(pdl))
    return (out, sq) if row_sq else out
