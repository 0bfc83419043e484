"""qwenhw's native engine runs the tiny Qwen3-MoE for real on the CPU (how CI checks it token for token):
the one-GPU runtime and the MoE hybrid (CPU experts, the GPU-cache path, streamed prefill), eagerly and
through the CUDA-graph code paths replayed eagerly; lists of prompts decoded together; long prompts in
chunks; the typed plan config and the kernel switches it carries."""

from __future__ import annotations

import os

import pytest

import qwenhw

pytestmark = pytest.mark.slow


def _greedy(engine, prompt):
    out = engine.generate(prompt, max_tokens=8, temperature=0)[0]
    return list(out.token_ids)


@pytest.mark.parametrize("engine, extra", [
    ("one-gpu", {}),
    ("hybrid", {}),
    ("hybrid", {"expert_cache_bytes": "half", "prefill_threshold": 4}),
    ("hybrid", {"expert_cache_bytes": "half", "cache_policy": "dynamic"}),
    ("hybrid", {"cpu_kernel": "torch"}),  # the fallback when no C compiler is there
    ("hybrid", {"cpu_kernel": "torch", "expert_cache_bytes": "half"}),
    ("one-gpu", {"cuda_graphs": "emulate"}),  # the graph-replay code paths, eagerly on the CPU
    ("hybrid", {"cuda_graphs": "emulate", "expert_cache_bytes": "half"}),
])
def test_lean_runtime_engines_match_transformers(tiny_moe, hf_reference, engine, extra):
    """The fast path and the MoE hybrid (CPU experts, GPU-cache path, streamed prefill) run the
    same arithmetic as transformers: identical greedy tokens on the tiny checkpoint."""
    import torch

    plan = qwenhw.plan(str(tiny_moe), backend="native", engine=engine, context=256)
    assert plan.engine == engine and plan.fits
    config = dict(plan.config)
    if extra.get("expert_cache_bytes") == "half":
        from qwenhw.models.checkpoint import split_weight_bytes

        config["expert_cache_bytes"] = split_weight_bytes(str(tiny_moe))["experts"] // 2
    config.update({k: v for k, v in extra.items() if k != "expert_cache_bytes"})
    with qwenhw.load(plan.replace(config=config)) as eng:
        assert _greedy(eng, hf_reference["prompt"]) == hf_reference["tokens"]
        if engine == "hybrid":
            stats = eng.hybrid.stats
            assert stats["cpu_experts"] > 0
            assert eng.hybrid.cpu_kernel.startswith(extra.get("cpu_kernel", "fused"))
            if eng.hybrid.fused:  # the CPU experts run at the thread count that timed fastest of those tried
                tried = eng.hybrid.threads["ms"]
                assert torch.get_num_threads() == eng.hybrid.threads["threads"] == min(tried, key=tried.get)
                assert max(tried) == min(int(config["threads"]), os.cpu_count()) and min(tried.values()) > 0
            if extra.get("expert_cache_bytes"):
                assert stats["gpu_experts"] > 0  # the cache path ran too
            if extra.get("prefill_threshold"):
                assert stats["streamed_layers"] > 0
        if extra.get("cuda_graphs") == "emulate":
            assert eng.runtime._step_graphs or eng.runtime._layer_graphs
        streamed = "".join(eng.stream(hf_reference["prompt"], max_tokens=8, temperature=0))
        assert streamed == eng.generate(hf_reference["prompt"], max_tokens=8, temperature=0)[0].text


def test_hybrid_cache_serves_decode_sized_calls_only(tiny_moe):
    """The GPU cache gathers one expert matrix per (token, k) pair, so only decode-sized calls use it; a
    longer call (a short prompt under the prefill threshold) runs every expert in the CPU kernel."""
    import torch

    from qwenhw.models.checkpoint import split_weight_bytes
    from qwenhw_native import cpu_moe
    from qwenhw_native.hybrid import CACHE_MAX_PAIRS

    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="hybrid", context=256)
    config = {**plan.config, "expert_cache_bytes": split_weight_bytes(str(tiny_moe))["experts"] // 2}
    with qwenhw.load(plan.replace(config=config)) as eng, torch.inference_mode():
        hybrid = eng.hybrid
        assert hybrid.slots > 0 and hybrid.fused
        g = torch.Generator().manual_seed(0)
        small_hits = 0
        for i in hybrid.cpu:
            k = eng.runtime.layers[i].mlp.gate.top_k
            for tokens in (1, CACHE_MAX_PAIRS // k + 1):
                h = torch.randn(tokens, 1, eng.runtime.cfg.hidden_size, generator=g).to(torch.bfloat16)
                flat, weights, idx = hybrid.route(i, h)
                before = hybrid.stats["gpu_experts"]
                out = hybrid.experts(i, flat, weights, idx)
                cached = hybrid.stats["gpu_experts"] - before
                if idx.numel() <= CACHE_MAX_PAIRS:
                    assert cached == int(hybrid.skip[i][idx].sum())
                    small_hits += cached
                else:  # all on the CPU: exactly the kernel's answer with nothing skipped
                    every = torch.empty_like(flat)
                    cpu_moe.moe_experts(*hybrid.cpu[i], flat, idx, weights, every)
                    assert cached == 0 and torch.equal(out, every)
        assert small_hits > 0  # the cache path did run for the one-token calls


@pytest.mark.parametrize("graphs", [False, "emulate"])
def test_fast_path_decodes_prompts_continuously_like_one_at_a_time(tiny_moe, graphs):
    """A plan for several concurrent sequences decodes prompt lists continuously on `concurrency` rows: a
    row whose sequence ends takes the next prompt while the others go on, each row at its own length. Every
    prompt (different lengths, different max_tokens) gets the tokens it gets alone."""
    from qwenhw.engine.base import Sampling
    from qwenhw_native.sampling import SampleParams

    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=256, concurrency=3)
    prompts = ["The capital of France is", "1, 2, 3, 4, 5,", "Hi", "def add(a, b):\n    return", "Qwen"]
    most = [9, 2, 6, 3, 7]
    with qwenhw.load(plan.replace(config={**plan.config, "cuda_graphs": graphs})) as eng:
        rt = eng.batched
        assert rt is not None and rt.batch == 3 and eng.continuous
        admitted, real = [], rt._prompt_pass

        def spy(pieces, *a):  # which rows took a prompt, and which rows were decoding then
            admitted.append(([f.row for f, _ in pieces], list(rt.active)))
            return real(pieces, *a)

        rt._prompt_pass = spy
        samplings = [Sampling(max_tokens=m, temperature=0, ignore_eos=True) for m in most]
        pieces = list(eng.stream_batch(prompts, samplings, stream=False))
        del rt._prompt_pass
        alone = [eng.runtime.generate_batch([eng.tokenizer(p).input_ids], m, SampleParams(), set())[0]
                 for p, m in zip(prompts, most)]
    ends = {p.row: p for p in pieces if p.finish}
    assert [ends[r].tokens for r in range(5)] == most  # ignore_eos: each row to its own max_tokens
    texts = ["".join(p.text for p in pieces if p.row == r) for r in range(5)]
    assert texts == [eng.tokenizer.decode(t, skip_special_tokens=True) for t in alone]
    # the first three together, then rows 1 (2 tokens) and 2 or 1 again taken over one at a time by the
    # waiting prompts while row 0 (9 tokens) kept decoding at its own length
    assert admitted[0][0] == [0, 1, 2] and len(admitted) == 3
    assert all(len(rows) == 1 and active[0] and not active[rows[0]] for rows, active in admitted[1:])


def test_asynchronous_steps_give_what_one_step_at_a_time_gives(tiny_moe):
    """KernelConfig.async_steps (QWENHW_ASYNC_STEPS): the next decode step launches before the last one's
    tokens go out. A row whose sequence ends at its EOS then computes one token that goes nowhere; a row at its
    last token by count launches no further step. Each sequence gets what one step at a time gives it (the
    sequences' pieces interleave differently): sequences ending at an EOS, at their max_tokens and at a full
    cache, rows taken over as they free up, a client that leaves."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.runtime import Runtime, SampleParams

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    prompts = [list(range(100, 104)), list(range(300, 311)), list(range(500, 507)), list(range(700, 709)),
               list(range(900, 950))]
    most = [12, 3, 7, 30, 40]  # the last: 50 + 14 tokens fill its 64-slot row
    first = Runtime(model, 64, "cpu", graphs=False).generate_batch([prompts[0]], 12, SampleParams(), set())[0]
    eos = {first[5]}  # sequence 0 ends at its sixth token
    runs = {}
    for steps in (False, True):
        rt = Runtime(model, 64, "cpu", graphs=False, batch=2, kernels=KernelConfig(async_steps=steps))
        events: list[str] = []
        real_decode, real_pass = rt.decode, rt.fill_and_decode
        rt.decode = lambda *a: events.append("step") or real_decode(*a)
        rt.fill_and_decode = lambda *a: events.append("pass") or real_pass(*a)
        gone: set[int] = set()
        out = []
        for seq, token, last in rt.stream_batch(prompts, most, SampleParams(), eos, alive=lambda i: i not in gone):
            out.append((seq, token, last))
            events.append("token")
            if seq == 2 and len([o for o in out if o[0] == 2]) == 3:
                gone.add(2)  # its client leaves after 3 tokens
        per: dict[int, list[tuple[int, bool]]] = {}
        for seq, token, last in out:
            per.setdefault(seq, []).append((token, last))
        runs[steps] = per, events.count("step"), ",".join(events)
    (sync, sync_steps, sync_order), (both, async_steps, async_order) = runs[False], runs[True]
    assert both == sync and len(sync) == 5
    # one at a time, a prompt's first token goes out after its pass; asynchronous, the pass and the step after
    # it both go to the device before the tokens of the turn before go out
    assert "pass,token" in sync_order and "pass,token" not in async_order and "pass,step" in async_order
    ends = {seq: got[-1][0] for seq, got in sync.items() if got[-1][1]}
    assert ends[0] in eos and len(sync[0]) == 6 and 2 not in ends and len(sync[2]) == 3
    assert len(sync[1]) == 3 and len(sync[3]) == 30 and len(sync[4]) == 64 - 50
    assert async_steps <= sync_steps + 1  # at most the EOS row's token that went nowhere (a step alone)


def test_a_long_prompt_goes_in_chunk_by_chunk_between_decode_steps(tiny_moe, streamed, alone):
    """Chunked prefill: a prompt longer than a chunk goes in one chunk per pass (the first beside a short
    prompt) while the other rows keep decoding (a decode step between every two chunks), and both get the
    tokens they get alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.runtime import Runtime

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    short, long = list(range(100, 104)), list(range(300, 323))  # 4 tokens; 23: 5 chunks of 5
    rt = Runtime(model, 64, "cpu", graphs=False, batch=2)
    rt.prefill_chunk = 5
    events: list[str] = []
    real_pass, real_decode = rt._prompt_pass, rt.decode
    rt._prompt_pass = lambda pieces, *a: events.append("+".join(str(k) for _, k in pieces)) or real_pass(pieces, *a)
    rt.decode = lambda *a: events.append("decode") or real_decode(*a)
    assert streamed(rt, [short, long], [12, 4]) == alone(model, [short, long], [12, 4])
    assert ",".join(events).startswith("4+5,decode,5,decode,5,decode,5,decode,3,decode"), events


@pytest.mark.parametrize("graphs", [False, "emulate"])
def test_a_paged_cache_gives_the_static_caches_tokens_and_admits_by_pages(tiny_moe, graphs):
    """A KV pool in pages (kv_cache.py): sequences take pages for their prompt and answer when they go in and
    give them back when they end; one that does not fit the pool waits, in order, while rows are free. Every
    sequence gets the tokens a static cache gives it, across page boundaries (in a prompt's chunks and in decode
    steps)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.kv_cache import PAGE
    from qwenhw_native.runtime import Runtime, SampleParams

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    # pages: 2 (300 + 8 slots), 1, 2, 1 -- a pool of 3 pages holds the first two; the third waits
    prompts = [list(range(100, 400)), list(range(500, 520)), list(range(600, 870)), list(range(900, 905))]
    most = [8, 8, 8, 8]
    runs = []
    for pool in (0, 3 * PAGE):
        rt = Runtime(model, 600, "cpu", graphs=graphs, batch=3, kv_tokens=pool)
        rt.prefill_chunk = 128  # the first prompt in chunks: 0-127, 128-255, 256-299 (the second page)
        out = list(rt.stream_batch(prompts, most, SampleParams(), set()))
        runs.append(out)
        assert all(not held for held in rt.cache.held) and rt.lengths == [0, 0, 0]
    static, paged = runs
    tokens = lambda run: {s: [t for q, t, _ in run if q == s] for s in range(4)}  # noqa: E731
    assert tokens(paged) == tokens(static) and all(len(t) == 8 for t in tokens(paged).values())
    order = [(q, last) for q, _, last in paged]
    first_of_2 = next(i for i, (q, _) in enumerate(order) if q == 2)
    assert any(last for _, last in order[:first_of_2])  # it went in once a sequence had ended
    assert rt.cache.free_tokens == 3 * PAGE and int(rt.cache.table_host.abs().sum()) == 0
    # a waiting request whose client leaves never goes in; the one behind it does
    admitted = []
    real = rt.admit
    rt.admit = lambda row, n, ids=None: admitted.append(n) or real(row, n, ids)
    left = list(rt.stream_batch(prompts, most, SampleParams(), set(), alive=lambda seq: seq != 2))
    assert tokens(left) == {**tokens(paged), 2: []} and admitted == [301, 21, 6]  # a prompt's pages and one slot


@pytest.mark.parametrize("graphs,steps", [(False, False), ("emulate", True)])
def test_answers_take_pages_as_they_grow_and_the_newest_gives_them_back(tiny_moe, graphs, steps):
    """Lazy pages and preemption (vLLM's): a sequence goes in with its prompt's pages and takes one more as its
    answer reaches it; where the pool has none left the newest sequence gives its pages back, waits first in
    line and goes in again with its tokens so far as prompt. Every sequence gets the static cache's tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kv_cache import PAGE
    from qwenhw_native.runtime import Runtime, SampleParams

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    # a pool of 3 pages, each prompt in one: sequence 0 reaches its second page at its 7th token, when the pool
    # has none free; sequence 2, the newest, gives its page back and goes in again once 0 is done
    prompts = [list(range(100, 350)), list(range(400, 410)), list(range(500, 600))]
    most = [20, 40, 30]
    runs = []
    for pool, prefix in ((0, False), (3 * PAGE, True), (3 * PAGE, False)):  # prefix caching: nothing to share
        rt = Runtime(model, 600, "cpu", graphs=graphs, batch=3, kv_tokens=pool,
                     kernels=KernelConfig(async_steps=steps), prefix_caching=prefix)
        runs.append(list(rt.stream_batch(prompts, most, SampleParams(), set())))
    static, cached, paged = runs
    tokens = lambda run: {s: [t for q, t, _ in run if q == s] for s in range(3)}  # noqa: E731
    assert tokens(paged) == tokens(static) == tokens(cached) and [len(t) for t in tokens(paged).values()] == most
    assert rt.preemptions == 1 and rt.cache.free_tokens == 3 * PAGE
    order = [q for q, _, _ in paged]
    # sequence 2 had tokens before it gave its page back and the rest only after sequence 0 ended
    assert 0 < order.index(2) and order.index(0) < order.index(2) and max(
        i for i, q in enumerate(order) if q == 0) < max(i for i, q in enumerate(order) if q == 2)
    last_0 = max(i for i, q in enumerate(order) if q == 0)
    assert 0 < sum(q == 2 for q in order[:last_0]) < most[2]


@pytest.mark.parametrize("graphs", [False, "emulate"])
def test_long_prompts_prefill_one_sequence_one_chunk_at_a_time(tiny_moe, graphs):
    """Prompts longer than the runtime's prefill chunk (the planner reserves activations for that many
    tokens per sequence) go one sequence and one chunk at a time, each chunk attending to the sequence's
    earlier slots: the same last-token logits, keys and greedy tokens as one pass over the batch (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.runtime import Runtime, SampleParams

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    prompts = [list(range(100, 123)), list(range(300, 311))]  # 23 and 11 tokens: 5, 3 chunks of 5
    whole, chunked = (Runtime(model, 64, "cpu", graphs=graphs, batch=2) for _ in range(2))
    chunked.prefill_chunk = 5
    a, b = whole.prefill(prompts), chunked.prefill(prompts)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # the same keys in every slot a sequence owns: each row from slot 0
    assert torch.allclose(whole.k[:, 0, :, :23], chunked.k[:, 0, :, :23], atol=1e-5)
    assert torch.allclose(whole.k[:, 1, :, :11], chunked.k[:, 1, :, :11], atol=1e-5)
    assert whole.lengths == chunked.lengths == [23, 11]
    tokens = [whole.generate_batch(prompts, 6, SampleParams(), set()),
              chunked.generate_batch(prompts, 6, SampleParams(), set())]
    assert tokens[0] == tokens[1] and all(len(t) == 6 for t in tokens[1])
    assert chunked.lengths == [0, 0]  # every row free again


def test_fast_path_refuses_a_prompt_longer_than_the_planned_context(tiny_moe):
    """Alone or in a list, a prompt that fills the planned context stops with a message naming the fix."""
    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=16, concurrency=2)
    long = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    with qwenhw.load(plan) as eng:
        for prompts in (long, [long, "Hi"]):
            with pytest.raises(ValueError, match="16-token context .* plan a longer --context"):
                eng.generate(prompts, max_tokens=2, temperature=0)


def test_a_prompt_the_server_counted_is_not_encoded_again(tiny_moe):
    """A server counts each prompt's tokens before it goes in (its length check); the engine keeps those ids
    and encodes only the prompts it has not counted, as one batch: the same tokens either way."""

    class Counting:  # the real tokenizer, recording what it is asked to encode
        def __init__(self, inner):
            self.inner, self.encoded = inner, []

        def __call__(self, text, **kw):
            self.encoded += [text] if isinstance(text, str) else list(text)
            return self.inner(text, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=64, concurrency=2)
    prompts = ["The capital of France is", "One two three four"]
    with qwenhw.load(plan) as eng:
        before = [list(o.token_ids) for o in eng.generate(prompts, max_tokens=3, temperature=0)]
        eng.tokenizer = Counting(eng.tokenizer)
        assert eng.count_tokens(prompts[0]) > 0
        after = [list(o.token_ids) for o in eng.generate(prompts, max_tokens=3, temperature=0)]
        assert after == before
        assert eng.tokenizer.encoded == [prompts[0], prompts[1]]  # counted once; the other encoded in a batch


def test_the_plans_prompt_pass_budget_reaches_the_runtimes(tiny_moe):
    """NativeConfig.prefill_tokens (the planner lowers it where a larger pass's activations would keep rows off
    the GPU): the runtimes take no more prompt tokens per pass, idle or while rows decode."""
    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=64, concurrency=3)
    with qwenhw.load(plan.replace(config={**plan.config, "prefill_tokens": 16})) as eng:
        rt = eng.batched
        assert rt.prefill_tokens == rt.step_prefill_tokens == eng.runtime.prefill_tokens == 16
        passes: list[list[int]] = []
        real = rt._prompt_pass
        rt._prompt_pass = lambda pieces, *a: passes.append([k for _, k in pieces]) or real(pieces, *a)
        rt.prefill([list(range(100, 110)), list(range(200, 210)), list(range(300, 305))])
    assert passes == [[10, 6], [4, 5]]  # 10 + 10 > 16: the second prompt cut where the first pass ends


@pytest.mark.parametrize("graphs", [False, "emulate"])
def test_a_prompt_that_starts_like_an_earlier_one_goes_in_from_its_cached_pages(tiny_moe, graphs):
    """Prefix caching (NativeConfig.prefix_caching): a prompt whose first pages another prompt filled before
    goes in from the first token after them, over the keys those pages hold, and gets the tokens it gets
    without the cache; the same prompt again takes all its pages but the last (whose logits give its first
    token)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.kv_cache import PAGE
    from qwenhw_native.runtime import Runtime, SampleParams

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    a = list(range(1000, 1000 + 2 * PAGE + 88))
    b = a[:2 * PAGE] + list(range(5000, 5050))
    plain = Runtime(model, 1200, "cpu", graphs=graphs, batch=2, kv_tokens=8 * PAGE)
    want = [plain.generate_batch([p], 6, SampleParams(), set())[0] for p in (a, b, a)]
    rt = Runtime(model, 1200, "cpu", graphs=graphs, batch=2, kv_tokens=8 * PAGE, prefix_caching=True)
    starts: list[list[int]] = []
    real = rt._pieces
    rt._pieces = lambda filling: (lambda out: starts.append([f.done for f, _ in out]) or out)(real(filling))
    got = [rt.generate_batch([p], 6, SampleParams(), set())[0] for p in (a, b, a)]
    assert got == want
    assert starts == [[0], [2 * PAGE], [2 * PAGE]] and rt.cache.hit == 4 * PAGE
    assert rt.cache.queried == 2 * len(a) + len(b)
    assert not plain.cache.prefix and plain.cache.hit == 0


def test_a_preempted_sequence_goes_in_again_over_its_own_cached_pages(tiny_moe):
    """Prefix caching under preemption: a sequence that gave its pages back keeps its prompt's whole page named,
    and goes in again from the token after it; every sequence gets the tokens it gets without the cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwenhw_native.kv_cache import PAGE
    from qwenhw_native.runtime import Runtime, SampleParams

    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    # two 300-token prompts (two pages each, the first named) in a pool of five pages: at their 213th token
    # each needs a third; the older takes the last free one, the newer gives its pages back and goes in again
    # once the older is done, over its own named page
    prompts = [list(range(1000, 1300)), list(range(2000, 2300))]
    runs = []
    for cached in (False, True):
        rt = Runtime(model, 600, "cpu", graphs=False, batch=2, kv_tokens=5 * PAGE, prefix_caching=cached)
        runs.append(rt.generate_batch(prompts, 260, SampleParams(), set()))
        assert rt.preemptions == 1
    assert runs[0] == runs[1] and [len(t) for t in runs[1]] == [260, 260]
    assert rt.cache.hit == PAGE  # the newer's first page, when it went in again


@pytest.mark.parametrize("prompts,tokens,chunk,budget", [(16, 1500, 2048, 8192), (2, 5000, 2048, 32768),
                                                         (64, 1024, 2048, 32768), (7, 9, 4, 10)])
def test_the_planner_counts_the_passes_the_runtime_makes(prompts, tokens, chunk, budget):
    """The planner's prefill passes (qwenhw.planning.speed.budget_passes) are what Runtime._pieces takes, pass
    by pass, for prompts of one length."""
    from types import SimpleNamespace

    from qwenhw.planning import speed
    from qwenhw_native.runtime import Filling, Runtime

    rt = SimpleNamespace(active=[False], prefill_tokens=budget, step_prefill_tokens=budget, prefill_chunk=chunk,
                         max_len=tokens + 1)
    filling = [Filling(r, [0] * tokens) for r in range(prompts)]
    passes = []
    while filling:
        pieces = Runtime._pieces(rt, filling)
        passes.append(sum(k for _, k in pieces))
        for f, k in pieces:
            f.done += k
        filling = [f for f in filling if f.done < tokens]
    assert passes == [p.tokens for p in speed.budget_passes(prompts, tokens, chunk, budget)]


def test_plan_config_is_typed_and_reported(tiny_moe):
    """A native plan's config is NativeConfig's JSON: read back whole, unknown keys refused with the closest
    name, and the kernels it switches reported by the loaded engine."""
    from qwenhw.errors import BadInput
    from qwenhw_native.config import NativeConfig

    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="hybrid", context=64)
    cfg = NativeConfig.of(plan)
    assert cfg.to_dict() == plan.config and cfg.main_device == "cpu" and not cfg.cuda_graphs
    with pytest.raises(BadInput, match="cache_polcy.*cache_policy"):
        NativeConfig.of(plan.replace(config={**plan.config, "cache_polcy": "static"}))
    switched = plan.replace(config={**plan.config, "kernels": {"cpu_kernel": False}})
    with qwenhw.load(switched) as eng:
        assert eng.info["kernels"]["cpu_kernel"] is False and eng.info["kernels"]["moe"] is True
        assert eng.hybrid.cpu_kernel.startswith("torch (the CPU kernel is switched off")


def test_plans_saved_under_the_offload_backends_names_still_load(tiny_moe, hf_reference):
    """Before the native backend, its engines were the offload backend's: a plan saved then (JSON) loads
    and runs on the native backend, and says so in its history; requests by the old names still plan."""
    import json

    from qwenhw.planning.plan import Plan

    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=64)
    old = json.loads(plan.to_json())
    old.update(backend="offload", engine="transformers-fast")
    old["config"] = {**old["config"], "cuda_graphs": True, "decode_experts": "grouped_mm"}  # as saved then
    saved = Plan.from_dict(json.loads(json.dumps(old)))
    with qwenhw.load(saved) as eng:
        assert eng.plan.backend == "native" and eng.plan.engine == "one-gpu"
        assert any("saved as offload (transformers-fast)" in h for h in eng.plan.history)
        assert _greedy(eng, hf_reference["prompt"]) == hf_reference["tokens"]
    for old_name, new in (("hybrid-moe", "hybrid"), ("transformers-fast", "one-gpu")):
        p = qwenhw.plan(str(tiny_moe), backend="offload", engine=old_name, context=64)
        assert (p.backend, p.engine) == ("native", new)


def test_the_servers_metrics_show_the_kv_pool_held_while_a_request_decodes(tiny_moe):
    """/metrics reads the engine's KV cache at each scrape (vLLM's kv_cache_usage_perc, num_preemptions and
    prefix cache counters): a share of the pool held while a streamed answer decodes, none once it is done."""
    import http.client

    import openai

    from qwenhw.serve import make_server

    plan = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=512, concurrency=2)
    with qwenhw.load(plan) as eng:
        assert eng.batched.cache.paged
        server = make_server(eng, "127.0.0.1", 0, served_model_name="tiny")
        server.start()
        host, port = server.server_address[:2]

        def metric(name: str) -> float:
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("GET", "/metrics")
            lines = conn.getresponse().read().decode().splitlines()
            return next(float(line.split()[-1]) for line in lines if line.startswith(name + " "))

        try:
            client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
            stream = client.completions.create(model="tiny", prompt="Count: 1, 2, 3,", max_tokens=300,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            next(iter(stream))
            held = metric("qwenhw:kv_cache_usage_perc")
            list(stream)
            assert 0 < held < 1 and metric("qwenhw:kv_cache_usage_perc") == 0
            assert metric("qwenhw:num_preemptions_total") == eng.batched.preemptions == 0
            # prefix caching (vLLM's counters, in prompt tokens): the second of two prompts alike finds the
            # first's whole page
            asked = metric("qwenhw:prefix_cache_queries_total")
            assert asked == eng.batched.cache.queried > 0 and metric("qwenhw:prefix_cache_hits_total") == 0
            long = "one two three four " * 80
            for _ in range(2):
                client.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0)
            n = eng.count_tokens(long)
            assert 256 < n < 512 and metric("qwenhw:prefix_cache_queries_total") == asked + 2 * n
            assert metric("qwenhw:prefix_cache_hits_total") == 256
        finally:
            server.shutdown()
            server.server_close()
    off = qwenhw.plan(str(tiny_moe), backend="native", engine="one-gpu", context=512, concurrency=2,
                      prefix_caching=False)
    with qwenhw.load(off) as eng:  # --no-prefix-caching: nothing named, no prefix counters
        assert eng.batched.cache.paged and not eng.batched.cache.prefix and "prefix_hits" not in eng.kv_cache()
