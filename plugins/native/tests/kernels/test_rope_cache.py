"""q/k RMSNorm + RoPE + the KV-cache write (kernels.rope_cache) against transformers' Qwen3 modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, apply_rotary_pos_emb

from qwenhw_native.kernels import rope_cache


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_norm_rope_and_cache_write_follow_transformers(dtype, tol, rel, rotary):
    g = torch.Generator().manual_seed(0)
    b, t, hq, hk, d, length, p = 2, 1, 8, 2, 64, 16, 5
    qn, kn = Qwen3MoeRMSNorm(d).to(dtype), Qwen3MoeRMSNorm(d).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        kn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        q, k, v = (torch.randn(b, t, n * d, generator=g).to(dtype).view(b, t, n, d) for n in (hq, hk, hk))
        cos, sin = rotary(1, t, d, g, dtype)
        kc = torch.full((b, hk, length, d), float("nan"), dtype=dtype)
        vc = kc.clone()
        qr, kr = apply_rotary_pos_emb(qn(q).transpose(1, 2), kn(k).transpose(1, 2), cos, sin)
        qo = rope_cache.qk_rope_cache(q, k, v, qn, kn, cos, sin, torch.tensor([p]), kc, vc)
    assert rel(qo, qr) < tol and rel(kc[:, :, p:p + 1], kr) < tol
    assert torch.equal(vc[:, :, p], v[:, 0])
    assert kc[:, :, :p].isnan().all()  # only the step's slot is written


def test_each_sequence_written_at_its_own_position(rel, rotary):
    """Continuous batching: pos [b] and cos/sin [b, 1, d], one slot per sequence."""
    g = torch.Generator().manual_seed(2)
    b, hq, hk, d, length = 3, 4, 2, 64, 16
    pos = [5, 0, 11]
    q, k, v = (torch.randn(b, 1, n, d, generator=g) for n in (hq, hk, hk))
    cos, sin = rotary(b, 1, d, g)
    kc = torch.full((b, hk, length, d), float("nan"))
    vc = kc.clone()
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qo = rope_cache.qk_rope_cache(q, k, v, None, None, cos, sin, torch.tensor(pos), kc, vc)
    assert rel(qo, qr) < 1e-5
    for j, p in enumerate(pos):
        assert rel(kc[j, :, p], kr[j, :, 0]) < 1e-5 and torch.equal(vc[j, :, p], v[j, 0])
        assert kc[j].isnan().sum() == hk * (length - 1) * d  # nothing but its own slot


def test_prompt_tokens_go_to_the_rows_they_are_given(rel, rotary):
    """Prompt passes: sequences into chosen cache rows (prompts joining a running batch), and prompts packed
    into one sequence, each token to its own (row, slot)."""
    g = torch.Generator().manual_seed(3)
    hq, hk, d, length, rows_n = 4, 2, 64, 16, 4
    t = 5
    q, k, v = (torch.randn(2, t, n, d, generator=g) for n in (hq, hk, hk))
    cos, sin = rotary(1, t, d, g)
    kc = torch.full((rows_n, hk, length, d), float("nan"))
    vc = kc.clone()
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qo = rope_cache.qk_rope_cache(q, k, v, None, None, cos, sin, torch.arange(t), kc, vc, rows=torch.tensor([3, 1]))
    assert rel(qo, qr) < 1e-5
    assert rel(kc[[3, 1], :, :t], kr) < 1e-5 and torch.equal(vc[[3, 1], :, :t], v.transpose(1, 2))
    assert kc[[0, 2]].isnan().all()
    # packed: 3 tokens of a prompt for row 2, then 2 of one for row 0, positions restarting per prompt
    rows, slots = torch.tensor([2, 2, 2, 0, 0]), torch.tensor([0, 1, 2, 0, 1])
    kc2, vc2 = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    c, s = cos[:, slots], sin[:, slots]
    qr, kr = apply_rotary_pos_emb(q[:1].transpose(1, 2), k[:1].transpose(1, 2), c, s)
    qo = rope_cache.qk_rope_cache(q[:1], k[:1], v[:1], None, None, c, s, slots, kc2, vc2, rows=rows)
    assert rel(qo, qr) < 1e-5
    assert rel(kc2[rows, :, slots], kr[0].transpose(0, 1)) < 1e-5
    assert torch.equal(vc2[rows, :, slots], v[0])
    assert kc2[1].isnan().all() and kc2[3].isnan().all()
