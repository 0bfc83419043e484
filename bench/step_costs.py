"""What a serving loop's passes cost on one GPU while many rows decode: a decode step of the decoding rows, a
prompt pass of K whole prompts between two decode steps, and the same prompts carried by the decode step's
own pass (a mixed pass, KernelConfig.mixed: the weights read once for both). Under load a server runs these
back to back, so a request's time per output token is its steps plus the passes of the prompts that arrive
while it decodes.

    python bench/step_costs.py DIR --rows 128 --prompt 1024 --prompts 1,2,4,8 --profile 2 --out OUT

(DIR: bench/side_by_side.py prepare's folder.)

ROWS - max(K) rows decode (each holding a PROMPT-token sequence) while the K prompts go into the free rows; each
figure is the median of 5 timings (CUDA synchronised around each call). `--profile K`: the GPU kernels of a
prompt pass and of a mixed pass of K prompts, the costliest first. Random bf16 weights of the directory's
shape. Writes OUT/step_costs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native"), str(ROOT / "bench")]

from side_by_side import random_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--prompts", default="1,2,4,8")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import torch

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.limits import PAGE, pages_for
    from qwenhw_native.runtime import Filling, Runtime

    counts = [int(k) for k in args.prompts.split(",")]
    decoding = args.rows - max(counts)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = random_model(args.model, args.device, args.layers)
    max_len = args.prompt + 256
    rt = Runtime(model, max_len=max_len, device=args.device, batch=args.rows,
                 kernels=KernelConfig.resolve({"mixed": True}),
                 kv_tokens=args.rows * pages_for(max_len) * PAGE)
    rt.warm()
    g = torch.Generator().manual_seed(0)
    ids = lambda: torch.randint(1000, 150000, (args.prompt,), generator=g).tolist()  # noqa: E731
    tokens = torch.zeros(args.rows, dtype=torch.long, device=args.device)

    # the decoding rows: their prompts in (passes of up to the runtime's budget), then they decode
    filling = [Filling(r, ids()) for r in range(decoding)]
    for f in filling:
        rt.admit(f.row, max_len - 1)
    while filling:
        rt.fill(filling)
    sync()

    host: dict[int, list[float]] = {}  # per call: ms until it returned (the host's launches), before the sync

    def timed(call) -> float:
        sync()
        t0 = time.perf_counter()
        call()
        host.setdefault(id(call), []).append((time.perf_counter() - t0) * 1e3)
        sync()
        return (time.perf_counter() - t0) * 1e3

    def step() -> None:
        rt.decode(tokens)

    def joining(k: int, mixed: bool):
        """A pass of k prompts into the free rows (carrying the decode step's tokens where `mixed`)."""
        def call() -> None:
            rows = list(range(decoding, decoding + k))
            fill = [Filling(r, ids()) for r in rows]
            for r in rows:
                rt.admit(r, args.prompt + 1)
            if mixed:
                assert rt.fill_and_decode(fill, tokens)[2] or not rt.mixes, "the pass did not carry the step"
            else:
                rt.fill(fill)
            for r in rows:  # timed with the pass: the host's part of a row's admission and release is the server's too
                rt.release(r)
        return call

    def median(call) -> float:
        call()  # a first run compiles what this shape needs
        return statistics.median(timed(call) for _ in range(5))

    def returned(call) -> float:
        """Median ms until `call` returned in its timings: launch-bound where it is near the whole time."""
        return statistics.median(host[id(call)])

    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
              "rows_decoding": decoding, "prompt": args.prompt, "mixes": rt.mixes, "command": " ".join(sys.argv),
              "decode_step_ms": median(step), "passes": []}
    print(f"decode step, {decoding} rows: {result['decode_step_ms']:.2f} ms")
    print("| prompts | prompt pass ms | mixed pass ms | step + pass ms | mixed saves |")
    for k in counts:
        calls = joining(k, False), joining(k, True)
        alone, mixed = (median(c) for c in calls)
        both = result["decode_step_ms"] + alone
        result["passes"].append({"prompts": k, "pass_ms": alone, "mixed_ms": mixed, "step_and_pass_ms": both,
                                 "pass_returned_ms": returned(calls[0]), "mixed_returned_ms": returned(calls[1])})
        print(f"| {k} x {args.prompt} | {alone:.2f} | {mixed:.2f} | {both:.2f} | {both - mixed:+.2f} | "
              f"returned after {returned(calls[0]):.2f} / {returned(calls[1]):.2f} ms")
    if args.profile and cuda:
        from decode_rows import profile

        for label, mixed in (("prompt pass", False), ("mixed pass", True)):
            call = joining(args.profile, mixed)
            result[f"profile_{label.split()[0]}"] = top = profile(lambda n: [call() for _ in range(n)], 3)
            print(f"{label} of {args.profile} prompts beside {decoding} decoding rows, ms per pass:")
            for row in top:
                print(f"  {row['ms_per_step']:8.3f} {row['calls']:5d}x  {row['kernel']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_costs.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
