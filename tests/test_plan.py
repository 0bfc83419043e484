"""Planning contracts: JSON schema, every bundled profile x several models, the headline cases."""

from __future__ import annotations

import json

import pytest

import qwenhw
from qwenhw.hardware import bundled_names
from qwenhw.hardware.profile import HardwareProfile
from qwenhw.planning.plan import Plan

MODELS = ["Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B", "Qwen3-30B-A3B-FP8", "Qwen3-235B-A22B",
          "Qwen3-Next-80B-A3B-Instruct", "Qwen2.5-72B-Instruct"]
DEVICE_KEYS = {"id", "kind", "capacity_gib", "weights_gib", "kv_cache_gib", "overhead_gib", "total_gib"}


def check_schema(d: dict) -> None:
    assert {"model", "backend", "fits", "parallel", "devices", "offload", "max_context", "reasons", "rejected",
            "artifacts"} <= set(d)
    assert set(d["parallel"]) == {"tp", "pp", "dp", "ep"}
    assert all(isinstance(v, int) and v >= 1 for v in d["parallel"].values())
    for dev in d["devices"]:
        assert DEVICE_KEYS <= set(dev)
        parts = dev["weights_gib"] + dev["kv_cache_gib"] + dev["overhead_gib"]
        assert abs(parts - dev["total_gib"]) < 0.01
    assert {"cpu_gib", "disk_gib", "experts_on_cpu"} <= set(d["offload"])
    assert all({"backend", "why"} == set(r) for r in d["rejected"])
    assert isinstance(d["reasons"], list) and d["reasons"]
    assert all(isinstance(v, str) for v in d["artifacts"].values())


@pytest.mark.parametrize("profile", bundled_names())
@pytest.mark.parametrize("model", MODELS)
def test_every_profile_and_model_plans_and_serialises(profile, model):
    plan = qwenhw.plan(model, hardware=profile)
    d = json.loads(plan.to_json())
    check_schema(d)
    again = Plan.from_dict(d)
    assert again.to_dict() == plan.to_dict()
    if plan.fits:
        for dev in plan.devices:
            assert dev.total_gib <= dev.capacity_gib + 1e-6, (profile, model, dev)
        assert plan.estimate.decode_tok_s > 0


def test_moe_on_one_small_gpu_keeps_experts_in_host_ram():
    plan = qwenhw.plan("Qwen3-30B-A3B", hardware="1xRTX4090-24G")
    assert plan.fits
    assert plan.offload.experts_on_cpu and plan.offload.cpu_gib > 40
    gpu = next(d for d in plan.devices if d.kind == "nvidia-gpu")
    assert gpu.total_gib <= gpu.capacity_gib <= 24


def test_moe_on_small_gpu_with_small_ram_does_not_fit_and_says_why(tmp_path):
    hw = qwenhw.api.hardware_profile("1xRTX4090-24G")
    node = hw.node
    small = hw.to_dict()
    small["nodes"][0]["cpu"]["ram_bytes"] = 32 * 2**30
    small["nodes"][0]["cpu"]["ram_available_bytes"] = 30 * 2**30
    small["nodes"][0]["disk"]["free_bytes"] = 5 * 2**30
    path = tmp_path / "small.json"
    path.write_text(json.dumps(small))
    plan = qwenhw.plan("Qwen3-30B-A3B", hardware=str(path), dtype="bf16")
    assert node.cpu.ram_bytes > 32 * 2**30
    assert not plan.fits
    text = " ".join(plan.reasons)
    assert "GiB" in text and ("fp8" in text or "int4" in text)


def test_planning_is_pure_and_fast():
    import subprocess
    import sys
    import time

    code = ("import sys, time; t=time.perf_counter(); import qwenhw; "
            "[qwenhw.plan(m, hardware=h) for m in ('Qwen3-30B-A3B','Qwen3-235B-A22B') for h in ('4xH100-80G','cpu-only')]; "
            "assert 'torch' not in sys.modules, 'planning imported torch'; print(time.perf_counter()-t)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 2.0
    assert time.perf_counter() - start < 5.0


def test_local_checkpoint_plan_uses_exact_bytes(tiny_moe):
    from qwenhw.models.checkpoint import tensor_bytes

    plan = qwenhw.plan(str(tiny_moe))
    exact = sum(n for _, _, n in tensor_bytes(str(tiny_moe)).values())
    assert plan.spec["weight_bytes"] == exact
    cpu = next(d for d in plan.devices if d.id == "cpu")
    assert abs(cpu.weights_gib * 2**30 - exact) < 1024


def test_235b_bf16_on_4xh20_needs_offload_and_says_what_would_fit():
    plan = qwenhw.plan("Qwen3-235B-A22B", hardware="4xH20-96G", dtype="bf16")
    assert plan.fits and (plan.offload.cpu_gib > 0)  # runs only with host RAM in the picture
    advice = plan.reasons[-1]
    assert advice.startswith("without offload it does not fit")
    assert "fp8" in advice and "GPUs of 96 GiB" in advice
    no_offload = [r for r in plan.rejected if r.backend.startswith("vllm") and "exceed" in r.why]
    assert no_offload, "the GPU-only vLLM layouts are listed with their shortfall"


def test_native_multi_gpu_layouts_follow_batch_and_memory():
    """Data-parallel replicas need the whole model on each GPU and cannot split one sequence. At batch 1 a
    split pays two all-reduces per layer for a share of the weight traffic; fused with the next RMSNorm they
    cost no more than the norm (measured on H200s: TP=2 1.21x, TP=4 1.30x one GPU), so TP wins, never a
    replica layout. Unfused (more remote rows than the kernel takes) they are priced at 8.4 us. At batch 16
    a multi-GPU layout is chosen, every layout that fits is priced, and on 4 H200s the choice is the one
    measured fastest there (TP=4 with every expert on every GPU: 3153 tok/s, DP=2 x TP=2 2964, TP=4 with
    whole experts per GPU 3045, DP=4 2653; docs/benchmarks.md)."""
    from qwenhw.api import make_request
    from qwenhw.hardware import load_bundled
    from qwenhw.models import get
    from qwenhw_native import planner, speed

    spec, hw = get("Qwen3-30B-A3B"), load_bundled("4xH100-80G")
    alone = planner.one_gpu_plan(spec, hw, make_request(context=1024, concurrency=1), "auto", 1024, "bf16")
    one = qwenhw.plan("Qwen3-30B-A3B", hardware="4xH100-80G", backend="native", concurrency=1, context=1024)
    assert one.engine in ("one-gpu", "tensor-parallel") and one.parallel.dp == 1
    assert one.estimate.decode_tok_s >= alone.estimate.decode_tok_s
    pair = qwenhw.plan("Qwen3-30B-A3B", hardware="2xH100-80G", backend="native", concurrency=1, context=1024)
    assert pair.engine == "tensor-parallel" and pair.parallel.world == 2
    assert 1.05 < pair.estimate.decode_tok_s / alone.estimate.decode_tok_s < 1.3

    def step(c: int, reduce=speed.TP_REDUCE) -> float:  # seconds per decode step of TP=4 at c sequences
        p = planner.parallel_plan(spec, hw, make_request(context=1024, concurrency=c), "auto", 1024, "bf16", 4, 4,
                                  reduce=reduce)
        return c / p.estimate.throughput_tok_s

    fused, apart = step(16), step(32)  # 16 x 3 rows sent to peers: the fused kernel; 32 x 3: not
    fit = speed.TP_REDUCE
    saved = 2 * spec.num_layers * (fit.apart_s - fit.fused_s - 16 * 3 * fit.push_row_s)
    unfused = fit.replace(fused_s=fit.apart_s, push_row_s=0.0)  # the fused kernel priced as the two apart
    assert step(16, unfused) - fused == pytest.approx(saved) and step(32, unfused) == pytest.approx(apart)
    many = qwenhw.plan("Qwen3-30B-A3B", hardware="4xH100-80G", backend="native", concurrency=16, context=1024)
    assert many.engine in ("replicas", "tensor-parallel") and many.parallel.world == 4
    assert many.estimate.throughput_tok_s > 1.3 * planner.one_gpu_plan(
        spec, hw, make_request(context=1024, concurrency=16), "auto", 1024, "bf16").estimate.throughput_tok_s
    layouts = {(p.parallel.tp, p.parallel.dp): p for p in planner.plans(spec, hw, make_request(context=1024, concurrency=16))
               if p.engine in ("replicas", "tensor-parallel") and p.parallel.world == 4}
    assert set(layouts) == {(1, 4), (2, 2), (4, 1)}
    # every expert fits every 80 GB GPU here: TP replicas keep them all and split attention only
    assert layouts[(1, 4)].devices[0].weights_gib > layouts[(4, 1)].devices[0].weights_gib > 50
    assert layouts[(2, 2)].config["tp"] == 2 and layouts[(2, 2)].config["experts"] == "replicated"
    assert layouts[(2, 2)].parallel.ep == 2 and "all 128 experts on every GPU" in " ".join(layouts[(2, 2)].reasons)
    four = json.loads(load_bundled("8xH200-141G").to_json())  # the 4x H200 host of the benchmark
    node = four["nodes"][0]
    node["accelerators"] = node["accelerators"][:4]
    node["links"] = [link for link in node["links"] if link["a"] < 4 and link["b"] < 4]
    # ranked for a workload where decode dominates, as in the benchmark (32-token prompts)
    h200 = qwenhw.plan("Qwen3-30B-A3B", hardware=HardwareProfile.from_dict(four), backend="native", concurrency=16,
                       context=1024, prompt_tokens=32, output_tokens=256)
    assert (h200.parallel.tp, h200.parallel.dp) == (4, 1) and h200.config["experts"] == "replicated"
    # 235B in bf16 (~438 GiB) fits no single GPU: no replica layout fits, TP+EP over 4 H200s does
    big = get("Qwen3-235B-A22B")
    plans = planner.plans(big, load_bundled("8xH200-141G"), make_request(context=4096, concurrency=8))
    fitting = {(p.parallel.tp, p.parallel.dp) for p in plans if p.engine in ("tensor-parallel", "replicas") and p.fits}
    assert (1, 8) not in fitting and (1, 2) not in fitting and (4, 1) in fitting


def test_tensor_parallel_plans_replicate_experts_where_they_fit():
    """Where every expert fits on every GPU of a TP replica (with the plan's KV cache and activations), the
    experts are replicated and each decode step deals the touched ones out: no GPU waits for the one whose
    experts the batch touched most. Where they do not fit, whole experts per GPU (or split ones)."""
    from qwenhw.api import make_request
    from qwenhw.hardware import load_bundled
    from qwenhw.models import get
    from qwenhw.planning.layout import busiest_rank_experts, dealt_rank_experts
    from qwenhw_native import planner

    spec, hw = get("Qwen3-30B-A3B"), load_bundled("2xH100-80G")
    req = make_request(context=1024, concurrency=16)
    both = planner.parallel_plan(spec, hw, req, "auto", 1024, "bf16", 2, 2)
    whole = planner.parallel_plan(spec, hw, req, "auto", 1024, "bf16", 2, 2, "ep")
    assert both.fits and both.config["experts"] == "replicated" and both.parallel.ep == 2
    assert "all 128 experts on every GPU" in " ".join(both.reasons)
    assert both.devices[0].weights_gib > 1.8 * whole.devices[0].weights_gib  # the experts are most of the model
    assert both.estimate.throughput_tok_s > whole.estimate.throughput_tok_s  # 41.5 experts per GPU, not 43.4
    assert dealt_rank_experts(spec, 16, 2) < busiest_rank_experts(spec, 16, 2) - 1.5
    # a long context's KV cache leaves no room for a second copy of the experts: whole experts per GPU
    long = planner.parallel_plan(spec, hw, make_request(context=32768, concurrency=16), "auto", 32768, "bf16", 2, 2)
    assert long.fits and long.config["experts"] == "ep" and long.devices[0].weights_gib < 35
    # 235B (~438 GiB) is never replicated: its experts fit no GPU
    big = planner.parallel_plan(get("Qwen3-235B-A22B"), load_bundled("8xH200-141G"),
                                make_request(context=4096, concurrency=8), "auto", 4096, "bf16", 4, 4)
    assert big.fits and big.config["experts"] == "ep"


def test_tensor_parallel_plans_split_experts_only_where_whole_ones_do_not_divide():
    """Where the experts cannot be replicated, TP replicas keep whole experts per GPU (they measure as fast as
    split ones); where the expert count does not divide by the GPUs but the intermediate size does, every
    expert is split across them instead."""
    import dataclasses

    from qwenhw.api import make_request
    from qwenhw.hardware import load_bundled
    from qwenhw.models import get
    from qwenhw_native import planner

    spec, hw = get("Qwen3-30B-A3B"), load_bundled("4xH100-80G")
    req = make_request(context=1024, concurrency=16, gpu_memory_gib=40)  # no room for every expert per GPU
    whole = planner.parallel_plan(spec, hw, req, "auto", 1024, "bf16", 4, 4)
    assert whole.config["experts"] == "ep" and whole.parallel.ep == 4
    assert "32 whole experts per GPU" in " ".join(whole.reasons)
    odd = spec.with_(moe=dataclasses.replace(spec.moe, num_experts=126))  # 126 = 2 x 63: not by 4
    assert planner.expert_split(odd, 2) == "ep" and planner.expert_split(odd, 4) == "tp"
    split = planner.parallel_plan(odd, hw, req, "auto", 1024, "bf16", 4, 4)
    assert split.fits and split.config["experts"] == "tp" and split.parallel.ep == 1
    assert "(192 of 768 per GPU" in " ".join(split.reasons)
    neither = odd.with_(moe=dataclasses.replace(odd.moe, moe_intermediate_size=770))
    assert not planner.parallel_plan(neither, hw, req, "auto", 1024, "bf16", 4, 4).fits
    assert planner.parallel_plan(spec, hw, make_request(context=1024, concurrency=4), "auto", 1024, "bf16", 4,
                                 1).config.get("experts") is None  # replicas of one GPU split nothing


def test_one_gpu_takes_smaller_prompt_passes_before_it_gives_up_rows():
    """64 sequences of 2048 tokens (1792 + 256) of Qwen3-30B-A3B fit one H100 beside the weights only with the
    activations of prompt passes smaller than 32768 tokens: the one-GPU engine then plans those passes (more
    of them for a burst of prompts, priced so) rather than hold fewer sequences at once or fall back to the
    hybrid, which decodes at a third of the speed; 16 sequences keep the largest passes."""
    from qwenhw_native.limits import PREFILL_TOKENS, STEP_PREFILL_TOKENS, pass_budgets

    assert pass_budgets() == [PREFILL_TOKENS, PREFILL_TOKENS // 2, STEP_PREFILL_TOKENS]
    ask = dict(hardware="1xH100-80G", backend="native", context=2048, prompt_tokens=1792, output_tokens=256)
    many = qwenhw.plan("Qwen3-30B-A3B", concurrency=64, **ask)
    budget = many.config["prefill_tokens"]
    assert many.engine == "one-gpu" and many.fits and budget < PREFILL_TOKENS
    assert f"prompt passes of at most {budget} tokens" in many.reasons[0]
    assert many.config["kv_tokens"] >= 64 * 2048  # every row at the whole context: what a static cache held
    gpu = many.devices[0]
    assert gpu.total_gib <= gpu.capacity_gib
    few = qwenhw.plan("Qwen3-30B-A3B", concurrency=16, **ask)
    assert few.engine == "one-gpu" and "prefill_tokens" not in few.config
    hybrid = qwenhw.plan("Qwen3-30B-A3B", concurrency=64, engine="hybrid", **ask)
    assert many.estimate.throughput_tok_s > 1.5 * hybrid.estimate.throughput_tok_s


def test_one_gpu_pages_the_kv_cache_of_several_sequences():
    """Several sequences: a KV pool in pages that holds the workload's sequences (prompt + answer each) and one
    of the whole context, not a whole context per row: 64 rows of 1024 + 256 tokens keep the largest prompt
    passes on an H100 that a static cache (64 x 2048) would have shrunk to 8192-token passes, and 128 rows at the
    default 32k context fit an H200, whose static cache (128 x 32768 tokens, 384 GiB) could not. The paged
    runtime takes single prompts too (no batch-1 runtime beside it). One sequence: a static cache."""
    from qwenhw_native.limits import PAGE, PREFILL_TOKENS

    ask = dict(backend="native", prompt_tokens=1024, output_tokens=256)
    h100 = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH100-80G", concurrency=64, context=2048, **ask)
    assert h100.engine == "one-gpu" and h100.fits and "prefill_tokens" not in h100.config  # PREFILL_TOKENS
    pool = h100.config["kv_tokens"]
    assert 64 * 1280 <= pool < 64 * 2048 and pool % PAGE == 0  # what the GPU has left, in pages
    assert f"KV cache in pages ({pool} tokens" in h100.reasons[0]
    per_token = 48 * 2 * 4 * 128 * 2  # layers x (k, v) x kv heads x head_dim x bf16
    assert abs(h100.devices[0].kv_cache_gib - pool * per_token / 2**30) < 0.01  # the one runtime, single prompts too
    # 128 rows of them do not fit there at once: the plan takes the smallest prompt passes for a larger pool,
    # and the sequences it cannot hold wait for pages (vLLM's admission) rather than run on the hybrid
    many = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH100-80G", concurrency=128, context=2048, **ask)
    assert many.engine == "one-gpu" and many.fits and many.config["prefill_tokens"] == 8192
    held = many.config["kv_tokens"] // 1280
    assert 100 < held < 128 and f"{held} of the 128 sequences" in many.reasons[0]
    assert many.estimate.total_tok_s > h100.estimate.total_tok_s
    h200 = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G", concurrency=128, **ask)
    assert h200.engine == "one-gpu" and h200.fits and h200.context == 32768
    assert 128 * 1280 <= h200.config["kv_tokens"] < 128 * 32768
    assert h200.max_context >= 32768
    one = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G", concurrency=1, **ask)
    assert "kv_tokens" not in one.config and "static KV cache" in one.reasons[0]
    assert PREFILL_TOKENS == 32768


def test_sequences_run_at_once_as_their_pages_grow_not_whole():
    """The native runtime hands a sequence pages as its answer grows (vLLM's way): a pool that holds 29 requests of
    1024 + 4096 tokens whole runs ~48 at once on average (prompt + half the answer each); the estimate counts
    those, the reason says both."""
    plan = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH100-80G", backend="native", engine="one-gpu", concurrency=128,
                       prompt_tokens=1024, output_tokens=4096, context=8192)
    pool = plan.config["kv_tokens"]
    whole, running = pool // 5120, pool // 3072
    assert whole < running < 128
    said = f"{whole} of the 128 sequences of the workload's 5120 tokens at once (~{running} as pages go"
    assert said in plan.reasons[0]
    assert round(plan.estimate.throughput_tok_s / plan.estimate.decode_tok_s) == running
