"""The fused CPU experts kernel (cpu_moe.c) against transformers' own eager Qwen3-MoE experts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

from qwenhw_native import cpu_moe  # noqa: E402

if cpu_moe.load()[0] is None:
    pytest.skip(cpu_moe.load()[1], allow_module_level=True)


def _experts(E: int, H: int, I: int, K: int, seed: int) -> Qwen3MoeExperts:
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "eager"
    ex = Qwen3MoeExperts(cfg).to(torch.bfloat16).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.1)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.1)
    return ex


def _routing(T: int, E: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(T, E, generator=g).softmax(-1)
    w, idx = torch.topk(probs, K)
    return (w / w.sum(-1, keepdim=True)).bfloat16(), idx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# H and I off the 64-element vector width exercise the scalar tails
@pytest.mark.parametrize("E, H, I, K, T", [(8, 64, 32, 2, 1), (16, 256, 96, 4, 5), (8, 100, 36, 2, 3),
                                           (32, 512, 192, 8, 1)])
def test_kernel_matches_transformers_eager_experts(E, H, I, K, T):
    ex = _experts(E, H, I, K, seed=E + H)
    x = torch.randn(T, H).bfloat16()
    w, idx = _routing(T, E, K, seed=T)
    ref = ex(x, idx, w)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)  # poisoned: every element must be written
    counts = torch.zeros(E, dtype=torch.long)
    skipped = cpu_moe.moe_experts(ex.gate_up_proj.data, ex.down_proj.data, x, idx, w, out, counts=counts)
    assert skipped == 0
    assert not out.isnan().any()
    assert _rel(out, ref) < 2e-3  # same bf16 roundings; only fp32 summation order differs
    assert counts.tolist() == torch.bincount(idx.reshape(-1), minlength=E).tolist()


def test_skipped_experts_are_left_to_the_gpu_cache():
    E, H, I, K, T = 16, 128, 64, 4, 4
    ex = _experts(E, H, I, K, seed=3)
    x = torch.randn(T, H).bfloat16()
    w, idx = _routing(T, E, K, seed=4)
    skip = torch.zeros(E, dtype=torch.uint8)
    cached = idx[:, 0].unique()
    skip[cached] = 1
    out = torch.empty(T, H, dtype=torch.bfloat16)
    skipped = cpu_moe.moe_experts(ex.gate_up_proj.data, ex.down_proj.data, x, idx, w, out, skip=skip)
    assert skipped == int(skip[idx].sum())
    ref = ex(x, idx, w * (skip[idx] == 0))
    assert _rel(out, ref) < 2e-3
    assert _rel(out, ex(x, idx, w)) > 0.05  # the cached experts really were left out


def test_bad_expert_index_is_an_error_not_a_crash():
    ex = _experts(4, 64, 32, 2, seed=1)
    x = torch.randn(1, 64).bfloat16()
    idx = torch.tensor([[0, 4]])
    w = torch.tensor([[0.5, 0.5]]).bfloat16()
    with pytest.raises(ValueError, match="out of range 0..3"):
        cpu_moe.moe_experts(ex.gate_up_proj.data, ex.down_proj.data, x, idx, w, torch.empty(1, 64).bfloat16())


def test_unusable_weights_say_why():
    ex = _experts(4, 64, 32, 2, seed=1)
    assert cpu_moe.usable(ex.gate_up_proj.data.float(), ex.down_proj.data.float()).startswith("the kernel runs bf16")


def test_malformed_buffers_are_refused():
    ex = _experts(4, 64, 32, 2, seed=1)
    x = torch.randn(1, 64).bfloat16()
    w, idx = _routing(1, 4, 2, seed=2)
    gu, dn = ex.gate_up_proj.data, ex.down_proj.data
    with pytest.raises(ValueError, match="out must be"):
        cpu_moe.moe_experts(gu, dn, x, idx, w, torch.empty(1, 64))  # fp32
    with pytest.raises(ValueError, match="skip must be"):
        cpu_moe.moe_experts(gu, dn, x, idx, w, torch.empty(1, 64).bfloat16(), skip=torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="counts must be"):
        cpu_moe.moe_experts(gu, dn, x, idx, w, torch.empty(1, 64).bfloat16(), counts=torch.zeros(4, dtype=torch.int32))
