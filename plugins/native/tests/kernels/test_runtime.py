"""The runtime's decode steps through the Triton kernels (under the interpreter): the same greedy tokens as
transformers' generate, every kernel called where a decode step should call it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwenhw_native import step
from qwenhw_native.runtime import Filling, Runtime, SampleParams


@pytest.fixture
def calls(monkeypatch):
    """Which kernels the layer step calls (wrapping the modules step.py reaches them through)."""
    seen: list[str] = []
    for module, name, label in ((step.moe, "experts", "moe"), (step.attention, "decode_attention", "attention"),
                                (step.linear, "qkv_rope", "qkv"), (step.linear, "linear_residual", "o_proj"),
                                (step.router, "router", None), (step.moe_prompt, "experts", "moe_prompt"),
                                (step.rope_cache, "qk_rope_cache", "rope_cache")):
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
    # the prompt pass: one rope/cache kernel and the prompt experts per layer
    assert calls.count("rope_cache") == calls.count("moe_prompt") == 2
    short = list(rt.generate(prompt[2:], 8, SampleParams(), set()))
    pair = Runtime(model, 64, "cpu", graphs=False, batch=2).generate_batch([prompt, prompt[2:]], 8, SampleParams(),
                                                                            set())
    assert pair == [tokens, short]  # two prompts of different lengths decoded together, each row at its own position


def test_decode_past_the_slot_kernels_pairs_takes_the_grouped_gemms(tiny_moe, calls, monkeypatch):
    """Tiles.moe_max_pairs: a decode step routing more (token, expert) pairs than it takes the prompt pass's
    experts (sorted pairs, grouped GEMMs); a smaller one the slot kernels; past moe_index_pairs, the slot kernels
    with the pairs sorted once; all give transformers' tokens."""
    from qwenhw_native.kernels import tiles

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompts = [[785, 6722, 315, 9625, 374, 264], [785, 6722, 315]]
    top_k = model.config.num_experts_per_tok
    # one row's pairs, each program finding its own among them
    monkeypatch.setattr(tiles, "DEFAULT", tiles.DEFAULT.replace(moe_max_pairs=top_k, moe_index_pairs=1 << 30))
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist()
               for p in prompts]
    alone = Runtime(model, 64, "cpu", graphs=False)
    assert list(alone.generate(prompts[0], 4, SampleParams(), set())) == ref[0]
    assert calls.count("moe") == 2 * 3 and calls.count("moe_prompt") == 2  # decode steps: the slot kernels
    calls.clear()
    pair = Runtime(model, 64, "cpu", graphs=False, batch=2)
    assert pair.generate_batch(prompts, 4, SampleParams(), set()) == ref
    assert calls.count("moe") == 0 and calls.count("moe_prompt") == 2 * 4  # 2 rows: past the limit, grouped
    # past moe_index_pairs the slot kernels read the pairs one kernel sorted per layer (moe._moe_index)
    calls.clear()
    monkeypatch.setattr(tiles, "DEFAULT", tiles.DEFAULT.replace(moe_index_pairs=top_k, moe_max_pairs=2048))
    sorted_once = []
    real = step.moe.MoeCall.__init__

    def record(self, *a, **k):
        real(self, *a, **k)
        sorted_once.append(self.indexed)

    monkeypatch.setattr(step.moe.MoeCall, "__init__", record)
    pair = Runtime(model, 64, "cpu", graphs=False, batch=2)
    assert pair.generate_batch(prompts, 4, SampleParams(), set()) == ref
    assert calls.count("moe") == 2 * 3 and sorted_once == [True] * 6


def test_kernels_switched_off_by_the_config(tiny_moe, calls):
    """KernelConfig: with the MoE and projection kernels off, decode steps take transformers' experts and
    cuBLAS, and the tokens stay transformers'."""
    from qwenhw_native.config import KernelConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompt = [785, 6722, 315, 9625, 374, 264]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt):].tolist()
    rt = Runtime(model, 64, "cpu", graphs=False, kernels=KernelConfig(moe=False, linear=False, prompt=False))
    assert list(rt.generate(prompt, 4, SampleParams(), set())) == ref
    assert calls.count("moe") == calls.count("qkv") == calls.count("o_proj") == calls.count("moe_prompt") == 0
    # still on: attention in the 3 decode steps, the router kernel in them and in the prompt pass
    assert calls.count("attention") == 2 * 3 and calls.count("router") == 2 * 4


def test_prompt_passes_on_the_kernels_chunked_packed_and_joining(tiny_moe):
    """The prompt kernels (rope/cache per token row, the experts around grouped GEMMs) in every kind of pass:
    a long prompt chunk by chunk attending to its earlier slots, prompts of different lengths packed, and
    prompts into chosen rows: each prompt's last-token logits and its keys as one whole pass gives them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompts = [list(range(100, 123)), list(range(300, 311)), list(range(500, 511))]  # 23, 11, 11 tokens
    alone = Runtime(model, 64, "cpu", graphs=False)
    assert alone.step.fused and alone.step.kernels.prompt
    ref, keys = [], []
    for p in prompts:
        ref.append(alone.prefill(p)[0])
        keys.append(alone.k[:, 0, :, :len(p)].clone())
    for chunk in (5, 64):  # chunks of 5 (one prompt at a time), then whole prompts: 23 + 11 packed, 11 joining
        rt = Runtime(model, 64, "cpu", graphs=False, batch=3)
        rt.prefill_chunk = chunk
        got = rt.prefill(prompts)
        for j, p in enumerate(prompts):
            assert torch.allclose(got[j], ref[j], atol=1e-4, rtol=1e-4), (chunk, j)
            assert torch.allclose(rt.k[:, j, :, :len(p)], keys[j], atol=1e-5), (chunk, j)
    # two prompts of one length into rows 2 and 1 (prompts joining a batch): a batch pass on chosen rows
    rt.reset()
    done, got = rt.fill([Filling(2, prompts[1]), Filling(1, prompts[2])])
    assert done == [2, 1]
    for row, j in ((2, 1), (1, 2)):
        assert torch.allclose(got[done.index(row)], ref[j], atol=1e-4, rtol=1e-4)
        assert torch.allclose(rt.k[:, row, :, :len(prompts[j])], keys[j], atol=1e-5)


def test_prompts_joining_decoding_rows_go_in_with_their_decode_step(tiny_moe, streamed, alone):
    """A pass of whole prompts while rows decode carries those rows' next tokens (one pass instead of a pass
    and a decode step): every sequence gets the tokens it gets alone, and no decode step runs beside it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompts = [list(range(100, 104)), list(range(300, 311)), list(range(500, 507)), list(range(700, 709))]
    limits = [2, 5, 2, 2]
    from qwenhw_native.config import KernelConfig

    rt = Runtime(model, 64, "cpu", graphs=False, batch=2, kernels=KernelConfig(mixed=True))  # QWENHW_MIXED_PASSES=1
    assert rt.mixes
    events: list[str] = []
    real_decode, real_mix = rt.decode, rt.fill_and_decode

    def mix(*a):
        rows, logits, decoded = real_mix(*a)
        events.append("mixed" if decoded else "pass")
        return rows, logits, decoded

    rt.decode = lambda *a: events.append("decode") or real_decode(*a)
    rt.fill_and_decode = mix
    each = alone(model, prompts, limits)
    assert streamed(rt, prompts, limits) == each
    # prompts 0 and 1 go in alone; 2 and 3 each take a freed row beside the decoding sequence 1 (its third and
    # fifth tokens), with no decode step of their own
    assert events == ["pass", "decode", "mixed", "decode", "mixed", "decode"], events
    apart = Runtime(model, 64, "cpu", graphs=False, batch=2)  # the default
    assert not apart.mixes
    assert streamed(apart, prompts, limits) == each


def test_a_long_prompts_chunks_ride_the_decode_steps(tiny_moe, streamed, alone):
    """Mixed passes carry a long prompt's later chunks too, each over its row's earlier keys (vLLM's chunked
    prefill): while a row decodes, every chunk goes in with its decode step, none in a pass of its own, and
    both sequences get the tokens they get alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    short, long = list(range(100, 104)), list(range(300, 323))  # 4 tokens; 23: chunks of 5, 5, 5, 5, 3
    from qwenhw_native.config import KernelConfig

    rt = Runtime(model, 64, "cpu", graphs=False, batch=2, kernels=KernelConfig(mixed=True))
    rt.prefill_chunk = 5
    events: list[str] = []
    taken: list[list[int]] = []  # each pass's pieces: tokens of each prompt
    real_decode, real_mix, real_pieces = rt.decode, rt.fill_and_decode, rt._pieces
    rt.decode = lambda *a: events.append("decode") or real_decode(*a)
    rt.fill_and_decode = lambda *a: (lambda out: events.append("mixed" if out[2] else "pass") or out)(real_mix(*a))
    rt._pieces = lambda filling: (lambda out: taken.append([k for _, k in out]) or out)(real_pieces(filling))
    assert streamed(rt, [short, long], [12, 4]) == alone(model, [short, long], [12, 4])
    # the short prompt and the long one's first chunk in one pass; its other four chunks beside the short one's
    # decoding, each in the pass that is that row's step; then decode steps alone
    assert taken == [[4, 5], [5], [5], [5], [3]], taken
    assert events[:6] == ["pass", "decode", "mixed", "mixed", "mixed", "mixed"], events
    assert set(events[6:]) == {"decode"}


def test_rows_that_do_not_decode_route_to_no_expert(tiny_moe, monkeypatch):
    """A decode step computes the rows up to the last busy one; the free rows among them (at the scratch slot)
    get expert id -1 from the router kernel, so the experts' kernels read no expert for them, and the busy
    rows' tokens stay what they are alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompts = [list(range(100, 104)), list(range(300, 311)), list(range(500, 507)), list(range(700, 709))]
    limits = [2, 4, 2, 4]
    routed: list[torch.Tensor] = []
    real = step.router.router

    def router(*a, **k):
        weights, idx = real(*a, **k)
        routed.append(idx.clone())
        return weights, idx

    alone = Runtime(model, 64, "cpu", graphs=False)
    ref = {i: alone.generate_batch([p], n, SampleParams(), set())[0] for i, (p, n) in enumerate(zip(prompts, limits))}
    monkeypatch.setattr(step.router, "router", router)
    rt = Runtime(model, 64, "cpu", graphs=False, batch=4)
    got: dict[int, list[int]] = {}
    for seq, token, _ in rt.stream_batch(prompts, limits, SampleParams(), set()):
        got.setdefault(seq, []).append(token)
    assert got == ref
    routed = [idx for idx in routed if idx.shape[0] == 4]  # the decode steps' (the prompt pass routes 31 tokens)
    layers = model.config.num_hidden_layers
    first, later = routed[:layers], routed[-layers:]  # the first decode step: every row; the last: rows 1, 3
    assert all((idx >= 0).all() for idx in first)
    assert all((idx[[0, 2]] == -1).all() and (idx[[1, 3]] >= 0).all() for idx in later)


def test_warming_the_prompt_passes_leaves_the_runtime_as_it_was(tiny_moe):
    """Runtime.warm_prompts (on a GPU, at start: each kind of prompt pass once, so its kernels compile before
    the first request) runs a pass alone, packed and (mixed passes on) beside a decoding row, and leaves every
    row free: what runs next gets the tokens it gets without it."""
    from qwenhw_native.config import KernelConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompts = [list(range(100, 104)), list(range(300, 311))]
    cold = Runtime(model, 64, "cpu", graphs=False, batch=2).generate_batch(prompts, 3, SampleParams(), set())
    rt = Runtime(model, 64, "cpu", graphs=False, batch=2, kernels=KernelConfig(mixed=True))
    mixed: list[bool] = []
    real = rt.fill_and_decode
    rt.fill_and_decode = lambda *a: (lambda out: mixed.append(out[2]) or out)(real(*a))
    rt.warm_prompts()
    assert mixed == [True, True] and not any(rt.active) and rt.lengths == [0, 0]
    assert rt.generate_batch(prompts, 3, SampleParams(), set()) == cold


def test_a_paged_cache_through_the_kernels(tiny_moe, calls):
    """The decode kernels over a paged KV cache (kv_cache.py): a sequence across two pages, another waiting for
    the pool's pages; the tokens of a static cache. (Prompts on torch's path here, whose interpreted kernels
    would take minutes for 260 tokens; kernels/test_paged.py checks the rope/cache kernel's paged writes.)"""
    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kv_cache import PAGE

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    prompts = [list(range(1000, 1254)), list(range(2000, 2020))]  # the first crosses into its second page decoding
    runs = [Runtime(model, 300, "cpu", graphs=False, batch=2, kernels=KernelConfig(prompt=False),
                    kv_tokens=pool).generate_batch(prompts, 4, SampleParams(), set())
            for pool in (0, 2 * PAGE)]  # 258 slots: 2 pages, the whole pool; the second prompt waits
    assert runs[0] == runs[1] and all(len(t) == 4 for t in runs[1])
    assert calls.count("attention") > 0 and calls.count("qkv") > 0
