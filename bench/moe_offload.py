"""Issue #7 benchmark: Qwen3-30B-A3B shape, random bf16 weights, batch-1 decode on one GPU.

Side by side, in one process: HF transformers all on the GPU (eager experts, as the baseline, and the
default grouped experts), qwenhw's fast path, accelerate's offload with the GPU capped at 20 GiB, and
qwenhw's MoE hybrid without and with the GPU expert cache under the same cap. For each: decode tok/s
(median of repeats), prefill time for 2048 tokens, peak GPU memory and peak host RSS next to the
planner's prediction, and the last-token logits against the plain model's (relative L2 error).

    python bench/moe_offload.py --out results/          (on the GPU machine; ~6 minutes)
    python bench/moe_offload.py --layers 4 --quick      (smoke test of the script itself)

Random weights route tokens almost uniformly over experts, so a frequency-based expert cache hits at
about the share of experts it holds; real checkpoints are skewed and hit more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native")]

import psutil  # noqa: E402
import torch  # noqa: E402

import qwenhw  # noqa: E402
import qwenhw.plugins  # noqa: E402
from qwenhw.models import get as catalog  # noqa: E402

GiB = 2**30


class Peak:
    """Peak host RSS (polled) and peak GPU memory (torch's reserved + the non-torch part) of a section."""

    def __init__(self, nontorch: float):
        self.nontorch = nontorch

    def __enter__(self):
        self.proc = psutil.Process()
        self.rss = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def _poll(self):
        while not self.done.is_set():
            self.rss = max(self.rss, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.gpu = (torch.cuda.max_memory_reserved() + self.nontorch) / GiB if torch.cuda.is_available() else 0.0
        self.host = self.rss / GiB


def _empty() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, sync=True):
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def decode_rate(rt, prompt: list[int], tokens: int, repeats: int) -> float:
    """Median tok/s of greedy decoding (each token fed back, as generation does), after one untimed run
    that also captures the CUDA graphs."""
    runs = []
    for r in range(repeats + 1):
        rt.reset()
        tok = int(rt.prefill(prompt).argmax())

        def loop():
            nonlocal tok
            for _ in range(tokens):
                tok = int(rt.decode(tok).argmax())

        t, _ = timed(loop)
        if r:
            runs.append(tokens / t)
    return statistics.median(runs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def build(layers: int, device: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                         num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                         tie_word_embeddings=False, rope_theta=1e6)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):  # normal_ on the GPU: seconds instead of minutes on the CPU
        model = Qwen3MoeForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def predicted(plan) -> dict:
    gpu = next((d for d in plan.devices if d.kind.endswith("gpu")), None)
    cpu = next((d for d in plan.devices if d.kind == "cpu"), None)
    return {"engine": plan.engine, "tok_s": plan.estimate.decode_tok_s, "gpu_gib": gpu.total_gib if gpu else 0.0,
            "host_gib": cpu.total_gib if cpu else 0.0, "cache_gib": plan.offload.gpu_expert_cache_gib}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--gpu-cap", type=float, default=20.0)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--accelerate-tokens", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="skip the slow accelerate baseline")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script on a machine without a GPU")
    args = ap.parse_args()

    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module
    import transformers

    from qwenhw_native.hybrid import HybridMoE
    from qwenhw_native.runtime import Runtime, SampleParams, set_experts

    dev = args.device
    torch.set_num_threads(psutil.cpu_count(logical=False) or os.cpu_count())
    nontorch = 0
    if dev == "cuda":
        torch.zeros(1, device=dev)
        free, total = torch.cuda.mem_get_info()
        nontorch = (total - free) - torch.cuda.memory_reserved()  # CUDA context etc., outside torch's allocator
    import qwenhw_native
    import qwenhw_offload

    for name, module in (("offload", qwenhw_offload), ("native", qwenhw_native)):
        if name not in qwenhw.plugins.load().backends:  # run from a checkout: register it in-process
            qwenhw.plugins.register_plugin(module, f"qwenhw-{name}")
    hw = qwenhw.detect()
    spec = catalog("Qwen3-30B-A3B").with_(num_layers=args.layers)
    info = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name() if dev == "cuda" else "none", "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
            "host": hw.summary(), "layers": args.layers, "nontorch_gib": nontorch / GiB}
    print(json.dumps(info), flush=True)

    g = torch.Generator().manual_seed(1)
    short = torch.randint(0, 151936, (1, 32), generator=g)
    long = torch.randint(0, 151936, (1, args.prefill), generator=g)
    rows: list[dict] = []

    def record(name, tok_s, prefill_s, peak, pred, err, extra=""):
        row = {"config": name, "tok_s": tok_s, "prefill_s": prefill_s, "gpu_gib": peak.gpu, "host_gib": peak.host,
               "logit_rel_err": err, **{f"pred_{k}": v for k, v in pred.items()}, "note": extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.perf_counter()
    model = build(args.layers, dev)
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    with torch.inference_mode():
        ref = model(short.to(dev)).logits[0, -1].float().cpu()
        # 31 tokens stay under the hybrid's prefill threshold (32): they run through the CPU experts kernel
        ref31 = model(short[:, :31].to(dev)).logits[0, -1].float().cpu()
        greedy_hf = model.generate(short.to(dev), max_new_tokens=16, do_sample=False)[0, 32:].tolist()

    # --- HF transformers, everything on the GPU ---------------------------------------------------------
    plan_fast = qwenhw.plan(spec, hw, context=args.context, backend="offload", engine="transformers")
    for impl in ("eager", "grouped_mm"):
        set_experts(model, impl)
        with Peak(nontorch) as peak, torch.inference_mode():
            ids = short.to(dev)
            runs = []
            for _ in range(args.repeats):
                t1, _ = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False))
                tn, _ = timed(lambda: model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                                     do_sample=False))
                runs.append((args.tokens - 1) / (tn - t1))
            pre, _ = timed(lambda: model(long.to(dev)))
        pred = predicted(gpu_only_plan(spec, hw, args.context, None))
        record(f"HF {impl}, all on GPU", statistics.median(runs), pre, peak, pred, 0.0)
    set_experts(model, "grouped_mm")

    # --- qwenhw fast path ---------------------------------------------------------------------------------
    for kernel in ("batched_mm", "grouped_mm"):
     try:
        with Peak(nontorch) as peak, torch.inference_mode():
            rt = Runtime(model, max_len=args.context, device=dev, graphs=True, decode_experts=kernel)
            logits = rt.prefill(short[0].tolist())
            err = rel_err(logits[0], ref)
            ids = short[0].tolist()
            rate = decode_rate(rt, ids, args.tokens, args.repeats)
            rt.reset()
            pre, _ = timed(lambda: rt.prefill(long[0].tolist()))
            rt.reset()
            greedy_rt = list(rt.generate(ids, 16, SampleParams(), set()))
            same = sum(a == b for a, b in zip(greedy_hf, greedy_rt))
        record(f"qwenhw fast path (CUDA graphs, {kernel})", rate, pre, peak,
               predicted(plan_fast), err, f"greedy tokens equal to HF: {same}/16")
        rt = None
        _empty()
     except Exception:  # report and go on: one failing configuration must not cost the others
        traceback.print_exc()
        print(f'FAILED: fast path {kernel}', flush=True)
        rt = None

    rt = None
    _empty()

    # --- qwenhw MoE hybrid, GPU capped ---------------------------------------------------------------------
    plan_h = qwenhw.plan(spec, hw, context=args.context, backend="native", engine="hybrid",
                         gpu_memory_gib=args.gpu_cap)
    t0 = time.perf_counter()
    hybrid = HybridMoE(model, dev, cache_bytes=0, prefill_threshold=32)  # experts: GPU -> registered host RAM
    model.to(dev)
    _empty()
    print(f"experts pinned, rest on GPU in {time.perf_counter() - t0:.1f} s", flush=True)
    rt = Runtime(model, max_len=args.context, device=dev, graphs=True, moe_hook=hybrid)
    calib = torch.randint(0, 151936, (512,), generator=g).tolist()
    cache = plan_h.config.get("expert_cache_bytes", 0)  # a model that fits the cap: no hybrid plan, no cache
    info["cpu_threads_tried_ms"] = hybrid.fit_threads()  # as build_hybrid does
    info["cpu_kernel"] = cpu_kernel_speed(hybrid)
    print(json.dumps({"cpu_kernel": info["cpu_kernel"]}), flush=True)
    for label, cache_bytes, policy, kernel in (("no cache, torch GEMVs", 0, "static", "torch"),
                                               ("no cache", 0, "static", "fused"),
                                               ("static expert cache", cache, "static", "fused"),
                                               ("dynamic expert cache", cache, "dynamic", "fused")):
        try:
            hybrid.resize_cache(cache_bytes)
            hybrid.policy = policy
            hybrid.set_kernel(kernel)
            _empty()
            if cache_bytes:
                hybrid.counts.zero_()
                rt.reset()
                rt.prefill(calib)  # calibration routing (a streamed prefill)
                hybrid.place_cache()
            pred = hybrid_prediction(spec, hw, plan_h, cache_bytes)
            with Peak(nontorch) as peak, torch.inference_mode():
                mem = [gpu_mem("start")]
                rt.reset()
                err = rel_err(rt.prefill(short[0, :31].tolist())[0], ref31)
                rt.reset()
                greedy = list(rt.generate(short[0].tolist(), 16, SampleParams(), set()))
                same = sum(a == b for a, b in zip(greedy_hf, greedy))
                hybrid.stats.update(cpu_experts=0, gpu_experts=0)
                rate = decode_rate(rt, short[0].tolist(), args.tokens, args.repeats)
                mem.append(gpu_mem("after decode"))
                rt.reset()
                pre, _ = timed(lambda: rt.prefill(long[0].tolist()))
                mem.append(gpu_mem("after prefill"))
            hits = hybrid.stats["gpu_experts"] / max(1, hybrid.stats["gpu_experts"] + hybrid.stats["cpu_experts"])
            record(f"qwenhw hybrid, {label}, GPU cap {args.gpu_cap:.0f} GiB", rate, pre, peak, pred,
                   err, f"greedy tokens equal to HF: {same}/16; CPU experts: {hybrid.cpu_kernel}; cache {hybrid.slots} experts "
                        f"({cache_bytes / GiB:.1f} GiB), hit rate {hits:.0%}; GPU GiB (allocated/reserved/peak "
                        f"allocated) {'; '.join(mem)}")
        except Exception:
            traceback.print_exc()
            print(f'FAILED: hybrid {label}', flush=True)

    # --- accelerate offload, GPU capped -------------------------------------------------------------------
    # a fresh copy of the model, all in host RAM, for accelerate to dispatch
    rt = None
    hybrid.close()
    del hybrid, model
    import gc

    gc.collect()
    _empty()
    model = build(args.layers, dev).to("cpu")
    _empty()
    plan_acc = gpu_only_plan(spec, hw, args.context, args.gpu_cap)
    try:
        if not args.quick:
            set_experts(model, "eager")
            dmap = infer_auto_device_map(model, max_memory={0: f"{args.gpu_cap}GiB", "cpu": "200GiB"},
                                         no_split_module_classes=["Qwen3MoeDecoderLayer"])
            dispatch_model(model, dmap, main_device=dev if dev == "cpu" else None)
            with Peak(nontorch) as peak, torch.inference_mode():
                ids = short.to(dev)
                t1, _ = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False))
                tn, _ = timed(lambda: model.generate(ids, max_new_tokens=args.accelerate_tokens,
                                                     min_new_tokens=args.accelerate_tokens, do_sample=False))
                err = rel_err(model(ids).logits[0, -1], ref)
            on_gpu = sum(1 for v in dmap.values() if v == 0)
            record(f"accelerate offload, GPU cap {args.gpu_cap:.0f} GiB", (args.accelerate_tokens - 1) / (tn - t1), None,
                   peak, predicted(plan_acc), err, f"{on_gpu}/{len(dmap)} modules on the GPU; prefill not timed")
            remove_hook_from_module(model, recurse=True)
            model.to("cpu")
            set_experts(model, "grouped_mm")
            _empty()
    except Exception:  # report and go on: one failing configuration must not cost the others
        traceback.print_exc()
        print('FAILED: accelerate', flush=True)
    remove_hook_from_module(model, recurse=True)  # idempotent: leave the model whole on the CPU either way
    model.to("cpu")
    set_experts(model, "grouped_mm")
    _empty()

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "moe_offload.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print_table(rows)


def gpu_mem(label: str) -> str:
    if not torch.cuda.is_available():
        return f"{label} -"
    return (f"{label} {torch.cuda.memory_allocated() / GiB:.2f}/{torch.cuda.memory_reserved() / GiB:.2f}/"
            f"{torch.cuda.max_memory_allocated() / GiB:.2f}")


def cpu_kernel_speed(hybrid, repeats: int = 48) -> dict:
    """One layer's 8 random experts for one token, median over layers: the fused kernel against torch GEMVs.

    Each repeat uses another layer, so the weights come from RAM, not from the CPU's caches."""
    from qwenhw_native import cpu_moe

    layers = list(hybrid.cpu)
    gu, dn = hybrid.cpu[layers[0]]
    E, two_i, H = gu.shape
    K = 8
    moved = K * 3 * H * (two_i // 2) * gu.element_size()
    x = torch.randn(1, H).to(gu.dtype)
    w = torch.full((1, K), 1 / K).to(gu.dtype)
    out = torch.empty(1, H, dtype=gu.dtype)

    def median_s(fn):
        times = []
        for r in range(repeats):
            i, idx = layers[r % len(layers)], torch.randperm(E)[:K][None]
            t = time.perf_counter()
            fn(i, idx)
            times.append(time.perf_counter() - t)
        return statistics.median(times[2:])

    result = {"bytes_per_layer": moved, "threads": torch.get_num_threads()}
    runs = {"torch": lambda i, idx: hybrid._torch_experts(i, x, idx, w, out, use_cache=False)}
    if cpu_moe.load()[0] is not None:
        half = max(1, torch.get_num_threads() // 2)
        runs["fused"] = lambda i, idx: cpu_moe.moe_experts(*hybrid.cpu[i], x, idx, w, out)
        runs[f"fused_{half}_threads"] = lambda i, idx: cpu_moe.moe_experts(*hybrid.cpu[i], x, idx, w, out,
                                                                         threads=half)
    for name, fn in runs.items():
        s = median_s(fn)
        result[name] = {"ms": s * 1e3, "GB_s": moved / s / 1e9}
    return result


def gpu_only_plan(spec, hw, context, cap):
    """The offload planner's GPU (+ host RAM) plan for plain transformers generate(), as the baselines run."""
    from qwenhw_offload import planner

    req = qwenhw.api.make_request(context=context, gpu_memory_gib=cap)
    if not hw.node.accelerators:  # the CPU smoke test
        return planner.cpu_plan(spec, hw, req, None, context, "bf16")
    return planner.gpu_plan(spec, hw, req, "auto", context, "bf16")


def hybrid_prediction(spec, hw, plan, cache_bytes: float) -> dict:
    """The planner's numbers for the hybrid plan with a given expert-cache size (0 = no cache)."""
    from qwenhw.planning.workload import Workload
    from qwenhw_native import planner

    wb = qwenhw.models.memory.weight_bytes_split(spec)
    dev = next((d for d in plan.devices if d.kind.endswith("gpu")), None)
    cpu = next(d for d in plan.devices if d.kind == "cpu")
    if dev is None:  # the CPU smoke test: nothing to predict for a GPU
        return {"engine": plan.engine, "tok_s": 0.0, "gpu_gib": 0.0, "host_gib": cpu.total_gib, "cache_gib": 0.0}
    non_expert = (dev.weights_gib - plan.offload.gpu_expert_cache_gib) * GiB
    gpu = hw.node.gpus("nvidia")[0]
    work = Workload(plan.prompt_tokens or 32, plan.output_tokens or 32, 1, "latency")
    tok_s = planner._hybrid_estimate(spec, hw.node, gpu, work, "bf16", cache_bytes, wb.experts).decode_tok_s
    gpu_gib = dev.total_gib + cache_bytes / GiB - plan.offload.gpu_expert_cache_gib
    return {"engine": plan.engine, "tok_s": tok_s, "gpu_gib": gpu_gib, "host_gib": cpu.total_gib,
            "cache_gib": cache_bytes / GiB}


def print_table(rows: list[dict]) -> None:
    head = f"{'configuration':<48} {'tok/s':>7} {'pred':>7} {'prefill s':>9} {'GPU GiB':>8} {'pred':>6} " \
           f"{'host GiB':>8} {'pred':>6} {'logit err':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        pre = f"{r['prefill_s']:.2f}" if r["prefill_s"] is not None else "-"
        print(f"{r['config']:<48} {r['tok_s']:7.2f} {r['pred_tok_s']:7.1f} {pre:>9} {r['gpu_gib']:8.2f} "
              f"{r['pred_gpu_gib']:6.2f} {r['host_gib']:8.1f} {r['pred_host_gib']:6.1f} {r['logit_rel_err']:9.2e}")
        if r["note"]:
            print(f"    {r['note']}")


if __name__ == "__main__":
    main()
