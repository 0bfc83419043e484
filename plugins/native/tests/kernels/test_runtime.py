"""The runtime's decode steps through the Triton kernels (under the interpreter): the same greedy tokens as
transformers' generate, every kernel called where a decode step should call it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwenhw_native import step
from qwenhw_native.runtime import Runtime, SampleParams


@pytest.fixture
def calls(monkeypatch):
    """Which kernels the layer step calls (wrapping the modules step.py reaches them through)."""
    seen: list[str] = []
    for module, name, label in ((step.moe, "experts", "moe"), (step.attention, "decode_attention", "attention"),
                                (step.linear, "qkv_rope", "qkv"), (step.linear, "linear_residual", "o_proj"),
                                (step.router, "router", None)):
        real = getattr(module, name)

        def wrapped(*a, _real=real, _label=label, **k):
            seen.append(_label or ("router_norm" if k.get("norm") else "router"))
            return _real(*a, **k)

        monkeypatch.setattr(module, name, wrapped)
    return seen


def test_runtime_decodes_through_the_kernels(tiny_moe, calls):
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompt = [785, 6722, 315, 9625, 374, 264]
    rt = Runtime(model, 64, "cpu", graphs=False)
    assert rt.step.fused and not rt.step.pdl  # no dependent launches outside CUDA
    tokens = list(rt.generate(prompt, 8, SampleParams(), set()))
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert tokens == ref
    # both layers, every decode step (not the prompt), the projections on the decode GEMM kernels too, and the
    # router applying the post-attention RMSNorm from the sums of squares o_proj left
    for name in ("moe", "attention", "qkv", "o_proj", "router_norm"):
        assert calls.count(name) == 2 * 7, name
    short = list(rt.generate(prompt[2:], 8, SampleParams(), set()))
    pair = Runtime(model, 64, "cpu", graphs=False, batch=2).generate_batch([prompt, prompt[2:]], 8, SampleParams(),
                                                                            set())
    assert pair == [tokens, short]  # two prompts of different lengths decoded together, each row at its own position


def test_kernels_switched_off_by_the_config(tiny_moe, calls):
    """KernelConfig: with the MoE and projection kernels off, decode steps take transformers' experts and
    cuBLAS, and the tokens stay transformers'."""
    from qwenhw_native.config import KernelConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompt = [785, 6722, 315, 9625, 374, 264]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt):].tolist()
    rt = Runtime(model, 64, "cpu", graphs=False, kernels=KernelConfig(moe=False, linear=False))
    assert list(rt.generate(prompt, 4, SampleParams(), set())) == ref
    assert calls.count("moe") == calls.count("qkv") == calls.count("o_proj") == 0
    # still on: attention in the 3 decode steps, the router kernel in them and in the prompt pass
    assert calls.count("attention") == 2 * 3 and calls.count("router") == 2 * 4
