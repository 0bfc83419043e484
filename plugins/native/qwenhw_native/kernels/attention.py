"""Decode attention: one new token per sequence over the static KV cache, split-KV (flash-decoding).

Programs over CHUNK-position slices of the cache, each reading only slots start[j]..pos[j] of its sequence,
then one kernel combines the slices. SDPA over the static cache with a mask reads all max_len positions.
"""

from __future__ import annotations

import torch

from . import tiles
from .common import _after_previous, _dot, jit, launch, row_stride, tl, triton

CHUNK = 256  # cache positions per program: a 32k cache is 128 splits, a short prompt one or two


@jit
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


@jit
def _attn_split(q_ptr, k_ptr, v_ptr, pos_ptr, start_ptr, acc_ptr, ml_ptr, HQ, HK, L, S, POS_B, scale,
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
    end = tl.minimum(tl.load(pos_ptr + bi * POS_B) + 1, (sp + 1) * CHUNK)
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


@jit
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


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, start: torch.Tensor | None = None,
                     block: tuple[int, int, int] | None = None, pdl: bool = False) -> torch.Tensor:
    """Attention of one new token per sequence over the static cache, reading slots start[j]..pos[j] only.

    q [b, hq, 1, d] contiguous; caches [b, hk, max_len, d]; pos [b] (each sequence's current slot; a
    1-element tensor: one for all) and start [b] (each sequence's first slot; zeros if None), read on the
    device, so a captured graph serves every step whatever the positions.
    Returns [b, 1, hq * d], the layout o_proj takes. `block` = (BN, warps, stages) overrides the tiles
    (bench/multi_gpu.py sweeps a few); `pdl`: launched dependent on the kernel before. Split-KV
    (flash-decoding): programs over 256-position chunks, then one kernel combines them. SDPA over the
    static cache with a mask reads all max_len positions every step.
    """
    b, hq, _, d = q.shape
    hk, max_len = k_cache.shape[1], k_cache.shape[2]
    splits = triton.cdiv(max_len, CHUNK)
    acc = torch.empty((b * hq * splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b * hq * splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((b, 1, hq * d), dtype=q.dtype, device=q.device)
    g = hq // hk
    exact = not q.is_cuda or q.dtype == torch.float32
    if start is None:
        start = torch.zeros((b,), dtype=torch.long, device=q.device)
    bn, warps, stages = block or (tiles.for_device(q.device).attn_block if q.is_cuda else (16, 4, 1))
    _attn_split[(b * hk, splits)](q, k_cache, v_cache, pos, start, acc, ml, hq, hk, max_len, splits,
                                  row_stride(pos, b), float(scale), G=g, BG=max(16, triton.next_power_of_2(g)),
                                  D=d, BN=bn, CHUNK=CHUNK, EXACT=exact, RUNTIME_BOUNDS=q.is_cuda, num_warps=warps,
                                  num_stages=stages, **launch(pdl))
    _attn_combine[(b * hq,)](acc, ml, out, splits, D=d, BS=max(2, triton.next_power_of_2(splits)), **launch(pdl))
    return out
