"""Split-KV decode attention (kernels.attention) against SDPA with the runtime's mask. Positions past the
current one hold NaN, so reading any of them would show."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenhw_native.kernels import attention


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("pos", [0, 37, 255, 256, 599])
def test_decode_attention_reads_the_filled_cache_only(dtype, tol, pos, rel):
    g = torch.Generator().manual_seed(pos)
    b, hq, hk, d, length = 2, 8, 2, 64, 600  # 3 splits of 256 positions
    q = torch.randn(b, hq, 1, d, generator=g).to(dtype)
    kc, vc = (torch.randn(b, hk, length, d, generator=g).to(dtype) for _ in range(2))
    kc[:, :, pos + 1:] = float("nan")  # past the current position: must never be read
    vc[:, :, pos + 1:] = float("nan")
    mask = torch.zeros(1, 1, 1, length, dtype=dtype)
    mask[..., pos + 1:] = float("-inf")
    ref = F.scaled_dot_product_attention(q, kc.nan_to_num(), vc.nan_to_num(), attn_mask=mask, scale=0.125,
                                         enable_gqa=True).transpose(1, 2).reshape(b, 1, -1)
    assert rel(attention.decode_attention(q, kc, vc, torch.tensor([pos]), 0.125), ref) < tol
    if pos >= 256:  # left padding: sequence 1 starts at slot 300 (or pos), its earlier slots are NaN
        first = min(300, pos)
        kc[1, :, :first] = float("nan")
        vc[1, :, :first] = float("nan")
        mask1 = mask.clone()
        mask1[..., :first] = float("-inf")
        ref1 = F.scaled_dot_product_attention(q[1:], kc[1:].nan_to_num(), vc[1:].nan_to_num(), attn_mask=mask1,
                                              scale=0.125, enable_gqa=True).transpose(1, 2).reshape(1, 1, -1)
        got1 = attention.decode_attention(q, kc, vc, torch.tensor([pos]), 0.125, torch.tensor([0, first]))[1:]
        assert rel(got1, ref1) < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_reads_each_sequence_up_to_its_own_position(dtype, tol, rel):
    """Continuous batching: every sequence of the batch at its own length (pos [b])."""
    g = torch.Generator().manual_seed(1)
    b, hq, hk, d, length = 3, 8, 2, 64, 600
    pos = [0, 300, 17]
    q = torch.randn(b, hq, 1, d, generator=g).to(dtype)
    kc, vc = (torch.randn(b, hk, length, d, generator=g).to(dtype) for _ in range(2))
    mask = torch.zeros(b, 1, 1, length, dtype=dtype)
    for j, p in enumerate(pos):
        kc[j, :, p + 1:] = vc[j, :, p + 1:] = float("nan")
        mask[j, ..., p + 1:] = float("-inf")
    ref = F.scaled_dot_product_attention(q, kc.nan_to_num(), vc.nan_to_num(), attn_mask=mask, scale=0.125,
                                         enable_gqa=True).transpose(1, 2).reshape(b, 1, -1)
    assert rel(attention.decode_attention(q, kc, vc, torch.tensor(pos), 0.125), ref) < tol
