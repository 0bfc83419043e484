"""Fused decode kernels (Triton) for the lean runtime on NVIDIA GPUs.

A decode step replays ~57 small kernels per layer, and every GPU of a multi-GPU layout replays all of them
(docs/benchmarks.md, kernel census). Three groups are mostly launch overhead at decode sizes:
- q/k RMSNorm + rotary embedding + the KV-cache write: 14 kernels per layer, here one;
- the MoE router's softmax, top-k, renormalisation and cast: 6 kernels per layer, here one, which for
  decode-sized calls also does the router's GEMM (`router`);
- the routed experts (transformers' grouped/batched kernels sort, gather, pad and scatter around the two
  GEMMs: ~15 kernels, plus 4 for the expert-parallel masking): here three, `moe_experts`.
Tensor-parallel decode steps also sum each row-parallel output over the GPUs and apply the RMSNorm that
reads it in one kernel (`reduce_norm_push`: each GPU pushes its partial sum into its peers' memory; or
`reduce_norm`, which reads theirs), over torch's symmetric memory. Where every GPU holds every expert, the
MoE kernels deal the experts a step touches out to the GPUs (`_dealt`).
On Hopper and later each kernel is launched dependent on the one before it (`pdl`), which hides most of
the gap between two kernels of a step.
All follow transformers' Qwen3 arithmetic, rounding to the model dtype where it rounds. The runtime uses
them for decode steps on CUDA when Triton is importable, and keeps its torch code everywhere else (prefill,
CPU). The CPU tests run these kernels through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the runtime falls back to torch
    triton = None


def available(device: torch.device) -> bool:
    if triton is None or os.environ.get("QWENHW_FUSED", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (CUDA, compute capability 9.0 and later): a decode kernel's programs may
    start while the kernel before it is finishing, and wait (griddepcontrol.wait) before they read anything
    it wrote; before that they touch weights only. It hides the gap between two kernels of a step, which
    at decode sizes is a large part of each (docs/benchmarks.md). Kept in CUDA graphs as programmatic
    edges. QWENHW_PDL=0 turns it off."""
    if device.type != "cuda" or os.environ.get("QWENHW_PDL", "1") == "0" or not _triton_pdl():
        return False
    return _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.lru_cache(maxsize=None)
def _triton_pdl() -> bool:
    """Whether this Triton launches with PDL (3.3 and later): older ones run the kernels without it."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and hasattr(cuda, "gdc_wait")


def _launch(device: torch.device) -> dict[str, Any]:
    """The kernels' PDL switch and Triton's launch option, which go together (see `pdl`)."""
    return {"PDL": True, "launch_pdl": True} if pdl(device) else {"PDL": False}


PAD_LINE = 32  # int32 flags per barrier slot in a signal pad: one 128-byte line (up to 32 ranks)

if triton is not None:

    @triton.jit
    def _round(x, ty: tl.constexpr):
        return x.to(ty).to(tl.float32)

    @triton.jit
    def _after_previous(PDL: tl.constexpr):
        """With PDL (see `pdl`): wait until the kernel before has finished and flushed its writes (and so,
        through its own wait, every earlier one), then let the next kernel's programs start launching."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _prefetch_l2(ptrs):
        """Ask L2 for the 128-byte lines at `ptrs` (no registers, no wait): weights a program will read once
        the kernel before it has finished."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                                  pack=1)

    @triton.jit
    def _norm_rope(x1, x2, w_ptr, c1, c2, s1, s2, eps, HALF: tl.constexpr, NORM: tl.constexpr, ty: tl.constexpr):
        """Rows [R, HALF] of a head's two halves (fp32, holding model-dtype values): Qwen3's q/k RMSNorm if NORM
        (normalise in fp32, round, then scale by the weight in the model dtype), then apply_rotary_pos_emb:
        x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)."""
        if NORM:
            o = tl.arange(0, HALF)[None, :]
            r = (1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps))[:, None]
            x1 = _round(_round(x1 * r, ty) * tl.load(w_ptr + o).to(tl.float32), ty)
            x2 = _round(_round(x2 * r, ty) * tl.load(w_ptr + HALF + o).to(tl.float32), ty)
        y1 = _round(_round(x1 * c1, ty) + _round(-x2 * s1, ty), ty)
        y2 = _round(_round(x2 * c2, ty) + _round(x1 * s2, ty), ty)
        return y1, y2

    @triton.jit
    def _qk_rope_cache(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr,
                       T, HQ, HK, MAX_LEN, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_t,
                       eps, HALF: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr):
        """One (token, head) per program: heads < HQ are query heads, the rest key heads (+ their values)."""
        _after_previous(PDL)
        ty = qo_ptr.dtype.element_ty
        bt = tl.program_id(0)
        h = tl.program_id(1)
        b = bt // T
        t = bt % T
        o = tl.arange(0, HALF)[None, :]  # one row: the head's two halves as [1, HALF]
        c1 = tl.load(cos_ptr + b * sc_b + t * sc_t + o).to(tl.float32)
        c2 = tl.load(cos_ptr + b * sc_b + t * sc_t + HALF + o).to(tl.float32)
        s1 = tl.load(sin_ptr + b * sc_b + t * sc_t + o).to(tl.float32)
        s2 = tl.load(sin_ptr + b * sc_b + t * sc_t + HALF + o).to(tl.float32)
        pos = tl.load(pos_ptr + t)
        is_q = h < HQ
        hk = h - HQ
        src = tl.where(is_q, q_ptr + b * sq_b + t * sq_t + h * sq_h, k_ptr + b * sk_b + t * sk_t + hk * sk_h)
        dst = tl.where(is_q, qo_ptr + ((b * HQ + h) * T + t) * 2 * HALF,
                       kc_ptr + ((b * HK + hk) * MAX_LEN + pos) * 2 * HALF)
        y1, y2 = _norm_rope(tl.load(src + o).to(tl.float32), tl.load(src + HALF + o).to(tl.float32),
                            tl.where(is_q, qw_ptr, kw_ptr), c1, c2, s1, s2, eps, HALF, NORM, ty)
        tl.store(dst + o, y1.to(ty))
        tl.store(dst + HALF + o, y2.to(ty))
        if not is_q:  # the value head goes to its cache slot unchanged
            vsrc = v_ptr + b * sv_b + t * sv_t + hk * sv_h
            vdst = vc_ptr + ((b * HK + hk) * MAX_LEN + pos) * 2 * HALF
            tl.store(vdst + o, tl.load(vsrc + o))
            tl.store(vdst + HALF + o, tl.load(vsrc + HALF + o))

    @triton.jit
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

    @triton.jit
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

    @triton.jit
    def _split_k_sum(part_ptr, slot, slots, rows, cols, BT: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
        """The SPLIT partial sums of `_split_k_last`, added in slice order (.cg: from L2, where they were
        written); `cols` may be any subset of the BN columns."""
        acc = tl.zeros([BT, cols.shape[0]], dtype=tl.float32)
        for j in tl.static_range(SPLIT):
            acc += tl.load(part_ptr + ((j * slots + slot) * BT + rows[:, None]) * BN + cols[None, :],
                           cache_modifier=".cg")
        return acc

    @triton.jit
    def _qkv_rope(x_ptr, w_ptr, bias_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, part_ptr, cnt_ptr, qo_ptr,
                  kc_ptr, vc_ptr, N, HQ, HK, MAX_LEN, sc_b, eps, H: tl.constexpr, HALF: tl.constexpr,
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
            pos = tl.load(pos_ptr)
            seq = t[:, None]
            if c < HQ + HK:  # a query or key head: normalised and rotated
                co = seq * sc_b + o[None, :]
                is_q = c < HQ
                y1, y2 = _norm_rope(y1, y2, tl.where(is_q, qw_ptr, kw_ptr), tl.load(cos_ptr + co).to(tl.float32),
                                    tl.load(cos_ptr + HALF + co).to(tl.float32), tl.load(sin_ptr + co).to(tl.float32),
                                    tl.load(sin_ptr + HALF + co).to(tl.float32), eps, HALF, NORM, ty)
                dst = tl.where(is_q, qo_ptr + (seq * HQ + c) * D, kc_ptr + ((seq * HK + c - HQ) * MAX_LEN + pos) * D)
            else:  # a value head: into its cache slot as it is
                dst = vc_ptr + ((seq * HK + c - HQ - HK) * MAX_LEN + pos) * D
            tl.store(dst + o[None, :], y1.to(ty), mask=seq < N)
            tl.store(dst + HALF + o[None, :], y2.to(ty), mask=seq < N)

    @triton.jit
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

    @triton.jit
    def _route(logits_ptr, w_ptr, idx_ptr, E, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
               NORM: tl.constexpr, PDL: tl.constexpr):
        """softmax (fp32) -> top-k -> renormalise -> cast, one token per program (Qwen3MoeTopKRouter)."""
        _after_previous(PDL)
        ty = w_ptr.dtype.element_ty
        n = tl.program_id(0)
        o = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + n * E + o, mask=o < E, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - tl.max(x, 0))
        p = e / tl.sum(e, 0)
        ks = tl.arange(0, BLOCK_K)
        vals = tl.zeros([BLOCK_K], dtype=tl.float32)
        idxs = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.max(p, 0)
            at = tl.argmax(p, 0)
            vals = tl.where(ks == j, best, vals)
            idxs = tl.where(ks == j, at.to(tl.int64), idxs)
            p = tl.where(o == at, -1.0, p)
        if NORM:
            vals = vals / tl.sum(vals, 0)
        tl.store(w_ptr + n * K + ks, vals.to(ty), mask=ks < K)
        tl.store(idx_ptr + n * K + ks, idxs, mask=ks < K)

    @triton.jit
    def _router(x_ptr, g_ptr, part_ptr, cnt_ptr, w_ptr, idx_ptr, nw_ptr, xn_ptr, sq_ptr, N, E, SQ, eps,
                H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                PRENORM: tl.constexpr, BSQ: tl.constexpr, EXACT: tl.constexpr, PDL: tl.constexpr,
                LINE: tl.constexpr, LINES: tl.constexpr):
        """The router GEMM and `_route` in one kernel, for up to BT tokens: program (b, s) sums hidden slice s
        of SPLIT for experts b*BE.. (fp32, into `part` [SPLIT, BT, BLOCK_E]); the last program to finish (an
        atomic count, put back to zero) adds the slices in order, rounds the logits to the model dtype as
        F.linear does, and routes every token. With PDL the gate's rows are asked of L2 before the wait.
        PRENORM (one GPU, where no all-reduce normalises): x is the un-normalised hidden state and sq [N, SQ]
        the partial sums of its rows' squares that the kernel before left (`_linear_residual` with ROW_SQ);
        every program adds them up in order, normalises its slice (rounded once, as F.rms_norm), and the
        programs of expert block 0 write the slices into xn for the experts' kernels."""
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
            ks = tl.arange(0, BLOCK_K)
            vals = tl.zeros([BT, BLOCK_K], dtype=tl.float32)
            idxs = tl.zeros([BT, BLOCK_K], dtype=tl.int64)
            for j in tl.static_range(K):  # as `_route`, every token at once
                best = tl.max(p, 1)
                at = tl.argmax(p, 1)
                vals = tl.where(ks[None, :] == j, best[:, None], vals)
                idxs = tl.where(ks[None, :] == j, at[:, None].to(tl.int64), idxs)
                p = tl.where(e[None, :] == at[:, None], -1.0, p)
            if NORM:
                vals = vals / tl.sum(vals, 1)[:, None]
            out = (t[:, None] < N) & (ks[None, :] < K)
            tl.store(w_ptr + t[:, None] * K + ks[None, :], vals.to(ty), mask=out)
            tl.store(idx_ptr + t[:, None] * K + ks[None, :], idxs, mask=out)

    @triton.jit
    def _dot(a, b, acc, EXACT: tl.constexpr):
        """acc + a @ b with fp32 accumulation. EXACT (the CPU interpreter, whose bf16 dot is wrong): in fp32."""
        if EXACT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _pairs_of(ids_ptr, P, e, ep_start, c, BP: tl.constexpr, BM: tl.constexpr):
        """Rows c..c+BM of expert e's (token, slot) pairs, in pair order: (pair index, valid)."""
        p = tl.arange(0, BP)
        mine = (tl.load(ids_ptr + p, mask=p < P, other=-1) - ep_start) == e
        rank = tl.cumsum(mine.to(tl.int32), 0) - 1
        m = c + tl.arange(0, BM)
        sel = mine[None, :] & (rank[None, :] == m[:, None])
        pair = tl.sum(tl.where(sel, p[None, :], 0), 1)
        return pair, tl.sum(sel.to(tl.int32), 1) > 0

    @triton.jit
    def _or(a, b):
        return a | b

    @triton.jit
    def _popcount(x):
        """Set bits of each uint64 (SWAR: no intrinsic the interpreter lacks)."""
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        x = x + (x >> 8)
        x = x + (x >> 16)
        x = x + (x >> 32)
        return x & 0x7F

    @triton.jit
    def _touched(ids_ptr, P, ep_start, E, BP: tl.constexpr, NW: tl.constexpr):
        """Which of experts [ep_start, ep_start + E) the batch's pairs touch: bit e - ep_start of NW uint64 words."""
        p = tl.arange(0, BP)  # .cg: from L2; the down kernel reads the ids before its wait (never stale L1)
        loc = tl.load(ids_ptr + p, mask=p < P, other=-1, cache_modifier=".cg") - ep_start
        w = tl.arange(0, NW)
        one = tl.full([BP, NW], 1, tl.uint64)
        hit = ((loc >= 0) & (loc < E))[:, None] & ((loc // 64)[:, None] == w[None, :])
        bits = tl.where(hit, one << (tl.maximum(loc, 0) % 64).to(tl.uint64)[:, None], tl.zeros([BP, NW], tl.uint64))
        return tl.reduce(bits, 0, _or)

    @triton.jit
    def _nth_touched(words, k, NW: tl.constexpr):
        """The k-th (from 0) touched expert in id order, or -1 where fewer are touched."""
        e = tl.arange(0, NW * 64)
        w = tl.arange(0, NW)
        word = tl.reduce(tl.where((e // 64)[:, None] == w[None, :], words[None, :], tl.zeros([NW * 64, NW], tl.uint64)),
                         1, _or)
        hit = ((word >> (e % 64).to(tl.uint64)) & 1).to(tl.int32)
        found = (hit > 0) & (tl.cumsum(hit, 0) - 1 == k)
        return tl.where(tl.sum(found.to(tl.int32), 0) > 0, tl.sum(tl.where(found, e, 0), 0), -1)

    @triton.jit
    def _dealt(words, e, rank, SHARES: tl.constexpr, NW: tl.constexpr):
        """Whether expert e falls to `rank` when every rank holds every expert: the touched experts, in id
        order, are dealt to the SHARES ranks in turn, so none reads more than ceil(touched / SHARES)."""
        w = tl.arange(0, NW)
        low = (tl.full([NW], 1, tl.uint64) << (e % 64).to(tl.uint64)) - 1
        below = tl.where(w < e // 64, words, tl.where(w == e // 64, words & low, tl.zeros([NW], tl.uint64)))
        return (tl.sum(_popcount(below), 0) % SHARES) == rank

    @triton.jit
    def _slot_expert(ids_ptr, P, ep_start, E, rank, SHARES: tl.constexpr, BP: tl.constexpr, NW: tl.constexpr):
        """The local expert program slot `program_id(0)` computes, or -1: the MoE kernels' grids have a slot
        per expert the batch can touch (min(E, pairs), dealt: / SHARES), not one per expert, so a decode
        step launches few programs that find nothing to do. Slot j takes the (j * SHARES + rank)-th touched
        expert: with SHARES > 1, this rank's turn of the dealt ones (`_dealt`)."""
        return _nth_touched(_touched(ids_ptr, P, ep_start, E, BP, NW), tl.program_id(0) * SHARES + rank, NW)

    @triton.jit
    def _count(ids_ptr, P, e, ep_start, BP: tl.constexpr):
        p = tl.arange(0, BP)  # .cg: from L2; the down kernel reads the ids before its wait (never stale L1)
        ids = tl.load(ids_ptr + p, mask=p < P, other=-1, cache_modifier=".cg")
        return tl.sum(((ids - ep_start) == e).to(tl.int32), 0)

    @triton.jit
    def _moe_gate_up(x_ptr, w_ptr, ids_ptr, h_ptr, part_ptr, cnt_ptr, P, ep_start, E, rank, H: tl.constexpr,
                     I: tl.constexpr, TOP_K: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, SPLIT: tl.constexpr, EXACT: tl.constexpr, SHARES: tl.constexpr,
                     NW: tl.constexpr, PDL: tl.constexpr):
        """h[pair, n] = act(x[token] @ gate[e, n]) * (x[token] @ up[e, n]) for BM of expert e's pairs (chunk
        c of its pairs; programs past its count return at once, without reading a weight), BN columns; e is
        the expert of the program's slot (`_slot_expert`).

        Chunks are programs (grid axis 2), not a loop around the pipelined one over the hidden size.
        SPLIT > 1: program (slot, tile, c * SPLIT + s) sums hidden slice s of SPLIT only and leaves its fp32
        sums in `part` [SPLIT, pairs, 2, I]; the last of the SPLIT to finish (an atomic count per (e, tile,
        c), put back to zero after) adds them up and applies the activation. More, shorter programs: at
        decode sizes few experts are touched, and one program per (expert, column block) leaves SMs idle."""
        _after_previous(PDL)  # the routing comes from the kernel before
        tile = tl.program_id(1)
        chunk = tl.program_id(2) // SPLIT
        s = tl.program_id(2) % SPLIT
        n = tile * BN + tl.arange(0, BN)
        e = _slot_expert(ids_ptr, P, ep_start, E, rank, SHARES, BP, NW)
        count = tl.where(e >= 0, _count(ids_ptr, P, e, ep_start, BP), 0)
        if chunk * BM < count:
            pair, valid = _pairs_of(ids_ptr, P, e, ep_start, chunk * BM, BP, BM)
            tok = pair // TOP_K
            w_e = w_ptr + e.to(tl.int64) * 2 * I * H
            KS: tl.constexpr = H // SPLIT  # the wrapper checks that BK divides it
            acc_g = tl.zeros([BM, BN], dtype=tl.float32)
            acc_u = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(0, KS, BK):
                k = s * KS + k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + tok[:, None] * H + k[None, :], mask=valid[:, None] & (k[None, :] < H), other=0.0)
                wmask = (n[None, :] < I) & (k[:, None] < H)
                wg = tl.load(w_e + n[None, :] * H + k[:, None], mask=wmask, other=0.0)
                wu = tl.load(w_e + (I + n[None, :]) * H + k[:, None], mask=wmask, other=0.0)
                acc_g = _dot(x, wg, acc_g, EXACT)
                acc_u = _dot(x, wu, acc_u, EXACT)
            out = valid[:, None] & (n[None, :] < I)
            last = True
            if SPLIT > 1:
                at = (s * P + pair[:, None]) * 2 * I + n[None, :]
                tl.store(part_ptr + at, acc_g, mask=out)
                tl.store(part_ptr + at + I, acc_u, mask=out)
                tl.debug_barrier()  # every thread's partials written before the count says so (release)
                cnt = cnt_ptr + (e * tl.num_programs(1) + tile) * (tl.num_programs(2) // SPLIT) + chunk
                last = tl.atomic_add(cnt, 1, sem="acq_rel") == SPLIT - 1
                if last:
                    tl.store(cnt, 0)  # for the next call (and the next replay of a CUDA graph)
                    tl.debug_barrier()
                    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
                    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
                    for j in tl.static_range(SPLIT):  # .cg: from L2, where the other programs wrote
                        at = (j * P + pair[:, None]) * 2 * I + n[None, :]
                        acc_g += tl.load(part_ptr + at, mask=out, other=0.0, cache_modifier=".cg")
                        acc_u += tl.load(part_ptr + at + I, mask=out, other=0.0, cache_modifier=".cg")
            if last:
                ty = h_ptr.dtype.element_ty
                g = _round(acc_g, ty)  # transformers: linear -> chunk (rounded), silu (rounded), * up (rounded)
                act = _round(g / (1.0 + tl.exp(-g)), ty)
                tl.store(h_ptr + pair[:, None] * I + n[None, :], (act * _round(acc_u, ty)).to(ty), mask=out)

    @triton.jit
    def _moe_down(h_ptr, w_ptr, ids_ptr, rw_ptr, y_ptr, P, ep_start, E, rank, H: tl.constexpr, I: tl.constexpr,
                  BP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EXACT: tl.constexpr,
                  SHARES: tl.constexpr, NW: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr,
                  LINES: tl.constexpr):
        """y[pair, n] = (h[pair] @ down[e, n]) * routing weight[pair], for BM of expert e's pairs (chunk c),
        BN columns.

        With PDL the program starts while the gate/up kernel finishes: the routing is final by then (that
        kernel waited for the router before letting this one launch), so a program with pairs asks L2 for
        the first LINES lines (of LINE elements) of each of its weight rows first, and waits for the gate/up
        output after."""
        ty = y_ptr.dtype.element_ty
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        chunk = tl.program_id(2)
        e = _slot_expert(ids_ptr, P, ep_start, E, rank, SHARES, BP, NW)
        count = tl.where(e >= 0, _count(ids_ptr, P, e, ep_start, BP), 0)
        w_e = w_ptr + e.to(tl.int64) * H * I
        if PDL and LINES > 0:
            if chunk * BM < count:
                lines = tl.minimum(tl.arange(0, LINES) * LINE, I - 1)
                _prefetch_l2(w_e + tl.minimum(n, H - 1)[:, None] * I + lines[None, :])
        _after_previous(PDL)
        if chunk * BM < count:
            pair, valid = _pairs_of(ids_ptr, P, e, ep_start, chunk * BM, BP, BM)
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(0, I, BK):
                k = k0 + tl.arange(0, BK)
                h = tl.load(h_ptr + pair[:, None] * I + k[None, :], mask=valid[:, None] & (k[None, :] < I), other=0.0)
                w = tl.load(w_e + n[None, :] * I + k[:, None], mask=(n[None, :] < H) & (k[:, None] < I), other=0.0)
                acc = _dot(h, w, acc, EXACT)
            rw = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            y = _round(acc, ty) * rw[:, None]
            tl.store(y_ptr + pair[:, None] * H + n[None, :], y.to(ty), mask=valid[:, None] & (n[None, :] < H))

    @triton.jit
    def _moe_sum(y_ptr, ids_ptr, res_ptr, out_ptr, nw_ptr, xn_ptr, H, ep_start, E, P, rank, eps,
                 TOP_K: tl.constexpr, BH: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr,
                 SHARES: tl.constexpr, BP: tl.constexpr, NW: tl.constexpr, PDL: tl.constexpr):
        """out[token] = (residual +) the sum of its pairs' rows whose expert this rank computed (local, and
        dealt to it where experts are dealt); the other ranks add the rest. NORM (one GPU: the whole row
        in one program, BH >= H): also xn = RMSNorm(out) * weight, the next layer's input (as the
        tensor-parallel reduce_norm does), rounded once."""
        _after_previous(PDL)
        ty = out_ptr.dtype.element_ty
        t = tl.program_id(0)
        o = tl.program_id(1) * BH + tl.arange(0, BH)
        acc = tl.zeros([BH], dtype=tl.float32)
        if RESIDUAL:
            acc += tl.load(res_ptr + t * H + o, mask=o < H, other=0.0).to(tl.float32)
        if SHARES > 1:
            words = _touched(ids_ptr, P, ep_start, E, BP, NW)
        for j in tl.static_range(TOP_K):
            e = tl.load(ids_ptr + t * TOP_K + j) - ep_start
            ok = (e >= 0) & (e < E)
            if SHARES > 1:
                ok = ok & _dealt(words, e, rank, SHARES, NW)
            acc += tl.load(y_ptr + (t * TOP_K + j) * H + o, mask=(o < H) & ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + o, acc.to(ty), mask=o < H)
        if NORM:
            h = _round(acc, ty)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / H + eps)
            w = tl.load(nw_ptr + o, mask=o < H, other=0.0).to(tl.float32)
            tl.store(xn_ptr + t * H + o, (h * rstd * w).to(ty), mask=o < H)

    @triton.jit
    def _attn_block(q, k_ptr, v_ptr, base, n0, lo, end, m, den, acc, scale, D: tl.constexpr, BN: tl.constexpr,
                    EXACT: tl.constexpr):
        """Online-softmax update of (max, denominator, sum) with cache slots n0..n0+BN within [lo, end)."""
        d = tl.arange(0, D)
        n = n0 + tl.arange(0, BN)
        ok = (n >= lo) & (n < end)
        k = tl.load(k_ptr + base + n[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        sc = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BN], dtype=tl.float32), EXACT) * scale
        sc = tl.where(ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block all masked: no NaN from inf - inf
        alpha = tl.exp(m - m_ref)
        p = tl.exp(sc - m_ref[:, None])
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + base + n[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], EXACT)
        return m_new, den, acc

    @triton.jit
    def _attn_split(q_ptr, k_ptr, v_ptr, pos_ptr, start_ptr, acc_ptr, ml_ptr, HQ, HK, L, S, scale,
                    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr,
                    EXACT: tl.constexpr, RUNTIME_BOUNDS: tl.constexpr, PDL: tl.constexpr):
        """One KV head's G query heads over cache positions [s*CHUNK, (s+1)*CHUNK), from the sequence's
        first slot up to the current one: flash-attention partials (unnormalised sum, running max,
        denominator)."""
        _after_previous(PDL)
        bk = tl.program_id(0)
        sp = tl.program_id(1)
        bi = bk // HK
        kh = bk % HK
        g = tl.arange(0, BG)
        d = tl.arange(0, D)
        rows = bi * HQ + kh * G + g  # transformers' repeat_kv: query head h reads KV head h // G
        q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full([BG], float("-inf"), dtype=tl.float32)
        den = tl.zeros([BG], dtype=tl.float32)
        acc = tl.zeros([BG, D], dtype=tl.float32)
        base = (bi * HK + kh).to(tl.int64) * L * D
        end = tl.minimum(tl.load(pos_ptr) + 1, (sp + 1) * CHUNK)
        lo = tl.maximum(sp * CHUNK, tl.load(start_ptr + bi))
        # slots before the sequence's start (left padding) or past the current one are never read
        if RUNTIME_BOUNDS:  # GPUs: a for loop over the filled slots only, its loads pipelined
            for n0 in range(lo, end, BN):
                m, den, acc = _attn_block(q, k_ptr, v_ptr, base, n0, lo, end, m, den, acc, scale, D, BN, EXACT)
        elif lo < end:  # the interpreter takes no range() over tensors: the chunk, masked
            for j in range(0, CHUNK, BN):
                n0 = sp * CHUNK + j
                m, den, acc = _attn_block(q, k_ptr, v_ptr, base, n0, lo, end, m, den, acc, scale, D, BN, EXACT)
        part = rows * S + sp
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
        tl.store(ml_ptr + part * 2, m, mask=g < G)
        tl.store(ml_ptr + part * 2 + 1, den, mask=g < G)

    @triton.jit
    def _attn_combine(acc_ptr, ml_ptr, out_ptr, S, D: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr):
        """One query head: the splits' partials into its attention output."""
        _after_previous(PDL)
        r = tl.program_id(0)
        sp = tl.arange(0, BS)
        d = tl.arange(0, D)
        m = tl.load(ml_ptr + (r * S + sp) * 2, mask=sp < S, other=float("-inf"))
        den = tl.load(ml_ptr + (r * S + sp) * 2 + 1, mask=sp < S, other=0.0)
        w = tl.exp(m - tl.max(m, 0))  # splits past the current position: m = -inf, weight 0
        acc = tl.load(acc_ptr + (r * S + sp[:, None]) * D + d[None, :], mask=sp[:, None] < S, other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.sum(den * w, 0)
        tl.store(out_ptr + r * D + d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _peer_barrier(pads_ptr, slot, RANK: tl.constexpr, WORLD: tl.constexpr, BW: tl.constexpr,
                      LINE: tl.constexpr):
        """Program `slot` of every rank waits here for program `slot` of every other. Each sets a flag in
        each peer's signal pad (release) and takes its peers' flags back to zero (acquire), so the pads
        end as they began and a CUDA graph replays the kernel as captured. The protocol is torch's
        symmetric-memory barrier's, so the two share the pads. One lane per peer, all at once (one NVLink
        round trip, not WORLD in a row); a lane that is done compares against 2, which no flag holds.
        Each slot's flags get a 128-byte line of their own (LINE ints): the programs' atomics and
        spinning do not queue on one line."""
        pads = pads_ptr.to(tl.pointer_type(tl.uint64))
        r = tl.arange(0, BW)
        mine = tl.load(pads + RANK)
        peers = tl.where(r < WORLD, tl.load(pads + r, mask=r < WORLD, other=0), mine)
        send = peers.to(tl.pointer_type(tl.int32)) + slot * LINE + RANK
        done = (r >= WORLD).to(tl.int32)
        while tl.min(done, 0) == 0:  # a peer that has not yet taken our previous flag: try again
            old = tl.atomic_cas(send, tl.where(done > 0, 2, 0), tl.full([BW], 1, tl.int32), sem="release",
                                scope="sys")
            done = done | (old == 0).to(tl.int32)
        wait = mine.to(tl.pointer_type(tl.int32)) + slot * LINE + tl.minimum(r, WORLD - 1)
        done = (r >= WORLD).to(tl.int32)
        while tl.min(done, 0) == 0:
            old = tl.atomic_cas(wait, tl.where(done > 0, 2, 1), tl.zeros([BW], tl.int32), sem="acquire",
                                scope="sys")
            done = done | (old == 1).to(tl.int32)
        tl.debug_barrier()

    @triton.jit
    def _reduce_norm(bufs_ptr, pads_ptr, offset, h_ptr, x_ptr, w_ptr, N, H, eps, RANK: tl.constexpr,
                     WORLD: tl.constexpr, BW: tl.constexpr, LINE: tl.constexpr, R: tl.constexpr,
                     BH: tl.constexpr, PDL: tl.constexpr):
        """R token rows per program: h = the sum of every rank's partial rows (read over NVLink from the
        symmetric buffers, in rank order, so every rank gets the same bits), x = RMSNorm(h) * weight."""
        _after_previous(PDL)  # before the barrier: a peer's flag must mean its partial rows are written
        ty = h_ptr.dtype.element_ty
        p = tl.program_id(0)
        _peer_barrier(pads_ptr, p, RANK, WORLD, BW, LINE)
        rows = p * R + tl.arange(0, R)
        o = tl.arange(0, BH)
        at = rows[:, None] * H + o[None, :]
        m = (rows[:, None] < N) & (o[None, :] < H)
        bufs = bufs_ptr.to(tl.pointer_type(tl.uint64))
        acc = tl.zeros([R, BH], dtype=tl.float32)
        for r in tl.static_range(WORLD):  # .cg: from L2 (the owner's), never a stale L1 line
            part = tl.load(bufs + r).to(tl.pointer_type(ty)) + offset
            acc += tl.load(part + at, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        h = acc.to(ty)
        tl.store(h_ptr + at, h, mask=m)
        hf = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 1) / H + eps)
        w = tl.load(w_ptr + o, mask=o < H, other=0.0).to(tl.float32)
        tl.store(x_ptr + at, (hf * rstd[:, None] * w[None, :]).to(ty), mask=m)

    @triton.jit
    def _unpack(w, ty: tl.constexpr):
        """The two 16-bit values (low half first) of int32 words, in fp32."""
        lo = (w & 0xFFFF).to(tl.int16).to(ty, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(ty, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _pack(lo, hi, ty: tl.constexpr):
        """Two fp32 tensors rounded to 16-bit `ty`, as the int32 words that hold them (low half first)."""
        a = lo.to(ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return a | (hi.to(ty).to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _reduce_norm_push(part_ptr, ll_ptr, offset, stride, h_ptr, x_ptr, w_ptr, N, eps, RANK: tl.constexpr,
                          WORLD: tl.constexpr, R: tl.constexpr, HW: tl.constexpr, BW: tl.constexpr,
                          PDL: tl.constexpr):
        """R token rows per program: each rank pushes its partial rows into its peers' memory, and sums what
        its peers pushed into its own; no barrier, no read across the links. Every 8-byte word sent
        carries two 16-bit values of the partial and a flag (NCCL's LL protocol: an aligned 8-byte store
        arrives whole), so the receiver spins on its own memory until each word it reads is flagged, then
        clears it. Rank r's words land in slot r of the half at `offset` (words); consecutive calls take
        the other half (a rank pushes into a half again only after every peer has pushed to it since, so
        has read and cleared that half). h = the sum in rank order (the same bits on every rank),
        x = RMSNorm(h) * weight; h, x and the partial are read and written as words of two values."""
        _after_previous(PDL)  # the partial rows come from the kernel before
        ty = h_ptr.dtype.element_ty
        p = tl.program_id(0)
        rows = p * R + tl.arange(0, R)
        o = tl.arange(0, BW)
        m = (rows[:, None] < N) & (o[None, :] < HW)
        at = rows[:, None] * HW + o[None, :]
        mine = tl.load(part_ptr.to(tl.pointer_type(tl.int32)) + at, mask=m, other=0)
        flag = tl.full([R, BW], 1 << 32, tl.uint64)
        word = mine.to(tl.uint32, bitcast=True).to(tl.uint64) | flag
        ptrs = ll_ptr.to(tl.pointer_type(tl.uint64))
        for r in tl.static_range(WORLD):
            if r != RANK:
                peer = tl.load(ptrs + r).to(tl.pointer_type(tl.uint64)) + offset + RANK * stride
                tl.store(peer + at, word, mask=m)
        own = tl.load(ptrs + RANK).to(tl.pointer_type(tl.uint64)) + offset
        lo = tl.zeros([R, BW], dtype=tl.float32)
        hi = tl.zeros([R, BW], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                w = mine
            else:
                box = own + r * stride + at
                got = tl.load(box, mask=m, other=flag, volatile=True)
                while tl.min(((got >> 32) == 1).to(tl.int32)) == 0:
                    got = tl.load(box, mask=m, other=flag, volatile=True)
                tl.store(box, tl.zeros([R, BW], tl.uint64), mask=m)
                w = (got & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
            a, b = _unpack(w, ty)
            lo += a
            hi += b
        lo, hi = _round(lo, ty), _round(hi, ty)
        rstd = 1.0 / tl.sqrt((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / (2 * HW) + eps)
        wl, wh = _unpack(tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + o, mask=o < HW, other=0), ty)
        tl.store(h_ptr.to(tl.pointer_type(tl.int32)) + at, _pack(lo, hi, ty), mask=m)
        x = _pack(lo * rstd[:, None] * wl[None, :], hi * rstd[:, None] * wh[None, :], ty)
        tl.store(x_ptr.to(tl.pointer_type(tl.int32)) + at, x, mask=m)


ATTN_CHUNK = 256  # cache positions per program: a 32k cache is 128 splits, a short prompt one or two
ATTN_BLOCK = (64, 4, 2)  # (BN, warps, stages) on GPUs: the least total of 6 over 3 cases (docs/benchmarks.md)

MOE_MAX_PAIRS = 512  # token-expert pairs per call (batch 64 at top-8); the selection is O(pairs) per program
# (BN, BK, warps, stages) on GPUs: decode reads each touched expert once, so many narrow column blocks keep
# every SM streaming weights
MOE_BLOCK = (64, 128, 4, 3)
MOE_DOWN_BLOCK: tuple[int, int, int, int] | None = None  # the down kernel's (BN, BK, warps, stages); None: MOE_BLOCK's
# up to MOE_SPLIT_TOKENS tokens, the gate/up kernel splits the hidden size MOE_SPLIT ways: one token touches
# 8 experts, 8 x 12 programs leave most SMs idle (H200, 1 token: 14.0 vs 16.3 us with every expert split 2
# ways across GPUs, 11.0 vs 15.0 split 4 ways, 20.4 vs 21.3 whole; at 16 tokens splitting loses:
# docs/benchmarks.md)
MOE_SPLIT, MOE_SPLIT_TOKENS = 4, 4
# with PDL, the down kernel's programs ask L2 for the first MOE_DOWN_PREFETCH 128-byte lines (a power of two) of
# each of their weight rows while the gate/up kernel finishes. 2 H200s, batch 16: whole rows (16 lines) made
# one GPU 6% slower than no prefetch (L2 overrun), 2 lines +0.3%, TP=2 +0.4% (docs/benchmarks.md)
MOE_DOWN_PREFETCH = 2


def moe_supported(experts: Any) -> bool:
    """transformers' fused-3D experts layout with a SiLU gate, no biases: what `moe_experts` computes."""
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3:
        return False
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        return False
    act = type(getattr(experts, "act_fn", None)).__name__
    if not getattr(experts, "has_gate", True) or act not in ("SiLU", "SiLUActivation"):
        return False
    e, two_i, h = gu.shape
    return dn.shape == (e, h, two_i // 2) and gu.is_contiguous() and dn.is_contiguous() and gu.dtype == dn.dtype


def moe_enabled() -> bool:
    """The fused MoE kernels on (QWENHW_FUSED_MOE=0: transformers' experts kernels with the other fused ones)."""
    return os.environ.get("QWENHW_FUSED_MOE", "1") != "0"


def moe_experts(x: torch.Tensor, experts: Any, idx: torch.Tensor, weights: torch.Tensor,
                ep_start: int = 0, block: tuple[int, ...] | None = None,
                residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                down_block: tuple[int, ...] | None = None, share: tuple[int, int] = (0, 1),
                norm: tuple[torch.Tensor, float, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts' output [tokens, hidden] for x [tokens, hidden], ids/weights [tokens, top_k].

    Experts are `experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (transformers' layout); ids are
    global, this module holds experts [ep_start, ep_start + E) and pairs routed elsewhere contribute zero
    (expert parallel). Three kernels whatever the routing: gate/up + SiLU, down * weight, and the sum.
    `block` = (BN, BK, warps, stages[, split]) overrides the gate/up kernel's tile shape and its split of the
    hidden size, `down_block` = (BN, BK, warps, stages) the down kernel's (bench/multi_gpu.py sweeps them).
    `residual` [tokens, hidden] is added in the last kernel (the decoder layer's skip connection); `out`, a
    contiguous [tokens, hidden] tensor to write into (a tensor-parallel reducer's buffer). `share` = (rank,
    ranks): every rank holds every expert and computes the touched ones dealt to it (`_dealt`). `norm` =
    (weight, eps, xn) (a whole sum on one GPU): the last kernel also writes RMSNorm(out) * weight into xn.
    """
    call = MoeCall(x, experts, idx, weights, ep_start, block, down_block, residual, out, share)
    call.gate_up()
    call.down()
    return call.sum(norm)


class MoeCall:
    """One `moe_experts` call's buffers and launches, each kernel callable alone (the bench times them)."""

    def __init__(self, x: torch.Tensor, experts: Any, idx: torch.Tensor, weights: torch.Tensor, ep_start: int = 0,
                 block: tuple[int, ...] | None = None, down_block: tuple[int, ...] | None = None,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 share: tuple[int, int] = (0, 1)):
        self.gu, self.dn = experts.gate_up_proj, experts.down_proj
        self.n_exp, two_i, self.hidden = self.gu.shape
        self.inter = two_i // 2
        self.line = 128 // self.dn.element_size()  # elements per 128-byte cache line
        self.tokens, self.top_k = idx.shape
        self.pairs = self.tokens * self.top_k
        self.ep_start = ep_start
        self.x = x.contiguous()
        self.ids = idx.reshape(-1).contiguous()
        self.rw = weights.reshape(-1).contiguous()
        dev = x.device
        self.h = torch.empty((self.pairs, self.inter), dtype=x.dtype, device=dev)
        self.y = torch.empty((self.pairs, self.hidden), dtype=x.dtype, device=dev)
        self.out = torch.empty((self.tokens, self.hidden), dtype=x.dtype, device=dev) if out is None else out
        self.residual = residual.contiguous() if residual is not None else None
        exact = not x.is_cuda or x.dtype == torch.float32  # fp32 models keep fp32 products (no TF32)
        bn, bk, warps, stages, *rest = block or (MOE_BLOCK if x.is_cuda else (16, 32, 4, 1))
        split = rest[0] if rest else (MOE_SPLIT if block is None and x.is_cuda and self.tokens <= MOE_SPLIT_TOKENS
                                      else 1)
        if self.hidden % (split * bk):
            split = 1  # each slice a whole number of BK steps
        self.split = split
        self.chunks = triton.cdiv(self.tokens, 16)  # an expert gets at most one pair per token: chunks of 16
        self.rank, shares = share
        self.slots = triton.cdiv(min(self.n_exp, self.pairs), shares)  # experts one rank may compute
        if os.environ.get("QWENHW_MOE_SLOTS", "1") == "0":  # a program per local expert (the bench's A/B)
            self.slots = self.n_exp
        self.dealt = dict(SHARES=shares, NW=triton.next_power_of_2(triton.cdiv(self.n_exp, 64)),
                          BP=max(16, triton.next_power_of_2(self.pairs)))
        common = dict(BM=16, EXACT=exact, **self.dealt)
        self.up_tiles = dict(BN=bn, BK=bk, num_warps=warps, num_stages=stages, **common)
        if down_block is None:  # an explicit `block` sets both kernels' tiles unless down_block is given too
            down_block = MOE_DOWN_BLOCK if block is None and x.is_cuda and MOE_DOWN_BLOCK else (bn, bk, warps, stages)
        dbn, dbk, dwarps, dstages = down_block
        self.down_tiles = dict(BN=dbn, BK=dbk, num_warps=dwarps, num_stages=dstages, **common)
        self.n_tiles = triton.cdiv(self.inter, bn)
        self.part, self.cnt = self.h, self.ids  # unused unless split
        if split > 1:
            self.part = torch.empty((split, self.pairs, two_i), dtype=torch.float32, device=dev)
            self.cnt = _counts(dev, self.n_exp * self.n_tiles * self.chunks, "moe")

    def gate_up(self) -> None:
        _moe_gate_up[(self.slots, self.n_tiles, self.chunks * self.split)](
            self.x, self.gu, self.ids, self.h, self.part, self.cnt, self.pairs, self.ep_start, self.n_exp, self.rank,
            H=self.hidden, I=self.inter, TOP_K=self.top_k, SPLIT=self.split, **self.up_tiles, **_launch(self.x.device))

    def down(self) -> None:
        _moe_down[(self.slots, triton.cdiv(self.hidden, self.down_tiles["BN"]), self.chunks)](
            self.h, self.dn, self.ids, self.rw, self.y, self.pairs, self.ep_start, self.n_exp, self.rank, H=self.hidden,
            I=self.inter, LINE=self.line,
            LINES=min(MOE_DOWN_PREFETCH, triton.next_power_of_2(triton.cdiv(self.inter, self.line))),
            **self.down_tiles, **_launch(self.x.device))

    def sum(self, norm: tuple[torch.Tensor, float, torch.Tensor] | None = None) -> torch.Tensor:
        """The routed experts' sum into `out`; `norm` = (weight, eps, xn): also RMSNorm(out) * weight into xn."""
        bh = triton.next_power_of_2(self.hidden) if norm else min(1024, triton.next_power_of_2(self.hidden))
        res = self.residual if self.residual is not None else self.out
        weight, eps, xn = norm or (self.out, 0.0, self.out)
        _moe_sum[(self.tokens, triton.cdiv(self.hidden, bh))](
            self.y, self.ids, res, self.out, weight, xn, self.hidden, self.ep_start, self.n_exp, self.pairs, self.rank,
            float(eps), TOP_K=self.top_k, BH=bh, RESIDUAL=self.residual is not None, NORM=norm is not None,
            num_warps=4 if bh <= 1024 else 8, **self.dealt, **_launch(self.x.device))
        return self.out


_COUNTS: dict[tuple[torch.device, str], torch.Tensor] = {}


def _counts(device: torch.device, n: int, kernel: str) -> torch.Tensor:
    """Zeroed int32 counters for a kernel whose last program finishes the work (the split gate/up kernel,
    the router), kept per device: each call leaves them at zero, so a tensor made once (outside any CUDA
    graph capture: the runtime's warm-up calls come first) serves every call and replay. Grown, never
    shrunk."""
    have = _COUNTS.get((device, kernel))
    if have is None or have.numel() < n:
        _COUNTS[(device, kernel)] = have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return have


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, start: torch.Tensor | None = None,
                     block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over the static cache, reading slots start[j]..pos only.

    q [b, hq, 1, d] contiguous; caches [b, hk, max_len, d]; pos a 1-element tensor and start [b] (each
    sequence's first slot; zeros if None), read on the device, so a captured graph serves every step.
    Returns [b, 1, hq * d], the layout o_proj takes. `block` = (BN, warps, stages) overrides the tiles
    (bench/multi_gpu.py sweeps a few). Split-KV
    (flash-decoding): programs over 256-position chunks, then one kernel combines them. SDPA over the
    static cache with a mask reads all max_len positions every step.
    """
    b, hq, _, d = q.shape
    hk, max_len = k_cache.shape[1], k_cache.shape[2]
    splits = triton.cdiv(max_len, ATTN_CHUNK)
    acc = torch.empty((b * hq * splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b * hq * splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((b, 1, hq * d), dtype=q.dtype, device=q.device)
    g = hq // hk
    exact = not q.is_cuda or q.dtype == torch.float32
    if start is None:
        start = torch.zeros((b,), dtype=torch.long, device=q.device)
    bn, warps, stages = block or (ATTN_BLOCK if q.is_cuda else (16, 4, 1))
    _attn_split[(b * hk, splits)](q, k_cache, v_cache, pos, start, acc, ml, hq, hk, max_len, splits,
                                  float(scale), G=g, BG=max(16, triton.next_power_of_2(g)), D=d, BN=bn,
                                  CHUNK=ATTN_CHUNK, EXACT=exact, RUNTIME_BOUNDS=q.is_cuda, num_warps=warps,
                                  num_stages=stages, **_launch(q.device))
    _attn_combine[(b * hq,)](acc, ml, out, splits, D=d, BS=max(2, triton.next_power_of_2(splits)), **_launch(q.device))
    return out


def qk_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: Any, k_norm: Any,
                  cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> torch.Tensor:
    """q, k, v [b, t, heads, d] (last dim contiguous); caches [b, kv_heads, max_len, d]; cos/sin [1 or b, t, d].

    Writes k (normalised, rotated) and v into the caches at `pos` and returns q as [b, heads, t, d].
    """
    b, t, hq, d = q.shape
    hk = k.shape[2]
    q_out = torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    norm = q_norm is not None
    eps = float(q_norm.variance_epsilon) if norm else 0.0
    qw = q_norm.weight if norm else q
    kw = k_norm.weight if norm else k
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _qk_rope_cache[(b * t, hq + hk)](
        q, k, v, qw, kw, cos, sin, pos, q_out, k_cache, v_cache, t, hq, hk, k_cache.shape[2],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos_b, cos.stride(1), eps, HALF=d // 2, NORM=norm, **_launch(q.device))
    return q_out


LINEAR_MAX_TOKENS = 16  # decode GEMMs in Triton (qkv_rope, linear_residual) for up to this many rows: at 64
# cuBLAS was faster for 6 of the 8 shapes of bench/decode_linear.py
LINEAR_BK = 128  # hidden elements per step of their loops (the wrappers fall back where it does not divide)
LINEAR_STAGES = 3
# Shapes from bench/decode_linear.py on an H200 (132 SMs; docs/benchmarks.md), for 1-16 rows: q/k/v aims at
# ~80 programs of 8 warps (a head each, the hidden size split to make them up), o_proj at ~512 programs of 32
# columns and 4 warps; every hidden slice at least two steps of the loop
QKV_PROGRAMS, QKV_WARPS = 96, 8
PROJ_PROGRAMS, PROJ_WARPS, PROJ_BN = 512, 4, 32
# With PDL, a program asks L2 for its whole weight slice before its wait, while the kernel before finishes;
# only where the GEMM's weights are at most this many bytes: 4-8 MB (TP=2 and 4 o_proj, TP=4 q/k/v) gained
# 3-10%, 10.5 MB (TP=2 q/k/v) lost 6-13%, 17-21 MB (one GPU) 15-20%: lines evicted before their use
LINEAR_PREFETCH_BYTES = 9 * 2**20
LINEAR_PREFETCH = 16  # at most this many 128-byte lines per weight row (a power of two; 0: none)


def norm_enabled() -> bool:
    """One GPU: the RMSNorms inside the router and MoE-sum kernels (QWENHW_FUSED_NORM=0: torch's, apart)."""
    return os.environ.get("QWENHW_FUSED_NORM", "1") != "0"


def linear_enabled() -> bool:
    """The decode projections (q/k/v, o_proj) on the Triton kernels (QWENHW_FUSED_LINEAR=0: cuBLAS)."""
    return os.environ.get("QWENHW_FUSED_LINEAR", "1") != "0"


def linear_split(tiles: int, k: int, programs: int, bk: int = LINEAR_BK) -> int:
    """Hidden slices for a decode GEMM of `tiles` output tiles: the largest power of two that keeps the
    programs at most `programs` and every slice at least two `bk` steps (and a whole number of them).

    >>> [linear_split(heads, 2048, QKV_PROGRAMS) for heads in (40, 20, 10)]  # q/k/v at TP = 1, 2, 4
    [2, 4, 8]
    >>> [linear_split(64, k, PROJ_PROGRAMS) for k in (4096, 2048, 1024)]  # o_proj at TP = 1, 2, 4
    [8, 8, 4]
    """
    split = 1
    while tiles * split * 2 <= programs and k % (split * 2 * bk) == 0 and k // (split * 2) >= 2 * bk:
        split *= 2
    return split


def linear_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the decode GEMM kernels take x [rows, k] @ weight.T: few rows, one dtype, contiguous."""
    return (x.dim() == 2 and x.shape[0] <= LINEAR_MAX_TOKENS and x.shape[1] % LINEAR_BK == 0 and x.is_contiguous()
            and weight.is_contiguous() and weight.dtype == x.dtype and linear_enabled())


def _prefetch_lines(weight: torch.Tensor, k: int) -> int:
    """128-byte lines of each weight row's slice of `k` elements to prefetch (see LINEAR_PREFETCH_BYTES)."""
    if weight.numel() * weight.element_size() > LINEAR_PREFETCH_BYTES:
        return 0
    line = 128 // weight.element_size()
    return min(LINEAR_PREFETCH, triton.next_power_of_2(triton.cdiv(k, line)))


def _linear_tiles(x: torch.Tensor, tiles: tuple[int, ...] | None, warps: int) -> dict[str, Any]:
    bt = max(16, triton.next_power_of_2(x.shape[0]))
    exact = not x.is_cuda or x.dtype == torch.float32
    if not x.is_cuda:  # the interpreter: small steps for the tiny test models
        return dict(BT=bt, BK=32, EXACT=exact, num_warps=4, num_stages=1)
    bk, warps, stages = tiles or (LINEAR_BK, warps, LINEAR_STAGES)
    return dict(BT=bt, BK=bk, EXACT=exact, num_warps=warps, num_stages=stages)


def qkv_rope(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: list[int], q_norm: Any,
             k_norm: Any, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, split: int | None = None,
             tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """q/k/v = x @ weight.T (+ bias) for one new token per sequence (x [b, hidden], the merged weight of
    `heads` = [q, k, v] heads), then `qk_rope_cache`: writes k and v into the caches at `pos` and returns
    q as [b, q heads, 1, head_dim]. One kernel (`_qkv_rope`). `split` / `tiles` = (BK, warps, stages)
    override the hidden slices and tile shapes (bench/decode_linear.py sweeps them)."""
    b, hidden = x.shape
    hq, hk, _ = heads
    d = weight.shape[0] // sum(heads)
    n = sum(heads)
    cfg = _linear_tiles(x, tiles, QKV_WARPS)
    split = split or linear_split(n, hidden, QKV_PROGRAMS, cfg["BK"])
    if hidden % (split * cfg["BK"]):
        raise ValueError(f"hidden size {hidden} is not {split} slices of {cfg['BK']}")
    q_out = torch.empty((b, hq, 1, d), dtype=x.dtype, device=x.device)
    part = torch.empty((split, n, cfg["BT"], d), dtype=torch.float32, device=x.device)
    norm = q_norm is not None
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _qkv_rope[(n, split)](
        x, weight, bias if bias is not None else weight, q_norm.weight if norm else x, k_norm.weight if norm else x,
        cos, sin, pos, part, _counts(x.device, n, "qkv"), q_out, k_cache, v_cache, b, hq, hk, k_cache.shape[2],
        cos_b, float(q_norm.variance_epsilon) if norm else 0.0, H=hidden, HALF=d // 2, SPLIT=split, NORM=norm,
        BIAS=bias is not None, LINE=128 // weight.element_size(), LINES=_prefetch_lines(weight, hidden // split),
        **cfg, **_launch(x.device))
    return q_out


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, split: int | None = None, bn: int | None = None,
                    tiles: tuple[int, int, int] | None = None, row_sq: bool = False) -> Any:
    """(residual +) x @ weight.T for decode-sized x [rows, k], rounded once as addmm; into `out` (which may
    be `residual` itself: the one-GPU step adds o_proj into the hidden state in place). One kernel
    (`_linear_residual`); `split`, `bn` and `tiles` = (BK, warps, stages) override its shapes. `row_sq`:
    returns (out, sq), sq [rows, column tiles] the partial sums of out's rows' squares (for `router`)."""
    rows, k = x.shape
    nout = weight.shape[0]
    cfg = _linear_tiles(x, tiles, PROJ_WARPS)
    bn = bn or (PROJ_BN if x.is_cuda else 16)
    tiles_n = triton.cdiv(nout, bn)
    split = split or linear_split(tiles_n, k, PROJ_PROGRAMS, cfg["BK"])
    if k % (split * cfg["BK"]):
        raise ValueError(f"input size {k} is not {split} slices of {cfg['BK']}")
    out = torch.empty((rows, nout), dtype=x.dtype, device=x.device) if out is None else out
    part = torch.empty((split, tiles_n, cfg["BT"], bn), dtype=torch.float32, device=x.device) if split > 1 else out
    sq = torch.empty((rows, tiles_n), dtype=torch.float32, device=x.device) if row_sq else part
    _linear_residual[(tiles_n, split)](
        x, weight, residual if residual is not None else out, out, part, _counts(x.device, tiles_n, "linear"), sq,
        rows, nout, K=k, BN=bn, SPLIT=split, RESIDUAL=residual is not None, ROW_SQ=row_sq,
        LINE=128 // weight.element_size(), LINES=_prefetch_lines(weight, k // split), **cfg, **_launch(x.device))
    return (out, sq) if row_sq else out


def route(logits: torch.Tensor, top_k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, k] in the logits' dtype, expert ids [n, k] int64) from router logits [n, E]."""
    n, experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty((n, top_k), dtype=logits.dtype, device=logits.device)
    idx = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    _route[(n,)](logits, weights, idx, experts, K=top_k, BLOCK_E=triton.next_power_of_2(experts),
                 BLOCK_K=triton.next_power_of_2(top_k), NORM=normalise, **_launch(logits.device))
    return weights, idx


ROUTER_MAX_TOKENS = 64  # decode-sized calls: the router GEMM and the routing in one kernel (`router`)
ROUTER_TILES = (16, 128, 4)  # (experts per program, BK, hidden slices): 32 programs for 128 experts


def _router_tiles(x: torch.Tensor) -> tuple[int, int, int]:
    return ROUTER_TILES if x.is_cuda else (16, 32, 2)  # the interpreter: the tiny test models


def router(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalise: bool,
           norm: tuple[torch.Tensor, float, torch.Tensor] | None = None,
           xn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """route(x @ gate_weight.T, ...) in one kernel for up to ROUTER_MAX_TOKENS rows of x [n, hidden].
    `norm` = (weight, eps, sq): x is the hidden state before the RMSNorm, which the kernel applies, with
    sq [n, parts] partial sums of its rows' squares (`linear_residual(row_sq=...)`), writing the
    normalised rows into `xn` (the experts' input)."""
    n, hidden = x.shape
    experts = gate_weight.shape[0]
    be, bk, split = _router_tiles(x)
    bt, block_e = max(16, triton.next_power_of_2(n)), max(be, triton.next_power_of_2(experts))
    part = torch.empty((split, bt, block_e), dtype=torch.float32, device=x.device)
    weights = torch.empty((n, top_k), dtype=x.dtype, device=x.device)
    idx = torch.empty((n, top_k), dtype=torch.int64, device=x.device)
    line = 128 // gate_weight.element_size()
    nw, eps, sq = norm or (x, 0.0, part)
    _router[(triton.cdiv(experts, be), split)](
        x, gate_weight, part, _counts(x.device, 1, "router"), weights, idx, nw, xn if xn is not None else x, sq, n,
        experts, sq.shape[-1], float(eps), H=hidden, K=top_k, BT=bt, BE=be, BK=bk, SPLIT=split, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), NORM=normalise, PRENORM=norm is not None,
        BSQ=triton.next_power_of_2(sq.shape[-1]),
        EXACT=not x.is_cuda or x.dtype == torch.float32, LINE=line,
        LINES=triton.next_power_of_2(triton.cdiv(hidden // split, line)), **_launch(x.device))
    return weights, idx


def _qwen3_router(gate: Any) -> bool:
    return hasattr(gate, "top_k") and hasattr(gate, "norm_topk_prob") and gate.weight.shape[0] == getattr(
        gate, "num_experts", -1)


def router_fits(gate: Any, flat: torch.Tensor) -> bool:
    """Whether `router` takes this transformers MoE router and input (Qwen3-style top-k, decode-sized)."""
    _, bk, split = _router_tiles(flat)
    return (_qwen3_router(gate) and flat.shape[0] <= ROUTER_MAX_TOKENS and flat.is_contiguous()
            and flat.shape[1] % (bk * split) == 0 and gate.weight.is_contiguous() and gate.weight.dtype == flat.dtype)


def gate_route(gate: Any, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) of a transformers MoE router: fused kernels for Qwen3-style top-k routers (the GEMM
    too for decode-sized calls)."""
    if router_fits(gate, flat):
        return router(flat, gate.weight, gate.top_k, bool(gate.norm_topk_prob))
    if _qwen3_router(gate):
        return route(torch.nn.functional.linear(flat, gate.weight), gate.top_k, bool(gate.norm_topk_prob))
    _, weights, idx = gate(flat)
    return weights, idx


REDUCE_ROWS = 1  # token rows per program of reduce_norm: each program is one cross-GPU barrier


def reduce_rows(rows: int, per_program: int | None = None) -> int:
    return triton.next_power_of_2(min(per_program or REDUCE_ROWS, rows))


def reduce_pad_bytes(rows: int) -> int:
    """Signal-pad bytes reduce_norm's barriers use for `rows` token rows."""
    return triton.cdiv(rows, reduce_rows(rows)) * PAD_LINE * 4


def push_words(numel: int, world: int) -> int:
    """uint64 words of the symmetric buffer `reduce_norm_push` needs for partial sums of up to `numel`
    values: two halves of `world` slots, each value half a word."""
    return 2 * world * numel // 2


def reduce_norm_push(ll_ptrs: int, rank: int, world: int, half: int, capacity: int, part: torch.Tensor,
                     weight: torch.Tensor, eps: float, h: torch.Tensor, x: torch.Tensor,
                     per_program: int | None = None) -> None:
    """All-reduce + RMSNorm in one kernel, pushing (`_reduce_norm_push`): `part` [rows, hidden] is this
    rank's partial sum, in 16-bit floats; `ll_ptrs` the device address of the ranks' buffer addresses (a
    symmetric-memory handle's buffer_ptrs_dev over `push_words(capacity * hidden, world)` zeroed words);
    `half` alternates between consecutive calls. Writes the sum into `h` and RMSNorm(sum) * weight into
    `x`."""
    rows, hidden = part.shape
    r = reduce_rows(rows, per_program)
    hw = hidden // 2
    stride = capacity * hw
    _reduce_norm_push[(triton.cdiv(rows, r),)](
        part, ll_ptrs, half * world * stride, stride, h, x, weight, rows, eps, RANK=rank, WORLD=world, R=r,
        HW=hw, BW=triton.next_power_of_2(hw), num_warps=max(1, min(8, r * hw // 256)), **_launch(h.device))


def reduce_norm(handle: Any, offset: int, rows: int, hidden: int, weight: torch.Tensor, eps: float,
                h: torch.Tensor, x: torch.Tensor, per_program: int | None = None) -> None:
    """All-reduce + RMSNorm in one kernel over torch symmetric memory (`handle`: rendezvous's result).

    Every rank's partial sum [rows, hidden] sits at element `offset` of its symmetric buffer; writes the sum
    into `h` and RMSNorm(sum) * weight into `x`. One barrier: it orders this call's reads after every
    rank's producer, not the next producer after them, so consecutive calls must alternate between two
    buffer regions (parallel.Reducer does). `per_program` overrides REDUCE_ROWS (the bench sweeps it)."""
    r = reduce_rows(rows, per_program)
    bh = triton.next_power_of_2(hidden)
    _reduce_norm[(triton.cdiv(rows, r),)](
        handle.buffer_ptrs_dev, handle.signal_pad_ptrs_dev, offset, h, x, weight, rows, hidden, eps,
        RANK=handle.rank, WORLD=handle.world_size, BW=triton.next_power_of_2(handle.world_size), LINE=PAD_LINE,
        R=r, BH=bh, num_warps=max(1, min(8, r * bh // 512)), **_launch(h.device))
