"""Decode attention: one new token per sequence over the KV cache, split-KV (flash-decoding).

Programs over CHUNK-position slices of a sequence's slots, each reading only slots start[j]..pos[j], then one
kernel combines the slices. SDPA over the static cache with a mask reads all max_len positions. The cache is
pages of slots and a table of each sequence's pages (kv_cache.py); a chunk lies in one page.
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
def _attn_split(q_ptr, k_ptr, v_ptr, pos_ptr, start_ptr, table_ptr, acc_ptr, ml_ptr, HQ, HK, PAGE, PAGES, S, POS_B,
                scale, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr,
                EXACT: tl.constexpr, RUNTIME_BOUNDS: tl.constexpr, PDL: tl.constexpr):
    """One KV head's G query heads over cache positions [s*CHUNK, (s+1)*CHUNK), from the sequence's
    first slot up to the current one: flash-attention partials (unnormalised sum, running max,
    denominator)."""
    _after_previous(PDL)
    bk = tl.program_id(0)
    sp = tl.program_id(1)
    bi = bk // HK
    kh = bk % HK
    pos = tl.load(pos_ptr + bi * POS_B)
    if sp * CHUNK <= pos:  # chunks past the current slot do nothing (nor does the combine read them): a long
        # context's cache costs its filled chunks only
        g = tl.arange(0, BG)
        d = tl.arange(0, D)
        rows = bi * HQ + kh * G + g  # transformers' repeat_kv: query head h reads KV head h // G
        q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=g[:, None] < G, other=0.0)
        m = tl.full([BG], float("-inf"), dtype=tl.float32)
        den = tl.zeros([BG], dtype=tl.float32)
        acc = tl.zeros([BG, D], dtype=tl.float32)
        # the chunk's page: slot n of it at base + n * D (n counted from the sequence's slot 0)
        j = sp * CHUNK // PAGE
        page = tl.load(table_ptr + bi * PAGES + j).to(tl.int64)
        base = ((page * HK + kh) * PAGE - j * PAGE) * D
        end = tl.minimum(pos + 1, (sp + 1) * CHUNK)
        lo = tl.maximum(sp * CHUNK, tl.load(start_ptr + bi))
        # slots before the sequence's start (left padding) are never read
        if RUNTIME_BOUNDS:  # GPUs: a for loop over the filled slots only, its loads pipelined
            for n0 in range(lo, end, BN):
                m, den, acc = _attn_block(q, k_ptr, v_ptr, base, n0, lo, end, m, den, acc, scale, D, BN, EXACT)
        elif lo < end:  # the interpreter takes no range() over tensors: the chunk, masked
            for n1 in range(0, CHUNK, BN):
                n0 = sp * CHUNK + n1
                m, den, acc = _attn_block(q, k_ptr, v_ptr, base, n0, lo, end, m, den, acc, scale, D, BN, EXACT)
        part = rows * S + sp
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
        tl.store(ml_ptr + part * 2, m, mask=g < G)
        tl.store(ml_ptr + part * 2 + 1, den, mask=g < G)


@jit
def _attn_combine(acc_ptr, ml_ptr, out_ptr, pos_ptr, S, HQ, POS_B, D: tl.constexpr, CHUNK: tl.constexpr,
                  BS: tl.constexpr, PDL: tl.constexpr):
    """One query head: the partials of its sequence's splits up to the current slot into its attention output."""
    _after_previous(PDL)
    r = tl.program_id(0)
    sp = tl.arange(0, BS)
    d = tl.arange(0, D)
    ok = sp <= tl.load(pos_ptr + r // HQ * POS_B) // CHUNK
    m = tl.load(ml_ptr + (r * S + sp) * 2, mask=ok, other=float("-inf"))
    den = tl.load(ml_ptr + (r * S + sp) * 2 + 1, mask=ok, other=0.0)
    w = tl.exp(m - tl.max(m, 0))  # splits before the sequence's start: m = -inf, weight 0
    acc = tl.load(acc_ptr + (r * S + sp[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(den * w, 0)
    tl.store(out_ptr + r * D + d, o.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, start: torch.Tensor | None = None,
                     block: tuple[int, int, int] | None = None, pdl: bool = False,
                     table: torch.Tensor | None = None, max_len: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over the cache, reading slots start[j]..pos[j] only.

    q [b, hq, 1, d] contiguous; caches [pages, hk, page, d] with `table` [b, pages per sequence] (int32: each
    sequence's pages, kv_cache.py; default: page j is sequence j's whole context, caches [b, hk, max_len, d]);
    `max_len`: the slots a sequence may have (default: a page's); pos [b] (each sequence's current slot; a
    1-element tensor: one for all) and start [b] (each sequence's first slot; zeros if None), read on the
    device, so a captured graph serves every step whatever the positions.
    Returns [b, 1, hq * d], the layout o_proj takes. `block` = (BN, warps, stages) overrides the tiles
    (bench/multi_gpu.py sweeps a few); `pdl`: launched dependent on the kernel before. Split-KV
    (flash-decoding): programs over 256-position chunks, then one kernel combines them. SDPA over the
    static cache with a mask reads all max_len positions every step.
    """
    b, hq, _, d = q.shape
    hk, page = k_cache.shape[1], k_cache.shape[2]
    if table is None:
        table = identity_table(b, q.device)
    max_len = max_len or page
    if table.shape[1] > 1 and page % CHUNK:
        raise ValueError(f"pages of {page} slots do not hold whole {CHUNK}-slot chunks")
    splits = triton.cdiv(max_len, CHUNK)
    acc = torch.empty((b * hq * splits, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b * hq * splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((b, 1, hq * d), dtype=q.dtype, device=q.device)
    g = hq // hk
    exact = not q.is_cuda or q.dtype == torch.float32
    if start is None:
        start = torch.zeros((b,), dtype=torch.long, device=q.device)
    bn, warps, stages = block or (tiles.for_device(q.device).attn_block if q.is_cuda else (16, 4, 1))
    _attn_split[(b * hk, splits)](q, k_cache, v_cache, pos, start, table, acc, ml, hq, hk, page, table.stride(0),
                                  splits, row_stride(pos, b), float(scale), G=g, BG=max(16, triton.next_power_of_2(g)),
                                  D=d, BN=bn, CHUNK=CHUNK, EXACT=exact, RUNTIME_BOUNDS=q.is_cuda, num_warps=warps,
                                  num_stages=stages, **launch(pdl))
    _attn_combine[(b * hq,)](acc, ml, out, pos, splits, hq, row_stride(pos, b), D=d, CHUNK=CHUNK,
                             BS=max(2, triton.next_power_of_2(splits)), **launch(pdl))
    return out


def identity_table(rows: int, device: torch.device) -> torch.Tensor:
    """The static cache's table: sequence j's one page is page j."""
    return torch.arange(rows, dtype=torch.int32, device=device)[:, None]
