"""The workload in a request and the choice made for it: estimates carry TTFT, TPOT, request latency and
throughput; plans rank by the goal; every candidate is listed with its estimate; all are planned at the
same context, shortened only where that keeps weights on the GPU, and saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

import qwenhw
from qwenhw.planning import speed
from qwenhw.planning.plan import Estimate, Plan
from qwenhw.planning.workload import DEFAULT_CONTEXT, TOKENIZE_S, Workload, estimate, from_rates, workload


def test_estimate_is_what_a_user_feels():
    w = Workload(prompt_tokens=1000, output_tokens=101, concurrency=4, goal="throughput")
    e = estimate(0.01, 0.5, w, "x", ("fit",))
    assert e.ttft_s == pytest.approx(0.5 + TOKENIZE_S * 4000)
    assert e.latency_s == pytest.approx(e.ttft_s + 100 * 0.01)
    assert e.total_tok_s == pytest.approx(4 * 101 / e.latency_s)
    assert e.throughput_tok_s == pytest.approx(400) and e.decode_tok_s == pytest.approx(100)
    assert e.prefill_tok_s == pytest.approx(4000 / e.ttft_s) and e.basis == ("fit",)
    # a backend that gives only rates (a third party's) gets the workload figures from them
    rates = from_rates(Estimate(decode_tok_s=50, throughput_tok_s=200, prefill_tok_s=8000), w)
    assert rates.tpot_s == pytest.approx(0.02) and rates.ttft_s == pytest.approx(0.5)
    assert rates.basis == ("the backend's own decode and prefill rates",)


def test_workload_defaults_and_goal():
    req = qwenhw.api.make_request()
    w = workload(req)
    assert (w.prompt_tokens, w.output_tokens, w.goal) == (1024, 256, "latency")
    assert workload(qwenhw.api.make_request(concurrency=8)).goal == "throughput"
    assert workload(qwenhw.api.make_request(concurrency=8, goal="latency")).goal == "latency"


@pytest.mark.parametrize("kw, words", [
    (dict(prompt_tokens=0), "--prompt-tokens 0"),
    (dict(output_tokens=-3), "--output-tokens -3"),
    (dict(goal="fast"), "latency"),
    (dict(context=1000, prompt_tokens=900, output_tokens=200), "--context 1100"),
    (dict(context=1000, prompt_tokens=1000), "--context 1001"),
])
def test_bad_workloads_say_how_to_fix_them(kw, words):
    with pytest.raises(qwenhw.BadInput, match=words.replace("-", "\\-")):
        qwenhw.api.make_request(**kw)


def test_a_workload_longer_than_the_model_is_refused():
    with pytest.raises(qwenhw.BadInput, match="40960"):
        qwenhw.plan("Qwen3-8B", hardware="1xH100-80G", prompt_tokens=40000, output_tokens=2000)


def test_plans_rank_by_the_goal_and_explain_the_trade_off():
    one = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G")
    assert one.goal == "latency" and (one.prompt_tokens, one.output_tokens) == (1024, 256)
    e = one.estimate
    assert e.ttft_s > 0 and e.tpot_s > 0 and e.latency_s == pytest.approx(e.ttft_s + 255 / e.decode_tok_s)
    assert e.tpot_s == pytest.approx(1 / e.decode_tok_s)  # one sequence: no other prompt goes in while it decodes
    fitting = [c for c in one.candidates if c["fits"] and c["available"]]
    assert fitting[0]["engine"] == one.engine  # the candidates list starts with the chosen plan
    assert all(fitting[0]["estimate"]["latency_s"] <= c["estimate"]["latency_s"] for c in fitting)
    chosen_over = [r for r in one.reasons if r.startswith("chosen over vllm")]
    assert chosen_over and "finishes a request in" in chosen_over[0] and "decodes" in chosen_over[0]
    many = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G", concurrency=32)
    assert many.goal == "throughput" and many.backend == "vllm"
    best = [c for c in many.candidates if c["fits"] and c["available"]]
    assert all(best[0]["estimate"]["total_tok_s"] >= c["estimate"]["total_tok_s"] for c in best)
    assert "output tok/s against" in " ".join(many.reasons)


def test_json_lists_every_candidate_with_its_full_estimate():
    out = subprocess.run([sys.executable, "-m", "qwenhw.cli", "plan", "Qwen3-30B-A3B", "--hardware", "1xH200-141G",
                          "--concurrency", "16", "--prompt-tokens", "2048", "--json"],
                         capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert d["workload"] == {"prompt_tokens": 2048, "output_tokens": 256, "concurrency": 16, "goal": "throughput"}
    engines = {(c["backend"], c["engine"]) for c in d["candidates"]}
    assert {("vllm", "vllm"), ("native", "one-gpu"), ("offload", "deepspeed-zero3")} <= engines
    for c in d["candidates"]:
        assert {"backend", "engine", "parallel", "fits", "estimate"} <= set(c)
        if c["fits"]:
            assert {"ttft_s", "tpot_s", "latency_s", "total_tok_s", "basis"} <= set(c["estimate"])
        else:
            assert c["why"]
    again = Plan.from_dict(d)
    assert again.candidates == tuple(d["candidates"]) and again.prompt_tokens == 2048


def test_all_candidates_are_planned_at_the_same_context_unless_they_say_why():
    plan = qwenhw.plan("Qwen3-8B", hardware="1xL4-24G")
    gpu = [c for c in plan.candidates if c["fits"] and c["engine"] in ("vllm", "one-gpu")]
    assert len(gpu) == 2
    # a 32768-token cache does not fit next to the weights: qwenhw's engine plans fewer tokens instead of moving
    # weights to host RAM, and says what the default would cost
    fast = next(p for p in [plan] + list(plan.alternatives) if p.engine == "one-gpu")
    assert DEFAULT_CONTEXT > fast.context >= 4096 and not fast.offload.cpu_gib
    assert any(r.startswith(f"context {fast.context} (not {DEFAULT_CONTEXT})") for r in fast.reasons)
    one = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G")
    assert {c["context"] for c in one.candidates if c["fits"]} == {DEFAULT_CONTEXT}


def test_when_offload_is_unavoidable_the_shortest_context_offloads_least():
    """Qwen3-32B-AWQ on one 24 GiB card: no context keeps all of it on the GPU; at 4096 tokens vLLM offloads
    1 GiB and decodes ~14 tok/s, where 32768 tokens would have offloaded 8 GiB."""
    plan = qwenhw.plan("Qwen3-32B-AWQ", hardware="1xRTX4090-24G", backend="vllm")
    assert plan.fits and plan.context == 4096
    assert plan.config["engine_args"]["cpu_offload_gb"] <= 1.5
    assert any("the shortest offloads the least" in r for r in plan.reasons)
    asked = qwenhw.plan("Qwen3-32B-AWQ", hardware="1xRTX4090-24G", backend="vllm", context=32768)
    assert asked.config["engine_args"]["cpu_offload_gb"] > 6
    assert asked.estimate.decode_tok_s < plan.estimate.decode_tok_s / 3


def test_vllm_offload_reads_only_what_a_step_touches():
    """cpu_offload_gb through UVA: a step of one sequence moves the offloaded layers' attention and its 8
    experts each, not all 42 GiB (11.3 tok/s measured, docs/benchmarks.md)."""
    plan = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G", backend="vllm", gpu_memory_gib=20, context=4096,
                       dtype="bf16")
    assert plan.fits and plan.config["engine_args"]["cpu_offload_gb"] >= 40
    assert 9 < plan.estimate.decode_tok_s < 14
    warning = next(w for w in plan.warnings if "cpu_offload_gb" in w)
    assert "in place" in warning and "GB per token" in warning


def test_prefill_passes_follow_each_engine():
    vllm = speed.chunked_passes(16, 2048, 16384)
    assert [p.tokens for p in vllm] == [16384, 16384]
    assert speed.chunked_passes(1, 40000, 16384)[-1].tokens == 40000 - 2 * 16384
    own = speed.row_passes(16, 2048, 2048)
    assert len(own) == 1 and own[0].tokens == 32768
    long = speed.row_passes(2, 5000, 2048)
    assert [p.tokens for p in long] == [2048, 2048, 904] * 2
    assert long[1].pairs > long[0].pairs  # the second chunk attends to the first
    native = speed.budget_passes(64, 1024, 2048, 32768)  # the native runtime: 32 whole prompts per pass
    assert [p.tokens for p in native] == [32768, 32768]
    assert speed.budget_passes(16, 2048, 2048, 32768) == own
    # one prompt cut per pass: a long one's chunks alone, its last beside the next one's first
    assert [p.tokens for p in speed.budget_passes(2, 5000, 2048, 32768)] == [2048, 2048, 904 + 2048, 2048, 904]
    # the last prompt that fits is cut where the pass ends; its rest goes first in the next
    cut = speed.budget_passes(16, 1500, 2048, 8192)
    assert [p.tokens for p in cut] == [8192, 8192, 7616]
    # the cut prompt's rest also over its first 692 tokens
    assert cut[1].pairs == 808 * 692 + 808 * 809 / 2 + 4 * 1500 * 1501 / 2 + 1384 * 1385 / 2


def test_native_activation_reserve_stops_growing_with_concurrency():
    """The native runtime caps a prompt pass at PREFILL_TOKENS whatever the concurrency, so the memory its
    plan keeps for activations stops growing there (it grew with every sequence before)."""
    from qwenhw_native.limits import PREFILL_TOKENS

    def overhead(concurrency: int) -> float:
        plan = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G", backend="native", engine="one-gpu",
                           concurrency=concurrency, context=2048)
        return plan.devices[0].overhead_gib

    assert overhead(8) < overhead(16) * 0.6  # up to 16 sequences a pass holds each one's chunk
    assert overhead(16) < overhead(128) < overhead(16) * 1.1  # past them, only the last tokens' logits grow
    assert PREFILL_TOKENS == 16 * 2048  # 16 sequences' chunks: the largest pass measured on the H200


def test_a_servers_time_per_token_holds_the_passes_of_prompts_that_go_in_after():
    """Continuous batching puts prompts in between decode steps: the median request waits through half of the
    other prompts' passes after its first token (a static batch decodes once all are in); the latency of the
    last request is the same either way. An engine that holds fewer sequences than the workload runs it in
    waves."""
    from qwenhw.planning.workload import in_waves

    w = Workload(prompt_tokens=1000, output_tokens=101, concurrency=8, goal="throughput")
    static = estimate(0.02, 0.8, w, "x", tokenize=False)
    served = estimate(0.02, 0.8, w, "x", tokenize=False, continuous=True)
    assert static.tpot_s == pytest.approx(0.02) and served.latency_s == static.latency_s == pytest.approx(2.8)
    assert served.tpot_s == pytest.approx(0.02 + 0.8 * 7 / 8 / 2 / 100)
    assert estimate(0.02, 0.8, replace(w, concurrency=1), "x", tokenize=False, continuous=True).tpot_s == 0.02

    def at(n):
        return estimate(0.02, 0.1 * n, replace(w, concurrency=n), "x", tokenize=False, continuous=True)

    assert in_waves(at, 8, w) == at(8)  # all held at once
    waves = in_waves(at, 3, w)  # 3 + 3 + 2
    assert waves.ttft_s == at(3).ttft_s
    assert waves.total_tok_s == pytest.approx(101 * 8 / (2 * at(3).latency_s + at(2).latency_s))
