"""Qwen3's q/k RMSNorm, the rotary embedding and the KV-cache write in one kernel (14 kernels per layer in
transformers). The decode GEMM of linear.qkv_rope ends with the same arithmetic (`_norm_rope`); this kernel
serves the rows it does not take (more than its row limit, or cuBLAS projections).
"""

from __future__ import annotations

from typing import Any

import torch

from .attention import identity_table
from .common import _after_previous, _round, jit, launch, tl


@jit
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


@jit
def _qk_rope_cache(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, row_ptr, table_ptr, qo_ptr,
                   kc_ptr, vc_ptr, T, HQ, HK, PAGE, PAGES, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b,
                   sc_t, sp_b, sr_b, sr_t, eps, HALF: tl.constexpr, NORM: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    """One (token, head) per program: heads < HQ are query heads, the rest key heads (+ their values). The
    token's cache row is its sequence b, or (ROWS) row_ptr[b * sr_b + t * sr_t]; its slot pos lies in page
    table[row, pos // PAGE] (kv_cache.py)."""
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
    pos = tl.load(pos_ptr + b * sp_b + t)
    row = b
    if ROWS:
        row = tl.load(row_ptr + b * sr_b + t * sr_t)
    page = tl.load(table_ptr + row * PAGES + pos // PAGE).to(tl.int64)
    slot = (page * HK + h - HQ) * PAGE + pos % PAGE  # the key / value head's, for h >= HQ
    is_q = h < HQ
    hk = h - HQ
    src = tl.where(is_q, q_ptr + b * sq_b + t * sq_t + h * sq_h, k_ptr + b * sk_b + t * sk_t + hk * sk_h)
    dst = tl.where(is_q, qo_ptr + ((b * HQ + h) * T + t) * 2 * HALF,
                   kc_ptr + slot * 2 * HALF)
    y1, y2 = _norm_rope(tl.load(src + o).to(tl.float32), tl.load(src + HALF + o).to(tl.float32),
                        tl.where(is_q, qw_ptr, kw_ptr), c1, c2, s1, s2, eps, HALF, NORM, ty)
    tl.store(dst + o, y1.to(ty))
    tl.store(dst + HALF + o, y2.to(ty))
    if not is_q:  # the value head goes to its cache slot unchanged
        vsrc = v_ptr + b * sv_b + t * sv_t + hk * sv_h
        vdst = vc_ptr + slot * 2 * HALF
        tl.store(vdst + o, tl.load(vsrc + o))
        tl.store(vdst + HALF + o, tl.load(vsrc + HALF + o))


def qk_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: Any, k_norm: Any,
                  cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, rows: torch.Tensor | None = None, pdl: bool = False,
                  table: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [b, t, heads, d] (last dim contiguous); caches [pages, kv_heads, page, d] and `table` [cache rows,
    pages per row] (int32, kv_cache.py; default: row j's one page is page j, caches [rows, kv_heads, max_len,
    d]); cos/sin [1 or b, t, d]; pos [t] (shared by the sequences) or [b, t] (each sequence's own); rows: each
    sequence's cache row [b] (default: row b), or each token's [t] when b is 1 (prompts packed into one
    sequence).

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
    pos_b = t if b > 1 and pos.numel() == b * t else 0  # one position per (sequence, token), or shared
    row_b, row_t = (0, 1) if rows is not None and b == 1 and rows.numel() == t else (1, 0)
    if table is None:
        table = identity_table(k_cache.shape[0], q.device)
    _qk_rope_cache[(b * t, hq + hk)](
        q, k, v, qw, kw, cos, sin, pos, rows if rows is not None else pos, table, q_out, k_cache, v_cache, t, hq,
        hk, k_cache.shape[2], table.stride(0), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), cos_b, cos.stride(1), pos_b, row_b, row_t, eps,
        HALF=d // 2, NORM=norm, ROWS=rows is not None, **launch(pdl))
    return q_out
