"""The decode GEMMs in Triton (kernels.linear): q/k/v + q/k norms + RoPE + the cache write in one kernel
against F.linear then the rope/cache kernel (Qwen3 with norms, Qwen2 with a bias; one program per head or
split-K with the last program adding up), and o_proj + residual against addmm, in place and into another
buffer, with its rows' sums of squares."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from qwenhw_native.kernels import common, linear, rope_cache

CASES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


def test_split_doctests():
    assert doctest.testmod(linear).failed == 0


@pytest.mark.parametrize("dtype, tol", CASES)
@pytest.mark.parametrize("qwen3", [True, False], ids=["qwen3 norms", "qwen2 bias"])
@pytest.mark.parametrize("slices", [1, 4])
def test_qkv_rope_follows_cublas_and_the_rope_kernel(dtype, tol, qwen3, slices, rel, rotary):
    g = torch.Generator().manual_seed(0)
    b, hidden, hq, hk, d, length, p = 3, 128, 4, 2, 64, 16, 5
    qn, kn = Qwen3MoeRMSNorm(d).to(dtype), Qwen3MoeRMSNorm(d).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        kn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
    w = (torch.randn((hq + 2 * hk) * d, hidden, generator=g) * 0.1).to(dtype)
    bias = None if qwen3 else torch.randn((hq + 2 * hk) * d, generator=g).to(dtype)
    x = torch.randn(b, hidden, generator=g).to(dtype)
    cos, sin = rotary(1, 1, d, g, dtype)
    norms = (qn, kn) if qwen3 else (None, None)
    with torch.no_grad():
        kr, vr = (torch.full((b, hk, length, d), float("nan"), dtype=dtype) for _ in range(2))
        q, k, v = F.linear(x, w, bias).view(b, 1, -1, d).split([hq, hk, hk], dim=2)
        qr = rope_cache.qk_rope_cache(q, k, v, *norms, cos, sin, torch.tensor([p]), kr, vr)  # the cuBLAS path
        kc, vc = (torch.full((b, hk, length, d), float("nan"), dtype=dtype) for _ in range(2))
        qo = linear.qkv_rope(x, w, bias, [hq, hk, hk], *norms, cos, sin, torch.tensor([p]), kc, vc, slices=slices)
    assert list(qo.shape) == [b, hq, 1, d]
    assert max(rel(qo, qr), rel(kc[:, :, p], kr[:, :, p]), rel(vc[:, :, p], vr[:, :, p])) < tol
    assert kc[:, :, :p].isnan().all() and vc[:, :, p + 1:].isnan().all()
    assert int(common._COUNTS[(x.device, "qkv")].count_nonzero()) == 0  # left at zero for the next call


def test_qkv_rope_writes_each_sequence_at_its_own_position(rel, rotary):
    """Continuous batching: pos [b] and cos/sin [b, 1, d]; the same as the rope kernel after cuBLAS."""
    g = torch.Generator().manual_seed(3)
    b, hidden, hq, hk, d, length = 3, 128, 4, 2, 64, 16
    pos = torch.tensor([5, 0, 11])
    qn, kn = Qwen3MoeRMSNorm(d), Qwen3MoeRMSNorm(d)
    w = torch.randn((hq + 2 * hk) * d, hidden, generator=g) * 0.1
    x = torch.randn(b, hidden, generator=g)
    cos, sin = rotary(b, 1, d, g)
    with torch.no_grad():
        kr, vr, kc, vc = (torch.full((b, hk, length, d), float("nan")) for _ in range(4))
        q, k, v = F.linear(x, w).view(b, 1, -1, d).split([hq, hk, hk], dim=2)
        qr = rope_cache.qk_rope_cache(q, k, v, qn, kn, cos, sin, pos, kr, vr)
        qo = linear.qkv_rope(x, w, None, [hq, hk, hk], qn, kn, cos, sin, pos, kc, vc, slices=2)
    assert rel(qo, qr) < 1e-5
    for j, p in enumerate(pos.tolist()):
        assert rel(kc[j, :, p], kr[j, :, p]) < 1e-5 and rel(vc[j, :, p], vr[j, :, p]) < 1e-5
    assert int(kc.isnan().sum()) == int(kr.isnan().sum()) == b * hk * (length - 1) * d


@pytest.mark.parametrize("dtype, tol", CASES)
@pytest.mark.parametrize("slices", [1, 2, 8])
def test_o_proj_with_the_residual(dtype, tol, slices, rel):
    """Into the hidden state in place (one GPU), into another buffer (a TP rank) or without the residual."""
    g = torch.Generator().manual_seed(1)
    b = 3
    x = torch.randn(b, 256, generator=g).to(dtype)
    w = (torch.randn(100, 256, generator=g) * 0.1).to(dtype)  # 100 columns: the last tile only partly stored
    h = torch.randn(b, 100, generator=g).to(dtype)
    ref = torch.addmm(h, x, w.t())
    hh = h.clone()
    inplace = linear.linear_residual(x, w, residual=hh, out=hh, slices=slices)
    assert inplace is hh and rel(inplace, ref) < tol
    into = torch.full((b, 100), float("nan"), dtype=dtype)
    plain = linear.linear_residual(x, w, out=into, slices=slices)
    assert plain is into and rel(plain, x @ w.t()) < tol
    _, sq = linear.linear_residual(x, w, residual=h, slices=slices, row_sq=True)  # + its rows' sums of squares
    assert list(sq.shape) == [b, 7]  # 100 columns in tiles of 16
    assert rel(sq.sum(1), inplace.float().pow(2).sum(1)) < tol
    assert int(common._COUNTS[(x.device, "linear")].count_nonzero()) == 0
