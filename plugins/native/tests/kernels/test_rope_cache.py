"""q/k RMSNorm + RoPE + the KV-cache write (kernels.rope_cache) against transformers' Qwen3 modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, apply_rotary_pos_emb

from qwenhw_native.kernels import rope_cache


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_norm_rope_and_cache_write_follow_transformers(dtype, tol, rel):
    g = torch.Generator().manual_seed(0)
    b, t, hq, hk, d, length, p = 2, 1, 8, 2, 64, 16, 5
    qn, kn = Qwen3MoeRMSNorm(d).to(dtype), Qwen3MoeRMSNorm(d).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        kn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        q, k, v = (torch.randn(b, t, n * d, generator=g).to(dtype).view(b, t, n, d) for n in (hq, hk, hk))
        ang = torch.randn(1, t, d // 2, generator=g)
        cos, sin = (torch.cat([f(ang), f(ang)], -1).to(dtype) for f in (torch.cos, torch.sin))
        kc = torch.full((b, hk, length, d), float("nan"), dtype=dtype)
        vc = kc.clone()
        qr, kr = apply_rotary_pos_emb(qn(q).transpose(1, 2), kn(k).transpose(1, 2), cos, sin)
        qo = rope_cache.qk_rope_cache(q, k, v, qn, kn, cos, sin, torch.tensor([p]), kc, vc)
    assert rel(qo, qr) < tol and rel(kc[:, :, p:p + 1], kr) < tol
    assert torch.equal(vc[:, :, p], v[:, 0])
    assert kc[:, :, :p].isnan().all()  # only the step's slot is written


def test_each_sequence_written_at_its_own_position(rel):
    """Continuous batching: pos [b] and cos/sin [b, 1, d], one slot per sequence."""
    g = torch.Generator().manual_seed(2)
    b, hq, hk, d, length = 3, 4, 2, 64, 16
    pos = [5, 0, 11]
    q, k, v = (torch.randn(b, 1, n, d, generator=g) for n in (hq, hk, hk))
    ang = torch.randn(b, 1, d // 2, generator=g)
    cos, sin = (torch.cat([f(ang), f(ang)], -1) for f in (torch.cos, torch.sin))
    kc = torch.full((b, hk, length, d), float("nan"))
    vc = kc.clone()
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qo = rope_cache.qk_rope_cache(q, k, v, None, None, cos, sin, torch.tensor(pos), kc, vc)
    assert rel(qo, qr) < 1e-5
    for j, p in enumerate(pos):
        assert rel(kc[j, :, p], kr[j, :, 0]) < 1e-5 and torch.equal(vc[j, :, p], v[j, 0])
        assert kc[j].isnan().sum() == hk * (length - 1) * d  # nothing but its own slot
