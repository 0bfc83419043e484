"""Where a prompt's time goes in the native runtime: one prefill of ROWS x TOKENS under torch's profiler, the
CUDA kernels that took the most time, grouped by name (random bf16 weights of the model directory's shape).

    python bench/profile_prefill.py DIR --rows 1 --tokens 2048 --out OUT     # DIR: side_by_side.py prepare's

Writes OUT/prefill_profile_{rows}x{tokens}.json (the total, and each kernel's share) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from qwenhw_native.runtime import Runtime

    model = random_model(args.model, "cuda", None)
    rt = Runtime(model, max_len=args.tokens + 16, device="cuda", batch=args.rows)
    ids = torch.randint(1000, 150000, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0)).tolist()
    for _ in range(2):  # warm-up: kernels compiled and autotuned
        rt.prefill(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rt.prefill(ids)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        rt.prefill(ids)
        torch.cuda.synchronize()
    kernels = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0),
                     key=lambda k: -k[1])
    gpu_ms = sum(ms for _, ms, _ in kernels)
    rows = [{"kernel": name[:120], "ms": ms, "calls": n, "share": ms / gpu_ms} for name, ms, n in kernels[:args.top]]
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "rows": args.rows,
              "tokens": args.tokens, "wall_ms": wall * 1e3, "gpu_kernels_ms": gpu_ms, "top": rows,
              "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"prefill_profile_{args.rows}x{args.tokens}.json").write_text(json.dumps(result, indent=2))
    print(f"prefill {args.rows} x {args.tokens}: {wall * 1e3:.1f} ms wall, {gpu_ms:.1f} ms of kernels")
    for r in rows:
        print(f"{r['ms']:8.2f} ms {r['share']:6.1%} {r['calls']:5d}x  {r['kernel']}")


if __name__ == "__main__":
    main()
