"""qwenhw.load end to end on several GPUs: the product path of the multi-GPU plans, checkpoint to tokens.

    python bench/rank_job.py --tokenizer DIR --out $OUT          (a host with 2 or 4 GPUs, ~4 minutes)

bench/multi_gpu.py times the runtime inside a torchrun job it starts itself, with weights it makes in
memory. This script goes the way a user does:
  1. writes a Qwen3-30B-A3B-shaped checkpoint (random bf16 weights, `--layers` layers; save_pretrained
     stores the experts one by one, as the Hub checkpoints do) next to the Qwen3 tokenizer files;
  2. plans each layout for this machine (1 GPU fast path, TP over all GPUs, DP replicas) with qwenhw's
     planner, and loads it with `qwenhw.load`: the TP ranks read only their slices (parallel.load_shard),
     all ranks run as a torchrun job that qwenhw starts and drives;
  3. times the load, one streamed prompt, and a list of 16 prompts of different lengths (decoded
     `concurrency` at a time); compares every completion's tokens with the 1-GPU engine's;
  4. serves the engine over HTTP (`qwenhw serve`'s server) and times the 16 prompts sent as 16 requests,
     one after another and all at once (the server decodes concurrent requests together).
`--checkpoint DIR` reuses a checkpoint (on a machine without GPUs, the tiny test one: a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native")]

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Write a haiku about GPUs.",
    "The quick brown fox", "import torch\nimport", "Explain tensor parallelism in one sentence:", "Qwen3 is",
    "In 1969,", "SELECT * FROM", "Dear reader,", "The mixture-of-experts layer routes each token to",
    "Once upon a time", "#include <stdio.h>", "Paris, London, Berlin,", "The answer is",
]


def log(*a):
    print(*a, flush=True)


def build_checkpoint(path: Path, layers: int, tokenizer: Path) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                         num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                         tie_word_embeddings=False, rope_theta=1e6, bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda:0"):
        model = Qwen3MoeForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="5GB")
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, path / name)
    del model
    torch.cuda.empty_cache()


def measure(plan, label: str, reference: list | None) -> tuple[dict, list]:
    import qwenhw

    t = time.perf_counter()
    engine = qwenhw.load(plan)
    load_s = time.perf_counter() - t
    try:
        # CUDA graph capture, untimed: the batch-1 runtime, and the batched one of every replica
        engine.generate(PROMPTS[0], max_tokens=4, temperature=0)
        engine.generate(PROMPTS, max_tokens=4, temperature=0)
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            one = engine.generate(PROMPTS[0], max_tokens=64, temperature=0)[0]
            rates.append(len(one.token_ids) / (time.perf_counter() - t))
        t = time.perf_counter()
        many = engine.generate(PROMPTS, max_tokens=64, temperature=0)
        many_s = time.perf_counter() - t
        streamed = "".join(engine.stream(PROMPTS[1], max_tokens=16, temperature=0))
        http = serve_rates(engine)
    finally:
        engine.close()
    tokens = [list(c.token_ids) for c in many]
    row = {"layout": label, "engine": plan.engine, "parallel": str(plan.parallel), "load_s": load_s,
           "load_info": {k: v for k, v in getattr(engine, "info", {}).items() if k != "python"},
           "one_prompt_tok_s": statistics.median(rates), "sixteen_prompts_tok_s": sum(map(len, tokens)) / many_s,
           "pred_tok_s": plan.estimate.throughput_tok_s, "streamed_chars": len(streamed), **http}
    if reference is not None:  # greedy tokens against the 1-GPU engine, prompt by prompt (bf16: sums differ)
        same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                for x, y in zip(tokens, reference)]
        row["tokens_equal_to_1_gpu"] = f"{sum(s == len(r) for s, r in zip(same, reference))}/16 prompts all 64"
        row["first_difference_median"] = statistics.median(same)
    return row, tokens


def serve_rates(engine, max_tokens: int = 64) -> dict:
    """Completion tokens per second through the HTTP server: 16 requests one after another, then at once."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.request import Request, urlopen

    from qwenhw.serve import make_server

    server = make_server(engine, "127.0.0.1", 0, served_model_name="m")
    server.start()

    def post(prompt: str) -> int:
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
        with urlopen(Request(server.url + "/completions", body, {"Content-Type": "application/json"})) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    try:
        post(PROMPTS[0])
        t = time.perf_counter()
        alone = sum(post(p) for p in PROMPTS) / (time.perf_counter() - t)
        server.scheduler.batch_sizes.clear()
        gate = threading.Barrier(len(PROMPTS))  # the pool starts its threads one by one: send all at once

        def post_together(prompt: str) -> int:
            gate.wait()
            return post(prompt)

        t = time.perf_counter()
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = sum(pool.map(post_together, PROMPTS)) / (time.perf_counter() - t)
        sizes = dict(server.scheduler.batch_sizes)
    finally:
        server.shutdown()
        server.server_close()
    return {"http_one_at_a_time_tok_s": alone, "http_16_at_once_tok_s": together, "http_batch_sizes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokenizer", type=Path, help="folder with the Qwen3 tokenizer files")
    ap.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of writing one")
    ap.add_argument("--hardware", default=None, help="a profile name (default: this machine)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--experts", default=None,
                    help="TP layouts for these expert splits, e.g. ep,tp (default: the planner's choice)")
    ap.add_argument("--only-tp", action="store_true", help="only the TP layout(s): no 1-GPU or DP rows")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

    import qwenhw
    import qwenhw.plugins
    import qwenhw_native
    from qwenhw.api import make_request, model_spec
    from qwenhw_native import planner

    if "native" not in qwenhw.plugins.load().backends:  # run from a checkout: register it in-process
        qwenhw.plugins.register_plugin(qwenhw_native, "qwenhw-native")
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = Path(os.environ.get("TMPDIR", "/tmp")) / "qwenhw-rank-job-ckpt"
        t = time.perf_counter()
        build_checkpoint(ckpt, args.layers, args.tokenizer)
        log(f"checkpoint written in {time.perf_counter() - t:.1f} s")
    import torch
    from qwenhw.hardware import load_bundled

    hw = qwenhw.detect() if args.hardware is None else load_bundled(args.hardware)
    n = len(hw.node.gpus()) or 1
    spec = model_spec(str(ckpt))
    req = make_request(context=args.context, concurrency=16)
    if torch.cuda.is_available():
        one = planner.one_gpu_plan(spec, hw, req, "auto", args.context, "bf16")
    else:  # the smoke test: ranks fall back to the CPU, and so does this reference
        one = qwenhw.plan(str(ckpt), backend="native", engine="one-gpu", context=args.context,
                          concurrency=16)
    layouts = [] if args.only_tp else [("1 GPU, fast path", one)]
    if n > 1:
        tp = planner.parallel_plan(spec, hw, req, "auto", args.context, "bf16", n, n)
        for mode in args.experts.split(",") if args.experts else [tp.config.get("experts", "ep")]:
            split = "experts split" if mode == "tp" else f"EP={n}"
            layouts.append((f"TP={n} + {split}", tp.replace(config={**tp.config, "experts": mode})))
        if not args.only_tp:
            layouts.append((f"DP={n}", planner.parallel_plan(spec, hw, req, "auto", args.context, "bf16", n, 1)))
    rows, reference = [], None
    for label, plan in layouts:
        plan = plan.replace(spec=spec.to_dict(), model_path=str(ckpt))  # what qwenhw.plan attaches to its plans
        if not plan.fits:
            rows.append({"layout": label, "error": "; ".join(plan.reasons)})
            continue
        try:
            row, tokens = measure(plan, label, reference)
            reference = reference or tokens
        except Exception as exc:  # one layout failing to load is a result too
            row = {"layout": label, "error": f"{type(exc).__name__}: {exc}"[:800]}
        rows.append(row)
        log(json.dumps(row))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank_job_{n}.json").write_text(json.dumps({"rows": rows, "layers": args.layers}, indent=2))
    log(f"{'layout':<18} {'load s':>7} {'1 prompt tok/s':>15} {'16 prompts tok/s':>17} {'planner':>8} "
        f"{'HTTP 1 by 1':>12} {'HTTP 16 at once':>16}  tokens")
    for r in rows:
        if "error" in r:
            log(f"{r['layout']:<18} failed: {r['error']}")
            continue
        log(f"{r['layout']:<18} {r['load_s']:7.1f} {r['one_prompt_tok_s']:15.1f} {r['sixteen_prompts_tok_s']:17.1f} "
            f"{r['pred_tok_s']:8.0f} {r['http_one_at_a_time_tok_s']:12.1f} {r['http_16_at_once_tok_s']:16.1f}  "
            f"{r.get('tokens_equal_to_1_gpu', 'reference')}"
            + (f", first difference at token {r['first_difference_median']} (median)" if "first_difference_median"
               in r else ""))


if __name__ == "__main__":
    main()
