"""The decode projections alone on one GPU: cuBLAS against qwenhw's Triton decode GEMMs (kernels/linear.py).

    python bench/decode_linear.py --out results/

For each tensor-parallel share of Qwen3-30B-A3B's attention (TP = 1, 2, 4) and Qwen3-235B-A22B's at TP=4,
at 1 and 16 tokens:
  - q/k/v: F.linear + rope_cache.qk_rope_cache (what decode steps ran before) against linear.qkv_rope (the
    GEMM, the q/k norms, RoPE and the cache write in one kernel), over hidden-slice counts and warps;
  - o_proj + residual: addmm against linear.linear_residual, over slice counts and column tiles;
  - each with the weight prefetch as this GPU's tiles decide, never, or always (Tiles.linear_prefetch_bytes).
Each time is the median per call of many calls captured in one CUDA graph, consecutive calls reading
different weight copies (more bytes than L2 holds, as consecutive layers do). The kernels launch with PDL
where a decode step's would (Hopper and later, unless KernelConfig.pdl is off: QWENHW_PDL=0). With PDL,
consecutive calls of one kernel overlap a little (each prefetches its weights while the one before
finishes), so the decode step itself (bench/multi_gpu.py --linear-too) is what decides; this sweep picks
the shapes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native"), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

L2_BYTES = 60 * 2**20  # an H200's L2; the copies cycle through more than twice this


def graph_us(fns: list) -> float:
    """Median microseconds per call of `fns` (each called once, in turn), captured in one CUDA graph."""
    from multi_gpu import graph_time

    turn = itertools.cycle(fns)
    return graph_time(lambda: next(turn)(), calls=len(fns)) * 1e6


def measure(call, reps: list, ref: torch.Tensor, prefetch: str) -> dict:
    """{us, rel_err} of `call(weight)` against `ref` (the first copy's cuBLAS result), the weight prefetch
    as this GPU's tiles decide ("auto"), never ("off") or always ("on")."""
    from qwenhw_native.kernels import tiles

    changes = {"off": {"linear_prefetch": 0}, "on": {"linear_prefetch_bytes": float("inf")}}.get(prefetch, {})
    try:
        with tiles.override(ref.device, **changes):  # around the capture: the graph keeps the tiles it saw
            got = call(reps[0]).float()  # before the timed calls, which write into the same outputs
            err = float((got - ref.float()).norm() / ref.float().norm())
            return {"us": graph_us([lambda w=w: call(w) for w in reps]), "rel_err": err}
    except Exception as exc:  # a shape this GPU cannot compile
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def shapes() -> list[dict]:
    out = []
    for tp in (1, 2, 4):  # Qwen3-30B-A3B: hidden 2048, 32 query and 4 KV heads of 128
        out.append({"model": "30b", "tp": tp, "hidden": 2048, "heads": [32 // tp, 4 // tp, 4 // tp], "d": 128})
    out.append({"model": "235b", "tp": 4, "hidden": 4096, "heads": [16, 1, 1], "d": 128})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", default="1,16,64", help="rows; above 16 only the default shapes")
    ap.add_argument("--quick", action="store_true", help="default shapes only (no sweep)")
    args = ap.parse_args()

    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kernels import common, linear, rope_cache

    torch.manual_seed(0)
    dev = torch.device("cuda")
    # the kernels alone launch with PDL as a decode step's would (the user's QWENHW_PDL honoured)
    pdl = KernelConfig.resolve().pdl and common.pdl_supported(dev)
    rows = []
    for shape in shapes():
        hidden, heads, d = shape["hidden"], shape["heads"], shape["d"]
        hq, hk, _ = heads
        n_out = sum(heads) * d
        o_in = hq * d
        copies = max(2, 2 * L2_BYTES // (n_out * hidden * 2) + 1)
        w_qkv = [torch.randn(n_out, hidden, device=dev).mul_(0.02).bfloat16() for _ in range(copies)]
        w_o = [torch.randn(hidden, o_in, device=dev).mul_(0.02).bfloat16() for _ in range(copies)]
        qn, kn = Qwen3MoeRMSNorm(d).to(dev).bfloat16(), Qwen3MoeRMSNorm(d).to(dev).bfloat16()
        for tokens in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(tokens, hidden, device=dev).bfloat16()
            a = torch.randn(tokens, o_in, device=dev).bfloat16()
            h = torch.randn(tokens, hidden, device=dev).bfloat16()
            kc, vc = (torch.zeros(tokens, hk, 1024, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
            ang = torch.randn(1, 1, d // 2, device=dev)
            cos, sin = (torch.cat([f(ang), f(ang)], -1).bfloat16() for f in (torch.cos, torch.sin))
            pos = torch.tensor([100], device=dev)
            row = {**shape, "tokens": tokens, "copies": copies, "qkv_mb": n_out * hidden * 2 / 1e6,
                   "o_proj_mb": hidden * o_in * 2 / 1e6}

            def cublas_qkv(w):
                q, k, v = F.linear(x, w).view(tokens, 1, -1, d).split(heads, dim=2)
                return rope_cache.qk_rope_cache(q, k, v, qn, kn, cos, sin, pos, kc, vc, pdl=pdl)

            with torch.inference_mode():
                reps = [w_qkv[i % copies] for i in range(4 * copies)]
                row["qkv_cublas_us"] = graph_us([lambda w=w: cublas_qkv(w) for w in reps])
                ref = cublas_qkv(w_qkv[0])
                sweep = {}
                splits = [s for s in (1, 2, 4, 8, 16) if hidden % (s * 128) == 0]
                configs = [(None, None, "auto")] + ([] if args.quick or tokens > 16 else [
                    (s, (128, w, 3), p) for s in splits for w in (4, 8) for p in ("off", "on")])
                for split, block, prefetch in configs:
                    key = f"split={split or 'default'} tiles={block or 'default'} prefetch={prefetch}"

                    def call(w, split=split, block=block):
                        return linear.qkv_rope(x, w, None, heads, qn, kn, cos, sin, pos, kc, vc, slices=split,
                                               shape=block, pdl=pdl)
                    sweep[key] = measure(call, reps, ref, prefetch)
                row["qkv_triton"] = sweep
                row["qkv_default"] = sweep[next(iter(sweep))]

                reps = [w_o[i % copies] for i in range(4 * copies)]
                row["o_proj_cublas_us"] = graph_us([lambda w=w: h.addmm(a, w.t()) for w in reps])
                ref = h.addmm(a, w_o[0].t())
                sweep = {}
                splits = [s for s in (1, 2, 4, 8, 16) if o_in % (s * 128) == 0]
                configs = [(None, None, "auto")] + ([] if args.quick or tokens > 16 else [
                    (s, bn, p) for s in splits for bn in (32, 64) for p in ("off", "on")])
                for split, bn, prefetch in configs:
                    key = f"split={split or 'default'} bn={bn or 'default'} prefetch={prefetch}"
                    out = torch.empty_like(h)

                    def call(w, split=split, bn=bn, out=out):
                        return linear.linear_residual(a, w, h, out, slices=split, bn=bn, pdl=pdl)
                    sweep[key] = measure(call, reps, ref, prefetch)
                row["o_proj_triton"] = sweep
                row["o_proj_default"] = sweep[next(iter(sweep))]
            for kind in ("qkv", "o_proj"):
                timed = {k: v for k, v in row[f"{kind}_triton"].items() if "us" in v}
                best = min(timed, key=lambda k: timed[k]["us"])
                row[f"{kind}_best"] = {"config": best, **timed[best]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_triton")}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_linear.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "pdl": pdl, "rows": rows}, indent=2))
    print(f"{'shape':<18} {'tok':>3} {'qkv cuBLAS+rope':>15} {'default':>8} {'best':>8}  {'o_proj addmm':>12} "
          f"{'default':>8} {'best':>8}  best configs")
    for r in rows:
        print(f"{r['model']} TP={r['tp']:<11} {r['tokens']:>3} {r['qkv_cublas_us']:15.1f} "
              f"{r['qkv_default'].get('us', float('nan')):8.1f} {r['qkv_best']['us']:8.1f}  {r['o_proj_cublas_us']:12.1f} "
              f"{r['o_proj_default'].get('us', float('nan')):8.1f} {r['o_proj_best']['us']:8.1f}  "
              f"{r['qkv_best']['config']} | {r['o_proj_best']['config']}")


if __name__ == "__main__":
    main()
