"""The prompt pass's routed experts (kernels.moe_prompt: grouped GEMMs between the SiLU x up and the combine
kernels) against transformers' Qwen3MoeExperts, with and without the residual, an expert no pair touches
and a token whose pairs are all on one expert."""

from __future__ import annotations

import pytest
import torch

from qwenhw_native.kernels import moe, moe_prompt

from .test_moe import random_experts


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["float32", "bfloat16"])
@torch.no_grad()
def test_prompt_experts_match_transformers(dtype, tol, rel):
    g = torch.Generator().manual_seed(1)
    cfg, ex = random_experts(8, 40, g, dtype)
    t = 37
    idx = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(t)])  # expert 7: no pair
    idx[5] = torch.tensor([2, 2, 2])
    x = torch.randn(t, 48, generator=g).to(dtype)
    w = torch.rand(t, 3, generator=g).to(dtype)
    h = torch.randn(t, 48, generator=g).to(dtype)
    assert moe.supported(ex)
    ref = ex(x, idx, w)
    assert rel(moe_prompt.experts(x, ex, idx, w), ref) < tol
    assert rel(moe_prompt.experts(x, ex, idx, w, residual=h), h + ref) < tol
