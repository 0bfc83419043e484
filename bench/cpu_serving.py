"""A server's batch on the CPU: the plain transformers engine, rows one after another against one generate() call.

    python bench/cpu_serving.py --out results/          (any machine, ~3 minutes on 2 cores)

Writes a Qwen3-0.6B-shaped checkpoint (random bf16 weights, the real Qwen3 tokenizer), plans it with qwenhw for
this machine with the CPU-only transformers engine and 4 concurrent sequences, loads it with `qwenhw.load`, and
times `Engine.stream_batch` (the path `qwenhw serve` takes) on 4 prompts of different lengths:
  - one row at a time (what the server did before the engine batched);
  - the 4 rows in one call (the engine decodes them in one generate(): left-padded, each row stopping on its
    own).
Whole texts (stream=False), greedy, `--tokens` tokens per row; median of `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea, then explain it.",
           "1, 2, 3, 4,"]


def write_checkpoint(path: Path, layers: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwenhw.tiny import TOKENIZER_FILES, tokenizer_dir

    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir() / name, path / name)


def timed(engine, prompts, samplings) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(p.tokens for p in engine.stream_batch(prompts, samplings, stream=False) if p.finish)
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28, help="Qwen3-0.6B has 28")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import qwenhw
    from qwenhw.engine.base import Sampling

    work = Path(tempfile.mkdtemp(prefix="qwenhw-cpu-serving-"))
    try:
        ckpt = work / "qwen3-0.6b-shape"
        write_checkpoint(ckpt, args.layers)
        plan = qwenhw.plan(str(ckpt), backend="offload", engine="transformers", context=512, concurrency=len(PROMPTS))
        greedy = [Sampling(max_tokens=args.tokens, temperature=0)] * len(PROMPTS)
        with qwenhw.load(plan) as engine:
            engine.generate(PROMPTS[0], max_tokens=2, temperature=0)  # warm-up
            alone, together = [], []
            for _ in range(args.repeats):
                runs = [timed(engine, [p], [s]) for p, s in zip(PROMPTS, greedy)]
                alone.append(sum(n for _, n in runs) / sum(t for t, _ in runs))
                t, n = timed(engine, PROMPTS, greedy)
                together.append(n / t)
        result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "plan": f"{plan.engine} {plan.dtype}, concurrency {plan.concurrency}", "layers": args.layers,
                  "tokens_per_row": args.tokens, "rows": len(PROMPTS),
                  "one_at_a_time_tok_s": statistics.median(alone), "together_tok_s": statistics.median(together),
                  "runs": {"one_at_a_time": alone, "together": together}}
        result["ratio"] = result["together_tok_s"] / result["one_at_a_time_tok_s"]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu_serving.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
