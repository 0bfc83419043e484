"""vLLM and qwenhw's own engine side by side on one GPU: Qwen3-30B-A3B's shape, random bf16 weights.

The planner chooses between these two engines, so this is the measurement its speed and memory models are
fitted to (docs/benchmarks.md, "The planner against the engines it chooses between"). Every part measures
both engines the same way:
  decode      greedy, every row its own random 32-token prompt; tokens/s over all sequences as the extra
              tokens over the extra time between a LONG- and a SHORT-token generation (prefill and fixed
              per-call costs cancel), at 1, 4, 16, 32 and 64 sequences
  ttft        time to first token (a generation of one token) for 512-, 2048- and 8192-token prompts, alone
              and 16 at once; fresh prompts every time (vLLM's prefix cache must not answer from memory)
  memory      per-device memory against the planner (vLLM's from its own log lines)
  start       engine start: vLLM's load + torch.compile + graph capture against qwenhw's runtimes + capture
and both through `Engine.generate` (text in, what a user calls) as well as the engine's own call (token ids:
vLLM's `LLM.generate`, qwenhw's runtime loop).

    python bench/side_by_side.py prepare .bench/qwen3-30b-a3b          # here: config + tokenizer, no weights
    python bench/side_by_side.py qwenhw .bench/qwen3-30b-a3b           # GPU machine: qwenhw's engine
    python bench/side_by_side.py hybrid .bench/qwen3-30b-a3b           # GPU capped at 20 GiB, experts in RAM
    python bench/side_by_side.py vllm .bench/qwen3-30b-a3b 2>&1 | tee $OUT/vllm.log     # vLLM (its log: memory)
    python bench/side_by_side.py vllm .bench/qwen3-30b-a3b --gpu-memory-gib 20 2>&1 | tee $OUT/vllm_offload.log
    python bench/side_by_side.py report $OUT                          # anywhere: measured against the planner

Each part writes <part>.json into --out ($OUT by default). vLLM runs through `qwenhw.load` of the vllm
backend's own plan (its engine arguments, `load_format="dummy"`), timed at its `LLM` object directly and
at qwenhw's Engine around it. `--layers`/`--device cpu` shrink a part for a smoke test on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native"), str(ROOT / "plugins" / "vllm")]

GiB = 2**30
PROFILE = "1xH200-141G"  # the bundled profile of the machine these results come from
MODEL = "Qwen3-30B-A3B"
BATCHES = (1, 4, 16, 32, 64)
PROMPT, LONG, SHORT = 32, 132, 4
TTFT_LENGTHS, TTFT_BATCH = (512, 2048, 8192), 16
REPEATS = 3


def log(*a) -> None:
    print(*a, flush=True)


# --- the model directory (config + tokenizer, no weights) --------------------------------------------------
def prepare(out: str, layers: int | None = None) -> None:
    """config.json of Qwen3-30B-A3B (as Qwen publishes it) and the real Qwen3 tokenizer, no weights."""
    import shutil

    from transformers import Qwen3MoeConfig

    import qwenhw.tiny as tiny

    cfg = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=layers or 48,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                         moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                         max_position_embeddings=40960, tie_word_embeddings=False, rope_theta=1e6,
                         rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(path / "config.json")
    tiny.add_legacy_keys(path / "config.json", moe=True)
    for name in tiny.TOKENIZER_FILES:
        shutil.copy(tiny.tokenizer_dir() / name, path / name)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643]}))
    log(f"wrote {path} (config.json, tokenizer, no weights)")


def prompts(tokenizer, rows: int, length: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """`rows` distinct random prompts of about `length` tokens, as text and as the ids that text tokenizes to
    (so both engines, and both call paths, see the same tokens)."""
    g = random.Random(seed)
    texts, ids = [], []
    for _ in range(rows):
        text = tokenizer.decode([g.randrange(1000, 150000) for _ in range(length)])
        row = tokenizer(text, add_special_tokens=False).input_ids[:length]
        text = tokenizer.decode(row)
        texts.append(text)
        ids.append(tokenizer(text, add_special_tokens=False).input_ids)
    return texts, ids


class Seeds:
    """Fresh prompt seeds, so no two timed prompts repeat (a prefix cache would answer them from memory)."""

    def __init__(self, start: int):
        self.n = start

    def __call__(self) -> int:
        self.n += 1
        return self.n


def decode_rate(call, rows: int, long: int = LONG, short: int = SHORT, repeats: int = REPEATS) -> dict:
    """Median tokens/s of `call(max_tokens) -> tokens generated`, long against short, after a warm-up of each."""
    call(long), call(short)
    rates, runs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n_long = call(long)
        t1 = time.perf_counter()
        n_short = call(short)
        t2 = time.perf_counter()
        rates.append((n_long - n_short) / ((t1 - t0) - (t2 - t1)))
        runs.append({"long_s": t1 - t0, "short_s": t2 - t1, "long_tokens": n_long, "short_tokens": n_short})
    return {"rows": rows, "tok_s": statistics.median(rates), "step_ms": rows / statistics.median(rates) * 1e3,
            "runs": runs}


def ttft(call, repeats: int) -> dict:
    """Median seconds of `call()` (a one-token generation of fresh prompts), after one warm-up."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"s": statistics.median(times), "runs": times}


def host_link() -> dict:
    """Pinned host -> GPU copy and GPU -> GPU copy rates (GB/s), the two ceilings the models use."""
    import torch

    n = 1 * GiB
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    other = torch.empty(n, dtype=torch.uint8, device="cuda")

    def rate(fn, moved):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return moved / statistics.median(times) / 1e9

    out = {"h2d_pinned_gbs": rate(lambda: dev.copy_(host, non_blocking=True), n),
           "d2d_copy_gbs": rate(lambda: other.copy_(dev), 2 * n)}  # read + write
    del host, dev, other
    torch.cuda.empty_cache()
    return out


def info(device: str) -> dict:
    import platform

    import torch

    out = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
           "command": " ".join(sys.argv)}
    if device == "cuda":
        out.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / GiB)
    try:
        import qwenhw

        out["host"] = qwenhw.detect().summary()
    except Exception as exc:  # the record of the host is a convenience, not the measurement
        out["host"] = f"detect failed: {exc}"
    return out


def nontorch_gib() -> float:
    """CUDA context and libraries outside torch's allocator (what the planner's context figure covers)."""
    import torch

    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return ((total - free) - torch.cuda.memory_reserved()) / GiB


def random_model(path: str, device: str, layers: int | None):
    """transformers' Qwen3-MoE with random bf16 weights made on `device` (seconds on a GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    if layers:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def product_plan(backend: str, path: str, layers: int | None, device: str = "cuda", **request):
    """The plan qwenhw makes for this shape on the bundled profile of the benchmark machine, pointed at the
    weightless directory (`device` cpu, a smoke test: the directory's own model planned for this machine)."""
    import qwenhw
    from qwenhw.models import get as catalog

    _register_plugins()
    if device == "cpu":
        plan = qwenhw.plan(path, backend=backend, **request)
        if backend == "native":
            plan = plan.replace(config={**plan.config, "main_device": "cpu", "cuda_graphs": False})
        return plan
    spec = catalog(MODEL)
    if layers:
        spec = spec.with_(num_layers=layers)
    return qwenhw.plan(spec, hardware=PROFILE, backend=backend, **request).replace(model_path=path)


def _register_plugins() -> None:
    import qwenhw.plugins

    reg = qwenhw.plugins.load()
    for name, module in (("native", "qwenhw_native"), ("vllm", "qwenhw_vllm")):
        if name not in reg.backends:  # a checkout on a machine where the plugins are not installed
            import importlib

            qwenhw.plugins.register_plugin(importlib.import_module(module), f"qwenhw-{name}")


def memory_row(label: str, plan, measured_gib: float) -> dict:
    gpu = next(d for d in plan.devices if d.kind.endswith("gpu"))
    return {"what": label, "measured_gib": measured_gib, "planned_gib": gpu.total_gib,
            "planned": {"weights": gpu.weights_gib, "kv": gpu.kv_cache_gib, "overhead": gpu.overhead_gib}}


def write(out: str, name: str, result: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {Path(out) / (name + '.json')}")


# --- qwenhw's engine ---------------------------------------------------------------------------------------
def qwenhw_part(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from qwenhw_native.engine import RuntimeEngine, build_one_gpu
    from qwenhw_native.runtime import Runtime, SampleParams

    dev = args.device
    result = {"info": info(dev), "engine": "qwenhw", "decode": [], "decode_raw": [], "ttft": [], "memory": []}
    if dev == "cuda":
        result["info"].update(host_link())
        result["info"]["nontorch_gib"] = nontorch = nontorch_gib()
        torch.cuda.reset_peak_memory_stats()
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    model = random_model(args.model, dev, args.layers)
    result["start"] = {"random_weights_s": time.perf_counter() - t0}
    # the product's engine for a plan of 16 sequences at an 8192-token context: its start and its memory
    plan = product_plan("native", args.model, args.layers, dev, concurrency=16, context=8448)
    assert plan.engine == "one-gpu", plan.engine
    t0 = time.perf_counter()
    engine = build_one_gpu(model, tok, plan)
    result["start"]["runtimes_and_graphs_s"] = time.perf_counter() - t0
    # greedy tokens of one fixed prompt: two versions of the engine on the same random weights must agree
    result["greedy"] = list(engine.generate("The capital of France is", max_tokens=24, temperature=0)[0].token_ids)
    if dev == "cuda":
        torch.cuda.synchronize()
        result["memory"].append(memory_row("engine of the plan (batch 1 + 16 runtimes, 8448-token caches)", plan,
                                           torch.cuda.max_memory_reserved() / GiB + nontorch))
    log(json.dumps(result["start"]), json.dumps(result["memory"]))

    seeds = Seeds(1000)
    # time to first token through the plan's engine (its caches hold 8448 tokens)
    for length in TTFT_LENGTHS:
        for rows in (1, TTFT_BATCH):
            if args.quick and length > 512:
                continue
            n = max(1, REPEATS - 1) if rows > 1 and length > 2048 else REPEATS

            def text_call(rows=rows, length=length):
                texts, _ = prompts(tok, rows, length, seeds())
                engine.generate(texts if rows > 1 else texts[0], max_tokens=1, temperature=0)

            rt = engine.batched if rows > 1 else engine.runtime

            def raw_call(rows=rows, length=length, rt=rt):
                _, ids = prompts(tok, rows, length, seeds())
                rt.reset()
                list(rt.stream_batch(ids, [1] * rows, SampleParams(), set()))

            row = {"prompt_tokens": length, "rows": rows, "engine_generate": ttft(text_call, n),
                   "raw": ttft(raw_call, n)}
            result["ttft"].append(row)
            log(json.dumps({k: (v["s"] if isinstance(v, dict) else v) for k, v in row.items()}))
    if dev == "cuda":
        torch.cuda.synchronize()
        result["memory"].append(memory_row("after the TTFT rows (largest prefill: 16 x 8192 in 2048-token chunks)",
                                           plan, torch.cuda.max_memory_reserved() / GiB + nontorch))
    engine.close()
    del engine
    if dev == "cuda":
        torch.cuda.empty_cache()

    # decode: one engine per batch size, short caches (32-token prompts + 132 tokens)
    for rows in BATCHES if not args.quick else (1, 4):
        rt1 = Runtime(model, max_len=256, device=dev, batch=1, decode_experts="grouped_mm")
        rtb = Runtime(model, max_len=256, device=dev, batch=rows, decode_experts="grouped_mm") if rows > 1 else None
        for rt in (rt1, rtb):
            if rt is not None:
                rt.warm()
        eng = RuntimeEngine(model, tok, rt1, plan=plan, batched=rtb)
        texts, ids = prompts(tok, rows, PROMPT, 7)

        def text_call(n, texts=texts, eng=eng):
            out = eng.generate(texts if len(texts) > 1 else texts[0], max_tokens=n, temperature=0)
            return sum(len(c.token_ids) for c in out)

        def raw_call(n, ids=ids, rt=rtb or rt1):
            rt.reset()
            return sum(len(t) for t in rt.generate_batch(ids, n, SampleParams(), set()))

        row = decode_rate(text_call, rows)
        raw = decode_rate(raw_call, rows)
        result["decode"].append(row)
        result["decode_raw"].append(raw)
        log(json.dumps({"rows": rows, "tok_s": row["tok_s"], "raw_tok_s": raw["tok_s"]}))
        eng.close()
        del eng, rt1, rtb
        if dev == "cuda":
            torch.cuda.empty_cache()
    return result


def hybrid_part(args) -> dict:
    """The MoE hybrid (experts in pinned host RAM, the CPU computes them) under a GPU cap, as planned."""
    import torch
    from transformers import AutoTokenizer

    from qwenhw_native.hybrid import build_hybrid

    dev = args.device
    result = {"info": info(dev), "engine": "qwenhw-hybrid", "gpu_cap_gib": args.gpu_memory_gib, "rows": [], "memory": []}
    nontorch = nontorch_gib() if dev == "cuda" else 0.0
    tok = AutoTokenizer.from_pretrained(args.model)
    seeds = Seeds(5000)
    for label, cache in (("no expert cache", False), ("static expert cache", True)):
        plan = product_plan("native", args.model, args.layers, dev, engine="hybrid", context=4096,
                            gpu_memory_gib=args.gpu_memory_gib)
        if not cache:
            plan = plan.replace(config={**plan.config, "expert_cache_bytes": 0})
        t0 = time.perf_counter()
        model = random_model(args.model, dev, args.layers)  # on the GPU: the hybrid moves the experts out
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = build_hybrid(model, tok, plan)
        start = time.perf_counter() - t0
        if dev == "cuda":  # the peak from here on: the experts' GPU copies of the random model are gone
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        texts, _ = prompts(tok, 1, PROMPT, 11)

        def call(n, engine=engine, texts=texts):
            return len(engine.generate(texts[0], max_tokens=n, temperature=0)[0].token_ids)

        engine.hybrid.stats.update(cpu_experts=0, gpu_experts=0)
        row = decode_rate(call, 1, long=36)  # ~20 tok/s: 32 extra tokens are enough
        pairs = engine.hybrid.stats  # decode's (token, expert) pairs: served by the GPU cache or the CPU
        row["cache_hit_rate"] = pairs["gpu_experts"] / max(1, pairs["gpu_experts"] + pairs["cpu_experts"])

        def first(engine=engine):
            texts, _ = prompts(tok, 1, 2048, seeds())
            engine.generate(texts[0], max_tokens=1, temperature=0)

        row.update(what=label, expert_cache_gib=plan.config.get("expert_cache_bytes", 0) / GiB,
                   ttft_2048=ttft(first, 1), random_weights_s=built, start_s=start,
                   cpu_threads=torch.get_num_threads(), thread_calibration=engine.hybrid.threads)
        result["rows"].append(row)
        if dev == "cuda":
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_reserved() / GiB + nontorch
            if cache:
                result["memory"].append(memory_row(f"hybrid, {label}", plan, measured))
        log(json.dumps({k: v for k, v in row.items() if k != "runs"}))
        engine.close()
        del engine, model
        import gc

        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return result


def workload_part(args) -> dict:
    """Whole requests through qwenhw's engine (Engine.generate): `rows` prompts of `prompt` tokens arriving
    together, each answered with `answer` tokens; the wall time of the batch is every request's latency."""
    import torch
    from transformers import AutoTokenizer

    from qwenhw_native.engine import build_one_gpu

    dev = args.device
    result = {"info": info(dev), "engine": "qwenhw", "workloads": []}
    tok = AutoTokenizer.from_pretrained(args.model)
    model = random_model(args.model, dev, args.layers)
    seeds = Seeds(9000)
    for spec in args.workloads.split(","):
        rows, prompt, answer = (int(x) for x in spec.split("x"))
        plan = product_plan("native", args.model, args.layers, dev, concurrency=rows, context=prompt + answer + 64)
        engine = build_one_gpu(model, tok, plan)
        times = []
        for r in range(REPEATS + 1):
            texts, _ = prompts(tok, rows, prompt, seeds())
            t0 = time.perf_counter()
            out = engine.generate(texts if rows > 1 else texts[0], max_tokens=answer, temperature=0)
            if r:
                times.append(time.perf_counter() - t0)
        row = {"rows": rows, "prompt_tokens": prompt, "output_tokens": answer, "latency_s": statistics.median(times),
               "runs": times, "answer_tokens": [len(c.token_ids) for c in out]}
        result["workloads"].append(row)
        log(json.dumps({k: v for k, v in row.items() if k != "answer_tokens"}))
        engine.close()
        del engine
        if dev == "cuda":
            torch.cuda.empty_cache()
    return result


# --- vLLM ------------------------------------------------------------------------------------------------
def vllm_part(args) -> dict:
    """Runs `vllm_child` in a child process whose output (vLLM's engine core logs too) is kept: vLLM states
    its memory split only there."""
    import subprocess

    name = "vllm_offload" if args.gpu_memory_gib else "vllm"
    logfile = Path(args.out) / f"{name}.log"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "vllm-child", *sys.argv[2:]]
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            sys.stdout.write(line)
            lines.append(line)
    logfile.write_text("".join(lines))
    if child.returncode:
        raise SystemExit(f"the vLLM run failed (exit {child.returncode}); its log: {logfile}")
    result = json.loads((Path(args.out) / f"{name}_child.json").read_text())
    (Path(args.out) / f"{name}_child.json").unlink()
    result["vllm_log"] = parse_vllm_log("".join(lines))
    return result


def vllm_child(args) -> dict:
    import qwenhw

    request = {"context": 16384}
    if args.gpu_memory_gib:
        request.update(gpu_memory_gib=args.gpu_memory_gib, context=4096)
    plan = product_plan("vllm", args.model, args.layers, args.device, **request)
    engine_args = {**plan.config["engine_args"], "load_format": "dummy"}
    if args.layers:
        engine_args["hf_overrides"] = {"num_hidden_layers": args.layers}
    plan = plan.replace(config={**plan.config, "engine_args": engine_args})
    result = {"info": info(args.device), "engine": "vllm", "engine_args": engine_args, "decode": [],
              "decode_engine": [], "ttft": [], "memory": [], "plan": {
                  "devices": [d.to_dict() for d in plan.devices], "max_context": plan.max_context}}
    result["load_failures"] = []
    for attempt in range(3):
        t0 = time.perf_counter()
        try:
            engine = qwenhw.load(plan)  # the vllm backend in this process: LLM(**engine args)
            break
        except Exception as exc:  # under a GPU cap: the planned offload left vLLM no KV cache; offload more
            if not args.gpu_memory_gib or attempt == 2:
                raise
            result["load_failures"].append({"cpu_offload_gb": engine_args["cpu_offload_gb"], "error": str(exc)[:500]})
            engine_args = {**engine_args, "cpu_offload_gb": engine_args["cpu_offload_gb"] + 2}
            plan = plan.replace(config={**plan.config, "engine_args": engine_args})
            result["engine_args"] = engine_args
    result["start"] = {"qwenhw_load_s": time.perf_counter() - t0}
    import vllm
    from vllm import SamplingParams

    result["info"]["vllm"] = vllm.__version__
    llm, tok = engine.llm, engine.tokenizer
    log(json.dumps(result["start"]))
    seeds = Seeds(1000)

    def direct(ids, n):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": r} for r in ids], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    batches = (1,) if args.gpu_memory_gib else (BATCHES if not args.quick else (1, 4))
    if not args.gpu_memory_gib:
        for length in TTFT_LENGTHS:
            for rows in (1, TTFT_BATCH):
                if args.quick and length > 512:
                    continue

                def call(rows=rows, length=length):
                    direct(prompts(tok, rows, length, seeds())[1], 1)

                def text_call(rows=rows, length=length):
                    texts = prompts(tok, rows, length, seeds())[0]
                    engine.generate(texts if rows > 1 else texts[0], max_tokens=1, temperature=0)

                row = {"prompt_tokens": length, "rows": rows, "direct": ttft(call, REPEATS),
                       "engine_generate": ttft(text_call, REPEATS)}
                result["ttft"].append(row)
                log(json.dumps({k: (v["s"] if isinstance(v, dict) else v) for k, v in row.items()}))
    if args.gpu_memory_gib:
        row = {"prompt_tokens": 2048, "rows": 1,
               "direct": ttft(lambda: direct(prompts(tok, 1, 2048, seeds())[1], 1), 1)}
        result["ttft"].append(row)
        log(json.dumps({"ttft_2048": row["direct"]["s"]}))
    long = 36 if args.gpu_memory_gib else LONG  # offloaded: ~10 tok/s, 32 extra tokens are enough
    for rows in batches:
        texts, ids = prompts(tok, rows, PROMPT, 7)
        row = decode_rate(lambda n, ids=ids: direct(ids, n), rows, long=long)
        result["decode"].append(row)

        def text_call(n, texts=texts):
            return sum(len(c.token_ids) for c in engine.generate(texts if rows > 1 else texts[0], max_tokens=n,
                                                                 temperature=0))

        through = decode_rate(text_call, rows, long=long) if rows in (1, 16) else None
        if through:
            result["decode_engine"].append(through)
        log(json.dumps({"rows": rows, "tok_s": row["tok_s"], "engine_generate_tok_s": through and through["tok_s"]}))
    if not args.gpu_memory_gib:  # the product path: a chat turn with thinking off and on (random weights:
        chats = {}               # the text is noise; what matters is that both modes render and run)
        for thinking in (False, True):
            r = engine.chat([{"role": "user", "content": "What is 2+2?"}], thinking=thinking, max_tokens=16,
                            temperature=0)
            chats[str(thinking)] = {"prompt_ends": r.prompt[-40:], "completion_tokens": r.completion_tokens,
                                    "thinking": r.thinking}
        result["chat"] = chats
        log(json.dumps(chats))
    engine.close()
    return result


# vLLM's own start-up lines (vllm/v1/worker/gpu_model_runner.py, gpu_worker.py, core.py, ...)
VLLM_LOG = {
    "weights_gib": r"Model loading took ([\d.]+) GiB",
    "offloaded_gib": r"Total CPU offloaded parameters: ([\d.]+)",
    "kv_cache_gib": r"Available KV cache memory: ([\d.]+) GiB",
    "kv_tokens": r"KV cache size: ([\d,]+) tokens",
    "graph_estimate_gib": r"Estimated CUDA graph memory: ([\d.]+) GiB total",
    "graph_actual_gib": r"CUDA graph pool memory: ([\d.]+) GiB \(actual\)",
    "graph_s": r"Graph capturing finished in ([\d.]+) secs?",
    "graph_gib": r"Graph capturing finished in [\d.]+ secs?, took ([\d.-]+) GiB",
    "compile_s": r"torch\.compile (?:and initial profiling/warmup run together )?(?:took|takes) ([\d.]+) s in total",
    "weights_load_s": r"Loading weights took ([\d.]+) seconds",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def parse_vllm_log(text: str) -> dict:
    out = {}
    for key, pattern in VLLM_LOG.items():
        m = re.findall(pattern, text)
        if m:
            out[key] = float(m[-1].replace(",", ""))
    return out


# --- report: the planner against these measurements (pure Python, any machine) ----------------------------
TOLERANCE = {"decode": 0.15, "ttft": 0.25, "memory": 0.05, "latency": 0.15, "hybrid": 0.15}


def predict(backend: str | None, layers: int = 48, engine: str | None = None, **request):
    import qwenhw
    from qwenhw.models import get as catalog

    _register_plugins()
    spec = catalog(MODEL)
    if layers != 48:
        spec = spec.with_(num_layers=layers)
    return qwenhw.plan(spec, hardware=PROFILE, backend=backend, engine=engine, **{"dtype": "bf16", **request})


PROMPT_KERNELS_DATE = "2026-12-07"  # the native engine's prompt passes on its kernels from this day on


def _without_prompt_kernels(layers: int, rows: int, tokens: int, profile: str = PROFILE) -> float:
    """What a one-GPU plan's TTFT gains without the prompt kernels (transformers' modules for the prompt
    passes, as the engine measured before PROMPT_KERNELS_DATE ran them): the two prefill fits' difference."""
    from qwenhw.hardware.bundled import load_bundled
    from qwenhw.models import get as catalog
    from qwenhw.planning import speed as mechanisms
    from qwenhw_native import limits, speed

    spec = catalog(MODEL).with_(num_layers=layers)
    tflops = load_bundled(profile).nodes[0].gpus()[0].bf16_tflops
    passes = mechanisms.budget_passes(rows, tokens, limits.PREFILL_CHUNK, limits.PREFILL_TOKENS)
    return (mechanisms.prefill(speed.PREFILL, spec, tflops, passes, rows)
            - mechanisms.prefill(speed.PROMPT_KERNELS_PREFILL, spec, tflops, passes, rows))


def report_rows(folder: str) -> list[dict]:
    """Every measured figure of a results folder next to what the planner predicts for it today."""
    res = {p.stem: json.loads(p.read_text()) for p in Path(folder).glob("*.json")}
    rows: list[dict] = []

    def add(kind, what, measured, predicted, tol=None):
        rows.append({"kind": kind, "what": what, "measured": measured, "predicted": predicted,
                     "error": predicted / measured - 1, "tolerance": tol or TOLERANCE[kind]})

    for name, backend, layers in (("qwenhw", "native", 48), ("qwenhw_24layers", "native", 24),
                                  ("vllm", "vllm", 48), ("vllm_24layers", "vllm", 24)):
        if name not in res:
            continue
        label = ("qwenhw" if backend == "native" else "vLLM") + ("" if layers == 48 else f" {layers} layers")
        engine = "one-gpu" if backend == "native" else "vllm"
        for r in res[name]["decode"]:
            plan = predict(backend, layers, engine, concurrency=r["rows"], prompt_tokens=PROMPT, output_tokens=LONG)
            add("decode", f"{label} decode, {r['rows']} seq (tok/s)", r["tok_s"], plan.estimate.throughput_tok_s)
        for r in res[name]["ttft"]:
            plan = predict(backend, layers, engine, concurrency=r["rows"], prompt_tokens=r["prompt_tokens"],
                           output_tokens=1, context=16384)
            ttft = plan.estimate.ttft_s
            if backend == "native" and res[name]["info"]["date"] < PROMPT_KERNELS_DATE:
                ttft += _without_prompt_kernels(layers, r["rows"], r["prompt_tokens"])
            add("ttft", f"{label} TTFT {r['rows']} x {r['prompt_tokens']} tokens (s)", r["engine_generate"]["s"], ttft)
    if "vllm" in res:
        log_ = res["vllm"]["vllm_log"]
        plan = predict("vllm", context=16384)
        gpu = plan.devices[0]
        add("memory", "vLLM KV cache, 48 layers (GiB)", log_["kv_cache_gib"], gpu.kv_cache_gib)
        add("memory", "vLLM weights (GiB)", log_["weights_gib"], gpu.weights_gib)
    if "vllm_24layers" in res:
        plan = predict("vllm", 24, context=16384)
        add("memory", "vLLM KV cache, 24 layers (GiB)", res["vllm_24layers"]["vllm_log"]["kv_cache_gib"],
            plan.devices[0].kv_cache_gib)
    for name in ("qwenhw", "qwenhw_24layers"):
        for m in res.get(name, {}).get("memory", [])[-1:]:  # after the largest prefill the plan reserves for
            layers = 24 if "24" in name else 48
            plan = predict("native", layers, "one-gpu", concurrency=16, context=8448)
            add("memory", f"qwenhw engine, {layers} layers, 16 seq (GiB)", m["measured_gib"], plan.devices[0].total_gib)
    if "vllm_offload" in res:
        r = res["vllm_offload"]
        plan = predict("vllm", gpu_memory_gib=20, context=4096, prompt_tokens=PROMPT, output_tokens=36)
        add("hybrid", "vLLM cpu_offload_gb under 20 GiB, 1 seq (tok/s)", r["decode"][0]["tok_s"],
            plan.estimate.decode_tok_s)
        plan = predict("vllm", gpu_memory_gib=20, context=4096, prompt_tokens=2048, output_tokens=1)
        add("ttft", "vLLM cpu_offload_gb TTFT 1 x 2048 tokens (s)", r["ttft"][0]["direct"]["s"], plan.estimate.ttft_s)
    for name, machine in (("hybrid", ""), ("hybrid_first_machine", ", first machine")):
        for r in res.get(name, {}).get("rows", []):
            plan = predict("native", engine="hybrid", gpu_memory_gib=20, context=4096, prompt_tokens=PROMPT,
                           output_tokens=36)
            if not r["expert_cache_gib"]:
                plan = _without_cache(plan)
            add("hybrid", f"qwenhw hybrid, {r['what']}{machine} (tok/s)", r["tok_s"], plan.estimate.decode_tok_s)
    if "hybrid" in res:
        for m in res["hybrid"]["memory"]:
            plan = predict("native", engine="hybrid", gpu_memory_gib=20, context=4096)
            add("memory", "qwenhw hybrid GPU under 20 GiB (GiB)", m["measured_gib"], plan.devices[0].total_gib)
    for r in res.get("workload", {}).get("workloads", []):
        plan = predict("native", 48, "one-gpu", concurrency=r["rows"], prompt_tokens=r["prompt_tokens"],
                       output_tokens=r["output_tokens"], context=r["prompt_tokens"] + r["output_tokens"] + 64)
        add("latency", f"qwenhw request {r['rows']} x ({r['prompt_tokens']} + {r['output_tokens']}) tokens (s)",
            r["latency_s"], plan.estimate.latency_s)
    return rows


# The workloads the planner must choose right (issue: the choice is the product): (sequences, prompt
# tokens, answer tokens) -> which engine the measurements say finishes them sooner
CHOICES = ((1, 32, 128), (32, 1024, 256), (16, 2048, 256))


def capped_latency(res: dict, engine: str, answer: int) -> float:
    """Under the GPU cap, one 32-token prompt: its 4-token generation (prefill included) plus the rest at the
    measured decode rate (the hybrid as planned: with its static expert cache)."""
    rows = res["hybrid"]["rows"][-1:] if engine == "qwenhw" else res["vllm_offload"]["decode"]
    r = rows[0]
    short = statistics.median(run["short_s"] for run in r["runs"])
    return short + (answer - SHORT) / r["tok_s"]


def measured_latency(res: dict, engine: str, rows: int, prompt: int, answer: int) -> float:
    """A request's latency for the workload from the measurements: qwenhw's whole requests where the
    workload part ran them, else time to first token (the row with as many prompt tokens in all; none
    measured for short prompts: 0, which favours that engine) plus answer - 1 decode steps at `rows`."""
    if engine == "qwenhw":
        for r in res.get("workload", {}).get("workloads", []):
            if (r["rows"], r["prompt_tokens"], r["output_tokens"]) == (rows, prompt, answer):
                return r["latency_s"]
    key = "raw" if engine == "qwenhw" else "direct"
    ttft = next((r[key]["s"] for r in res[engine]["ttft"] if r["rows"] * r["prompt_tokens"] == rows * prompt), 0.0)
    step = next(rows / r["tok_s"] for r in res[engine]["decode"] if r["rows"] == rows)
    return ttft + (answer - 1) * step


def choices(folder: str) -> list[dict]:
    """For each CHOICES workload: the engine the planner picks on this machine's profile and the one the
    measurements say is faster."""
    res = {p.stem: json.loads(p.read_text()) for p in Path(folder).glob("*.json")}
    out = []
    for rows, prompt, answer in CHOICES:
        plan = predict(None, concurrency=rows, prompt_tokens=prompt, output_tokens=answer)
        measured = {e: measured_latency(res, e, rows, prompt, answer) for e in ("qwenhw", "vllm")}
        out.append({"workload": (rows, prompt, answer), "chosen": "vllm" if plan.backend == "vllm" else "qwenhw",
                    "faster": min(measured, key=measured.get), "measured_s": measured,
                    "planned_s": plan.estimate.latency_s})
    if "hybrid" in res and "vllm_offload" in res:  # the GPU capped at 20 GiB: the hybrid or cpu_offload_gb
        plan = predict(None, gpu_memory_gib=20, context=4096, prompt_tokens=PROMPT, output_tokens=LONG)
        measured = {e: capped_latency(res, e, LONG) for e in ("qwenhw", "vllm")}
        out.append({"workload": (1, PROMPT, LONG, "20 GiB GPU"), "chosen": "vllm" if plan.backend == "vllm" else "qwenhw",
                    "faster": min(measured, key=measured.get), "measured_s": measured,
                    "planned_s": plan.estimate.latency_s})
    return out


def _without_cache(plan):
    """The hybrid plan's estimate with no GPU expert cache (the bench's first configuration)."""
    from qwenhw.models import memory as mm
    from qwenhw.planning.workload import workload
    from qwenhw_native import planner

    import qwenhw

    spec = qwenhw.models.spec.ModelSpec.from_dict(plan.spec)
    hw = qwenhw.api.hardware_profile(PROFILE)
    gpu = hw.node.gpus("nvidia")[0]
    req = qwenhw.api.make_request(concurrency=1, prompt_tokens=PROMPT, output_tokens=36)
    wb = mm.weight_bytes_split(spec)
    est = planner._hybrid_estimate(spec, hw.node, gpu, workload(req), "bf16", 0.0, wb.experts)
    return plan.replace(estimate=est)


def report(folder: str) -> None:
    rows = report_rows(folder)
    print(f"{'figure':<62}{'measured':>10}{'planned':>10}{'error':>8}  ok")
    for r in rows:
        ok = abs(r["error"]) <= r["tolerance"]
        print(f"{r['what']:<62}{r['measured']:>10.3f}{r['predicted']:>10.3f}{r['error']:>+8.1%}  "
              f"{'yes' if ok else 'NO (>' + format(r['tolerance'], '.0%') + ')'}")
    print(f"\n{'workload (sequences x prompt + answer)':<40}{'chosen':>8}{'faster':>8}  measured latency s")
    for c in choices(folder):
        n, p, a, *cap = c["workload"]
        m = ", ".join(f"{k} {v:.2f}" for k, v in c["measured_s"].items())
        what = f"{n} x ({p} + {a})" + (f", {cap[0]}" if cap else "")
        print(f"{what:<40}{c['chosen']:>8}{c['faster']:>8}  {m}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("prepare", "qwenhw", "hybrid", "workload", "vllm", "vllm-child", "report"))
    ap.add_argument("model", help="the model directory (prepare writes it); for report: the results folder")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke tests)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="vllm/hybrid: the GPU cap (20 GiB)")
    ap.add_argument("--quick", action="store_true", help="a few rows only (smoke tests)")
    ap.add_argument("--workloads", default="16x2048x256,1x1024x256,32x32x128,1x32x128",
                    help="workload: ROWSxPROMPTxANSWER,...")
    args = ap.parse_args()
    if args.part == "prepare":
        return prepare(args.model, args.layers)
    if args.part == "report":
        return report(args.model)
    if args.part == "hybrid" and not args.gpu_memory_gib:
        args.gpu_memory_gib = 20.0
    part = {"qwenhw": qwenhw_part, "hybrid": hybrid_part, "workload": workload_part, "vllm": vllm_part,
            "vllm-child": vllm_child}[args.part]
    name = {"vllm-child": "vllm_child"}.get(args.part, args.part)
    if args.part.startswith("vllm") and args.gpu_memory_gib:
        name = name.replace("vllm", "vllm_offload")
    write(args.out, name, part(args))


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the guard
    main()
