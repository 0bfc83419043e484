"""Fit the planner's speed constants for vLLM and qwenhw's engine to bench/side_by_side.py's results.

    python bench/fit_speed.py docs/results/h200_side_by_side

Pure Python (numpy for the least squares); uses the planner's own mechanisms (qwenhw.planning.speed and the
byte counts of qwenhw.planning.layout), so what it fits is what the planner computes:
  decode   step_s + layers x layer_s + bytes / (datasheet bandwidth x efficiency)
           [+ layers x row_layer_s per row past the 16 rows qwenhw's fused projections take]
           one bandwidth efficiency for both engines (scanned), the rest by least squares on relative
           error over 1-64 sequences at 48 and 24 layers
  prefill  call_s + per pass (layers x pass_layer_s + tokens x token_s + tokens x layer FLOPs / (peak x
           flops)); attention at half the peak (the rows, up to 8192 tokens, cannot separate it)
It prints the constants and every row's error; the planner's copies live in
plugins/vllm/qwenhw_vllm/speed.py, plugins/native/qwenhw_native/speed.py and (prefill) TRANSFORMERS_PREFILL in
qwenhw/planning/speed.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import numpy as np  # noqa: E402

from qwenhw.models import get as catalog  # noqa: E402
from qwenhw.models import memory as mm  # noqa: E402
from qwenhw.planning import speed  # noqa: E402
from qwenhw.planning.layout import streamed_bytes  # noqa: E402
from qwenhw.planning.plan import Parallel  # noqa: E402

BANDWIDTH_GBS = 4800.0  # H200 datasheet
PEAK_TFLOPS = 989.0
DECODE_KV_TOKENS = 32 + (4 + 132) / 2  # the decode rows: 32-token prompts, 4 to 132 tokens generated
ROWS_FUSED = 16  # fused.LINEAR_MAX_TOKENS: past it the projections run in cuBLAS
GRAPH_TOKENS = {"vllm": 512}  # vLLM captures piecewise CUDA graphs up to 512 tokens (its capture sizes)


def spec_of(layers: int):
    return catalog("Qwen3-30B-A3B").with_(num_layers=layers)


def decode_rows(results: dict, engine: str) -> list[tuple[int, int, float]]:
    """(layers, rows, measured step seconds) of an engine's decode rows: the engine's own call."""
    out = []
    for layers, name in ((48, engine), (24, f"{engine}_24layers")):
        for r in results[name]["decode"]:  # qwenhw: through Engine.generate; vLLM: LLM.generate
            out.append((layers, r["rows"], r["rows"] / r["tok_s"]))
    return out


def step_bytes(layers: int, rows: int) -> float:
    spec = spec_of(layers)
    return streamed_bytes(spec, Parallel(), rows) + rows * DECODE_KV_TOKENS * mm.kv_bytes_per_token(spec, "bf16")


def fit_decode(rows: list, efficiency: float, rows_fused: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Least squares (relative) of step_s, layer_s [, row_layer_s] with the bandwidth fixed."""
    x, y, t = [], [], []
    for layers, n, step in rows:
        feats = [1.0, layers] + ([layers * max(0, n - rows_fused)] if rows_fused is not None else [])
        x.append(feats)
        y.append(step - step_bytes(layers, n) / (BANDWIDTH_GBS * 1e9 * efficiency))
        t.append(step)
    x, y, t = np.array(x), np.array(y), np.array(t)
    p, *_ = np.linalg.lstsq(x / t[:, None], y / t, rcond=None)
    return p, (x @ p + (t - y) - t) / t


def prefill_rows(results: dict, engine: str) -> list[tuple[int, int, int, float]]:
    key = "raw" if engine == "qwenhw" else "direct"
    out = []
    for layers, name in ((48, engine), (24, f"{engine}_24layers")):
        for r in results[name]["ttft"]:
            out.append((layers, r["rows"], r["prompt_tokens"], r[key]["s"]))
    return out


def passes(engine: str, prompts: int, tokens: int) -> list:
    if engine == "vllm":
        return speed.chunked_passes(prompts, tokens, 16384)  # the plan's max_num_batched_tokens on an H200
    return speed.row_passes(prompts, tokens, 2048)  # the runtime's prefill chunk


def fit_prefill(rows: list, engine: str, with_call: bool) -> tuple[np.ndarray, np.ndarray]:
    """Least squares (relative) of [call_s,] pass_layer_s, token_s and 1 / (peak x flops)."""
    x, y, t = [], [], []
    for layers, prompts, tokens, secs in rows:
        spec = spec_of(layers)
        ps = passes(engine, prompts, tokens)
        attn = speed.prefill(speed.PrefillFit(0, 0, 0, float("inf")), spec, PEAK_TFLOPS, ps)  # attention alone
        n_tok = sum(p.tokens for p in ps)
        eager = sum(1 for p in ps if p.tokens > GRAPH_TOKENS.get(engine, 0))  # the rest replay a captured graph
        feats = ([1.0] if with_call else []) + [eager * layers, n_tok, n_tok * speed.layer_flops(spec) * layers,
                                                prompts]
        x.append(feats)
        y.append(secs - attn)
        t.append(secs)
    x, y, t = np.array(x), np.array(y), np.array(t)
    p, *_ = np.linalg.lstsq(x / t[:, None], y / t, rcond=None)
    return p, (x @ p + (t - y) - t) / t


def main(folder: str) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in Path(folder).glob("*.json")}
    best = None
    for eff in np.arange(0.80, 0.96, 0.01):
        worst = max(abs(fit_decode(decode_rows(results, "vllm"), eff, None)[1]).max(),
                    abs(fit_decode(decode_rows(results, "qwenhw"), eff, ROWS_FUSED)[1]).max())
        if best is None or worst < best[1]:
            best = (round(float(eff), 2), worst)
    eff = best[0]
    print(f"decode: bandwidth efficiency {eff} of {BANDWIDTH_GBS:.0f} GB/s (worst row {best[1]:.1%})")
    for engine, fused in (("vllm", None), ("qwenhw", ROWS_FUSED)):
        p, err = fit_decode(decode_rows(results, engine), eff, fused)
        names = ["step_s", "layer_s"] + (["row_layer_s"] if fused is not None else [])
        print(f"  {engine}: " + ", ".join(f"{n} {v * 1e6:.2f} us" for n, v in zip(names, p)))
        print("    errors " + " ".join(f"{L}L/{n}:{e:+.1%}" for (L, n, _), e in zip(decode_rows(results, engine), err)))
    for engine, call in (("vllm", True), ("qwenhw", False)):
        rows = prefill_rows(results, engine)
        p, err = fit_prefill(rows, engine, call)
        values = dict(zip((["call_s"] if call else []) + ["pass_layer_s", "token_s", "per_flop", "prompt_s"], p))
        flops = 1 / (values.pop("per_flop") * PEAK_TFLOPS * 1e12)
        print(f"prefill {engine}: " + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in values.items())
              + f", flops {flops:.3f} of peak")
        print("    errors " + " ".join(f"{L}L/{n}x{tok}:{e:+.0%}" for (L, n, tok, _), e in zip(rows, err)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "results" / "h200_side_by_side"))
