"""The decode kernels over a paged cache (kv_cache.py): each sequence's slots in pages out of order, the other
pages NaN. Writes land where the table says and reads give what the same slots give in a static cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from qwenhw_native.kernels import attention, linear, rope_cache

B, HQ, HK, D, MAX_LEN, PAGE = 3, 8, 2, 64, 600, 256
PAGES = -(-MAX_LEN // PAGE)  # 3 per sequence


def _paged(static: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The static cache's slots copied into pages as `table` places them; every other page NaN."""
    pages = torch.full((int(table.max()) + 2, HK, PAGE, D), float("nan"), dtype=static.dtype)
    for j in range(B):
        for p in range(PAGES):
            n = min(PAGE, MAX_LEN - p * PAGE)
            pages[table[j, p], :, :n] = static[j, :, p * PAGE:p * PAGE + n]
    return pages


def _table(seed: int) -> torch.Tensor:
    """Each sequence's pages: a shuffle of pages 1..9 (page 0 is the scratch page)."""
    order = torch.randperm(B * PAGES, generator=torch.Generator().manual_seed(seed)) + 1
    return order.view(B, PAGES).to(torch.int32)


def test_decode_attention_over_pages_reads_what_the_static_cache_holds(rel):
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([599, 256, 17])  # the last slot, a page's first, the first page only
    start = torch.tensor([0, 40, 0])
    q = torch.randn(B, HQ, 1, D, generator=g)
    kc, vc = (torch.randn(B, HK, MAX_LEN, D, generator=g) for _ in range(2))
    table = _table(1)
    ref = attention.decode_attention(q, kc, vc, pos, 0.125, start)
    got = attention.decode_attention(q, _paged(kc, table), _paged(vc, table), pos, 0.125, start, table=table,
                                     max_len=MAX_LEN)
    assert not got.isnan().any() and rel(got, ref) < 1e-6
    # and both are attention over the slots start..pos
    mask = torch.full((B, 1, 1, MAX_LEN), float("-inf"))
    for j, (s, p) in enumerate(zip(start.tolist(), pos.tolist())):
        mask[j, ..., s:p + 1] = 0
    sdpa = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert rel(got, sdpa.transpose(1, 2).reshape(B, 1, -1)) < 1e-5


def test_the_cache_writes_land_in_the_pages_the_table_gives(rel, rotary):
    """The rope/cache kernel (prompt tokens packed, and decode rows) and the q/k/v decode GEMM write each
    token's key and value at page table[row, slot // PAGE], slot % PAGE, and nowhere else."""
    g = torch.Generator().manual_seed(2)
    table = _table(3)
    empty = lambda: torch.full((int(table.max()) + 2, HK, PAGE, D), float("nan"))  # noqa: E731
    # packed prompt tokens: row 1 at slots 254..257 (across its first two pages), row 2 at 0..1
    rows, slots = torch.tensor([1, 1, 1, 1, 2, 2]), torch.tensor([254, 255, 256, 257, 0, 1])
    t = len(rows)
    q, k, v = (torch.randn(1, t, n, D, generator=g) for n in (HQ, HK, HK))
    cos, sin = rotary(1, t, D, g)
    static_k, static_v = (torch.full((B, HK, MAX_LEN, D), float("nan")) for _ in range(2))
    pk, pv = empty(), empty()
    ref_q = rope_cache.qk_rope_cache(q, k, v, None, None, cos, sin, slots, static_k, static_v, rows=rows)
    got_q = rope_cache.qk_rope_cache(q, k, v, None, None, cos, sin, slots, pk, pv, rows=rows, table=table)
    assert torch.equal(got_q, ref_q)
    page, within = table[rows, slots // PAGE].long(), slots % PAGE
    assert torch.equal(pk[page, :, within], static_k[rows, :, slots])
    assert torch.equal(pv[page, :, within], v[0])
    assert int(pk.isnan().logical_not().sum()) == t * HK * D  # nothing else written
    # a decode step's q/k/v GEMM: each sequence's token at its own slot
    hidden = 128
    pos = torch.tensor([300, 0, 511])
    qn, kn = Qwen3MoeRMSNorm(D), Qwen3MoeRMSNorm(D)
    w = torch.randn((HQ + 2 * HK) * D, hidden, generator=g) * 0.1
    x = torch.randn(B, hidden, generator=g)
    cos, sin = rotary(B, 1, D, g)
    pk, pv = empty(), empty()
    static_k, static_v = (torch.full((B, HK, MAX_LEN, D), float("nan")) for _ in range(2))
    with torch.no_grad():
        ref_q = linear.qkv_rope(x, w, None, [HQ, HK, HK], qn, kn, cos, sin, pos, static_k, static_v, slices=2)
        got_q = linear.qkv_rope(x, w, None, [HQ, HK, HK], qn, kn, cos, sin, pos, pk, pv, slices=2, table=table)
    assert torch.equal(got_q, ref_q)
    seqs = torch.arange(B)
    page, within = table[seqs, pos // PAGE].long(), pos % PAGE
    assert torch.equal(pk[page, :, within], static_k[seqs, :, pos])
    assert torch.equal(pv[page, :, within], static_v[seqs, :, pos])
    assert int(pv.isnan().logical_not().sum()) == B * HK * D
