"""The MoE router kernels (kernels.router) against transformers' Qwen3MoeTopKRouter: the routing alone, the
router GEMM + routing for decode-sized calls, and with the post-attention RMSNorm applied inside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeRMSNorm, Qwen3MoeTopKRouter

from qwenhw_native.kernels import common, router

CASES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


def _router(hidden: int, dtype: torch.dtype, g: torch.Generator) -> Qwen3MoeTopKRouter:
    cfg = Qwen3MoeConfig(hidden_size=hidden, num_experts=60, num_experts_per_tok=6, norm_topk_prob=True)
    r = Qwen3MoeTopKRouter(cfg).to(dtype)
    with torch.no_grad():
        r.weight.copy_(torch.randn(60, hidden, generator=g))
    return r


def _same_ids(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(-1).values, b.sort(-1).values)  # ties may swap the order


@pytest.mark.parametrize("dtype, tol", CASES)
def test_routing_follows_transformers(dtype, tol, rel):
    g = torch.Generator().manual_seed(0)
    r = _router(32, dtype, g)
    with torch.no_grad():
        logits, w_ref, i_ref = r(torch.randn(7, 32, generator=g).to(dtype))
        w, i = router.route(logits, 6, True)
    assert _same_ids(i, i_ref) and rel(w, w_ref) < tol


@pytest.mark.parametrize("dtype, tol", CASES)
def test_router_gemm_and_routing_in_one_kernel(dtype, tol, rel):
    """The last of the kernel's programs routes, and leaves its counter at zero for the next call."""
    g = torch.Generator().manual_seed(1)
    big = _router(128, dtype, g)
    x = torch.randn(5, 128, generator=g).to(dtype)
    with torch.no_grad():
        _, w_ref, i_ref = big(x)
        assert router.router_fits(big, x)
        w, i = router.gate_route(big, x)
        w2, i2 = router.gate_route(big, x)
    assert _same_ids(i, i_ref) and rel(w, w_ref) < tol
    assert torch.equal(i2, i) and torch.equal(w2, w)
    assert int(common._COUNTS[(x.device, "router")].abs().sum()) == 0


@pytest.mark.parametrize("dtype, tol", CASES)
def test_router_applies_the_rms_norm_from_the_rows_sums_of_squares(dtype, tol, rel):
    """One GPU: o_proj's kernel leaves the sums of squares of its rows; the router kernel normalises the rows
    with them, writes the normalised rows (the experts' input) and routes them."""
    g = torch.Generator().manual_seed(2)
    big = _router(128, dtype, g)
    pn = Qwen3MoeRMSNorm(128).to(dtype)
    with torch.no_grad():
        pn.weight.copy_(1 + 0.2 * torch.randn(128, generator=g))
        h = 3 * torch.randn(5, 128, generator=g).to(dtype)
        xn_ref = F.rms_norm(h.float(), (128,), pn.weight.float(), pn.variance_epsilon)
        xn = torch.full_like(h, float("nan"))
        sq = h.float().pow(2).view(5, 4, 32).sum(-1)  # the sums of squares o_proj leaves, in 4 parts
        w, i = router.router(h, big.weight, 6, True, norm=(pn.weight, pn.variance_epsilon, sq), xn=xn)
        _, w_ref, i_ref = big(xn_ref.to(dtype))
    assert rel(xn, xn_ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:
        assert _same_ids(i, i_ref) and rel(w, w_ref) < tol
