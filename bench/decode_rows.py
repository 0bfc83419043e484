"""Decode at many sequences on one GPU: qwenhw's engine at 32 to 128 rows, per routed-experts path.

    python bench/decode_rows.py .bench/qwen3-30b-a3b --rows 32,64,128 --out OUT

Qwen3-30B-A3B's shape, random bf16 weights. At 64 rows a step routes 512 (token, expert) pairs and touches
nearly all 128 experts of every layer, so a step reads almost all the weights, as a prompt pass does. Three
paths for the routed experts of a decode step (Tiles.moe_max_pairs and moe_index_pairs decide between them):
  slots     the decode kernels (kernels/moe.py): a program per touched expert and column block, each finding
            its expert's pairs among all the step's pairs (up to moe.MAX_PAIRS = 512 pairs; past it: grouped)
  indexed   the same kernels, the pairs sorted by expert once per layer by a kernel of their own (up to
            moe.MAX_INDEXED_PAIRS)
  blocks    indexed, the programs over the sorted pairs' blocks of 16 (Tiles.moe_blocks), not a program per
            expert and possible chunk
  grouped   the prompt pass's: pairs sorted by expert, torch's grouped GEMMs, kernels/moe_prompt.py around them
`--profile ROWS`: the GPU kernels of one generation at that many rows, per variant, the costliest first.
Each variant is a runtime of its own (its CUDA graphs keep the path they were captured with); tokens/s over
all rows as in bench/side_by_side.py (extra tokens of a long over a short generation per extra second).
vLLM's figures at the same row counts come from `bench/side_by_side.py vllm` in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native"), str(ROOT / "bench")]

VARIANTS = {"slots": {"moe_index_pairs": 1 << 30}, "indexed": {"moe_index_pairs": 0, "moe_max_pairs": 2048},
            "blocks": {"moe_index_pairs": 0, "moe_max_pairs": 2048, "moe_blocks": True},
            "grouped": {"moe_max_pairs": 0}}


def profile(call, steps: int) -> list[dict]:
    """The GPU kernels of `call(steps)` (a generation), by total time, the first 12: name, calls, ms per step."""
    import torch
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(steps)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    return [{"kernel": e.key[:90], "calls": e.count, "ms_per_step": round(e.device_time_total / 1e3 / steps, 3)}
            for e in events]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="bench/side_by_side.py prepare's folder (config.json + tokenizer)")
    ap.add_argument("--rows", default="32,64,128")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--profile", type=int, default=0, help="rows at which to list each variant's kernels")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from qwenhw_native.kernels import moe, tiles
    from qwenhw_native.runtime import Runtime, SampleParams
    from side_by_side import PROMPT, decode_rate, info, prompts, random_model

    dev = torch.device("cuda")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = random_model(args.model, "cuda", args.layers)
    result = {"info": info("cuda"), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "tiles": tiles.to_json(tiles.for_device(dev)), "max_pairs": moe.MAX_PAIRS,
              "max_indexed_pairs": moe.MAX_INDEXED_PAIRS, "rows": []}
    for rows in (int(r) for r in args.rows.split(",")):
        _, ids = prompts(tok, rows, PROMPT, 7)
        greedy = {}
        for name in args.variants.split(","):
            with tiles.override(dev, **VARIANTS[name]):
                rt = Runtime(model, max_len=256, device=dev, batch=rows, decode_experts="grouped_mm")
                rt.warm()

                def call(n, rt=rt):
                    rt.reset()
                    return sum(len(t) for t in rt.generate_batch(ids, n, SampleParams(), set()))

                row = decode_rate(call, rows)
                if rows == args.profile:
                    row["kernels"] = profile(call, 32)
                    for k in row["kernels"]:
                        print(f"  {k['ms_per_step']:8.3f} ms {k['calls']:6d}  {k['kernel']}", flush=True)
                rt.reset()
                greedy[name] = [t[1] for t in rt.generate_batch(ids, 2, SampleParams(), set())]  # a decode step's
            row.update(variant=name, pairs=rows * model.config.num_experts_per_tok)
            row.pop("runs")
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            del rt
            torch.cuda.empty_cache()
        first = next(iter(greedy.values()))  # the paths round differently: most decoded tokens should agree
        result.setdefault("decoded_tokens_agree", {})[rows] = {k: sum(a == b for a, b in zip(first, v)) / rows
                                                               for k, v in greedy.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_rows.json").write_text(json.dumps(result, indent=2))
    print("decode-step tokens equal to the first variant's:", json.dumps(result["decoded_tokens_agree"]))
    print("| rows | " + " | ".join(args.variants.split(",")) + " |")
    for rows in sorted({r["rows"] for r in result["rows"]}):
        print(f"| {rows} | " + " | ".join(f"{r['tok_s']:.0f}" for r in result["rows"] if r["rows"] == rows) + " |")


if __name__ == "__main__":
    main()
