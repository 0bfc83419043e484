"""The planner against the engines it chooses between: every figure it predicts for the one-H200 benchmark
(bench/side_by_side.py, raw results in docs/results/h200_side_by_side) within its tolerance, and the engine
it picks for the workloads that matter is the one measured faster. Pure Python: no GPU, no engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import qwenhw

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "h200_side_by_side"
sys.path.insert(0, str(ROOT / "bench"))

import side_by_side  # noqa: E402

# The hybrid's CPU side ran ~35% slower on the first machine of the benchmark day than on the second (same
# kind, same code; docs/benchmarks.md): its rows from that machine are reported, not held to the tolerance.
# The static expert cache hits more on the random-weight model than uniform routing (the planner's
# assumption) gives: 27.2 tok/s against 22.6 planned.
# qwenhw's 64-row decode rows measured the MoE kernels as they were then (each program finding its own pairs);
# since 2026-12-07 a decode step sorts its pairs once per layer (Tiles.moe_index_pairs), 14% faster
# at 64 rows on an H100 (test_decode_past_the_slot_kernels_holds_on_an_h100), and the fit prices that path.
# Rerun bench/side_by_side.py on an H200 to replace them.
KNOWN = {"qwenhw hybrid, no expert cache, first machine (tok/s)", "qwenhw hybrid, static expert cache (tok/s)",
         "qwenhw decode, 64 seq (tok/s)", "qwenhw 24 layers decode, 64 seq (tok/s)"}


@pytest.fixture(scope="module")
def rows():
    return side_by_side.report_rows(str(RESULTS))


def test_every_predicted_figure_is_within_its_tolerance(rows):
    assert len(rows) >= 60  # decode, TTFT, memory, offload and whole-request rows of both engines
    off = [r for r in rows if abs(r["error"]) > r["tolerance"] and r["what"] not in KNOWN]
    assert not off, "\n".join(f"{r['what']}: {r['error']:+.1%} (> {r['tolerance']:.0%})" for r in off)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"decode", "ttft", "memory", "latency", "hybrid"}


def test_known_deviations_are_still_deviations(rows):
    """If a refit brings them in, move them out of KNOWN; if they vanish from the report, so must KNOWN."""
    present = {r["what"]: r for r in rows}
    assert KNOWN <= set(present)
    assert all(abs(present[k]["error"]) > present[k]["tolerance"] for k in KNOWN)


def test_the_choice_is_the_measured_faster_engine():
    picks = side_by_side.choices(str(RESULTS))
    assert len(picks) == 4
    for c in picks:
        assert c["chosen"] == c["faster"], c


def test_vllm_memory_is_what_vllm_reports(rows):
    """The KV pool vLLM sizes at start (its log: weights, graphs estimate, profile run) within 1%."""
    kv = [r for r in rows if r["what"].startswith("vLLM KV cache")]
    assert len(kv) == 2 and all(abs(r["error"]) < 0.01 for r in kv)


def test_figures_name_what_they_were_fitted_to():
    plan = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G", concurrency=16, prompt_tokens=2048)
    assert plan.estimate.basis and all("docs/results" in b or "benchmarks" in b for b in plan.estimate.basis)
    for c in plan.candidates:
        if c["fits"] and c["engine"] in ("vllm", "one-gpu"):
            assert c["estimate"]["basis"], c
    text = plan.explain()
    assert "fitted to:" in text and "first token" in text and "ms per output token" in text


def test_the_fits_are_reproduced_by_the_fit_script():
    """bench/fit_speed.py refits the one-GPU constants from the raw results: they are the planner's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fit_speed
    from qwenhw_native import speed as qwenhw_speed
    from qwenhw_vllm import speed as vllm_speed

    results = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    p, _ = fit_speed.fit_decode(fit_speed.decode_rows(results, "vllm"), vllm_speed.DECODE.bandwidth, None)
    assert p[0] == pytest.approx(vllm_speed.DECODE.step_s, rel=0.01)
    assert p[1] == pytest.approx(vllm_speed.DECODE.layer_s, rel=0.01)
    p, _ = fit_speed.fit_decode(fit_speed.decode_rows(results, "qwenhw"), qwenhw_speed.DECODE.bandwidth,
                                qwenhw_speed.DECODE.rows_fused)
    assert p[1] == pytest.approx(qwenhw_speed.DECODE.layer_s, rel=0.01)
    assert p[2] == pytest.approx(qwenhw_speed.DECODE.row_layer_s, rel=0.01)


# Measurements the fits never saw: qwenhw's engine through bench/multi_gpu.py's runtime loop (32-token
# prompts, 32 tokens, context 1024) on another H200 three days earlier, and vLLM 0.20 as the session that
# filed issue #20 measured it on an H200 the same day (its table: 236 / 1313 / 2119 tok/s).
HOLDOUT = [
    ("native", "multi_gpu_1xh200_final.json", 1, None),
    ("native", "multi_gpu_1xh200_final.json", 16, None),
    ("native", "multi_gpu_1xh200_batch32.json", 32, None),
    ("vllm", "issue #20", 1, 236.0),
    ("vllm", "issue #20", 16, 1313.0),
    ("vllm", "issue #20", 32, 2119.0),
]


@pytest.mark.parametrize("backend, source, batch, measured", HOLDOUT)
def test_decode_against_measurements_it_was_not_fitted_to(backend, source, batch, measured):
    if measured is None:
        rows = json.loads((ROOT / "docs" / "results" / source).read_text())["rows"]
        measured = next(r["tok_s"] for r in rows if r["config"] == "1 GPU, qwenhw fast path" and r["batch"] == batch)
    plan = qwenhw.plan("Qwen3-30B-A3B", hardware="1xH200-141G", backend=backend, concurrency=batch,
                       prompt_tokens=32, output_tokens=32, context=1024)
    assert plan.estimate.throughput_tok_s == pytest.approx(measured, rel=0.15)


def test_prompt_kernels_fit_holds_on_another_gpu():
    """The one-GPU prefill fit with the prompt kernels (the H200 fit scaled by an A/B on an H100) against that
    H100 run's time to first token, kernels on and off (2048-token prompts alone and 16 at once)."""
    from qwenhw.models import get as catalog

    side_by_side._register_plugins()
    folder = ROOT / "docs" / "results" / "serving_h100"
    for kernels in ("on", "off"):
        measured = json.loads((folder / f"prompt_kernels_{kernels}.json").read_text())
        assert measured["info"]["gpu"].startswith("NVIDIA H100")
        for r in measured["ttft"]:
            plan = qwenhw.plan(catalog(side_by_side.MODEL), hardware="1xH100-80G", backend="native", engine="one-gpu",
                               dtype="bf16", concurrency=r["rows"], prompt_tokens=r["prompt_tokens"], output_tokens=1,
                               context=4096)
            ttft = plan.estimate.ttft_s
            if kernels == "off":
                ttft += side_by_side._without_prompt_kernels(48, r["rows"], r["prompt_tokens"], "1xH100-80G")
            assert abs(ttft / r["engine_generate"]["s"] - 1) < side_by_side.TOLERANCE["ttft"], (kernels, r["rows"], ttft)


def test_decode_past_the_slot_kernels_holds_on_an_h100():
    """qwenhw decode at 64 and 128 rows on one H100 (bench/decode_rows.py), where a step's pairs are sorted once
    per layer for the MoE kernels (its per-row cost is fitted to this pair), against the one-GPU decode fit;
    and the run before, each MoE program finding its own pairs (64 rows) and grouped GEMMs (128), was slower by
    what the fit's earlier row cost said (2.67 us per layer and row past 16, 0.70 past 64)."""
    from qwenhw.models import get as catalog

    side_by_side._register_plugins()
    measured = json.loads((ROOT / "docs" / "results" / "serving_h100_paged" / "decode_rows.json").read_text())
    assert measured["info"]["gpu"].startswith("NVIDIA H100")
    got = {}
    for r in measured["rows"]:
        got[r["rows"], r["variant"]] = r["tok_s"]
        if r["variant"] != "indexed":  # the default (Tiles.moe_index_pairs)
            continue
        plan = qwenhw.plan(catalog(side_by_side.MODEL), hardware="1xH100-80G", backend="native", engine="one-gpu",
                           dtype="bf16", concurrency=r["rows"], prompt_tokens=side_by_side.PROMPT,
                           output_tokens=side_by_side.LONG, context=512)
        assert abs(plan.estimate.throughput_tok_s / r["tok_s"] - 1) < 0.05, (r["rows"], plan.estimate.throughput_tok_s)
    assert got[64, "indexed"] > 1.1 * got[64, "slots"] and got[128, "indexed"] > 1.1 * got[128, "slots"]


def test_decode_at_few_rows_on_an_h100_from_the_h200_fit():
    """1, 16 and 32 rows on one H100 (bench/decode_rows.py, 2026-12-07), a GPU the one-GPU fit never saw: the plan
    within the report's decode tolerance (it is 4-10% low), and a step's pairs sorted once (the default) no
    slower than each program finding its own at any of them."""
    from qwenhw.models import get as catalog

    side_by_side._register_plugins()
    measured = json.loads((ROOT / "docs" / "results" / "serving_h100_lazy" / "decode_rows.json").read_text())
    assert measured["info"]["gpu"].startswith("NVIDIA H100")
    got = {(r["rows"], r["variant"]): r["tok_s"] for r in measured["rows"]}
    for rows in (1, 16, 32):
        plan = qwenhw.plan(catalog(side_by_side.MODEL), hardware="1xH100-80G", backend="native", engine="one-gpu",
                           dtype="bf16", concurrency=rows, prompt_tokens=side_by_side.PROMPT,
                           output_tokens=side_by_side.LONG, context=512)
        error = plan.estimate.throughput_tok_s / got[rows, "indexed"] - 1
        assert abs(error) < side_by_side.TOLERANCE["decode"], (rows, error)
        assert got[rows, "indexed"] >= 0.99 * got[rows, "slots"], rows


@pytest.mark.parametrize("rows, folder", [(32, "serving_h100_vllm"), (64, "serving_h100_paged"),
                                          (72, "serving_h100_paged/concurrency72"), (128, "serving_h100_lazy")])
def test_the_native_serving_estimate_holds_under_vllms_client(rows, folder):
    """`qwenhw serve` planned for 32, 64, 72 and 128 rows on one H100 under `vllm bench serve` (bench/serving.py,
    128 requests of 1024 + 256 tokens at once), cases no fit saw: output tokens/s over the whole requests and the
    median time per output token within the tolerances of the one-GPU rows (they are within 8%). The TPOT a
    client measures holds the passes of the prompts that go in after a request's first token (half of them for
    the median request: 26.6 ms planned against 31.2 measured at 64 rows without them), and where the pages hold
    fewer than all (116 of 128) the rest go in as a second wave (2658 tok/s planned against 2184 without it)."""
    from qwenhw.models import get as catalog

    side_by_side._register_plugins()
    run = json.loads((ROOT / "docs" / "results" / folder / "qwenhw_rateinf.json").read_text())
    assert run["completed"] == 128 and run["max_concurrent_requests"] == 128
    plan = qwenhw.plan(catalog(side_by_side.MODEL), hardware="1xH100-80G", backend="native", engine="one-gpu",
                       dtype="bf16", concurrency=rows, prompt_tokens=1024, output_tokens=256, context=2048)
    assert abs(plan.estimate.total_tok_s / run["output_throughput"] - 1) < side_by_side.TOLERANCE["latency"]
    assert abs(plan.estimate.tpot_s * 1e3 / run["median_tpot_ms"] - 1) < side_by_side.TOLERANCE["decode"]


def test_vllms_serving_estimate_holds_under_its_own_client():
    """`vllm serve` (bf16 KV, as qwenhw serve --backend vllm plans it) under `vllm bench serve` with 128 requests
    of 1024 + 256 tokens at once on one H100 (docs/results/serving_h100_lazy), a case no fit saw: its pages hold
    100 such requests whole, ~111 as pages go to answers as they grow, the others wait; output tokens/s over all
    of them -8% (waves of 111 then 17) and time per output token +1%."""
    from qwenhw.models import get as catalog

    side_by_side._register_plugins()
    run = json.loads((ROOT / "docs" / "results" / "serving_h100_lazy" / "vllm_rateinf.json").read_text())
    assert run["completed"] == 128 and run["max_concurrent_requests"] == 128
    plan = qwenhw.plan(catalog(side_by_side.MODEL), hardware="1xH100-80G", backend="vllm", dtype="bf16",
                       kv_dtype="bf16", concurrency=128, prompt_tokens=1024, output_tokens=256, context=2048)
    assert plan.dtype == "bf16" and not plan.offload.cpu_gib
    assert any(r.startswith("KV pages for 100 of the 128 sequences of 1280 tokens at once per replica (~111")
               for r in plan.reasons)
    assert abs(plan.estimate.total_tok_s / run["output_throughput"] - 1) < side_by_side.TOLERANCE["latency"]
    assert abs(plan.estimate.tpot_s * 1e3 / run["median_tpot_ms"] - 1) < side_by_side.TOLERANCE["decode"]


def test_both_engines_on_one_h100_within_tolerance_and_in_the_measured_order():
    """Decode at 64 and 128 rows and time to first token for 2048-token prompts (alone and 16 at once), both
    engines on the same H100 (bench/side_by_side.py, bench/decode_rows.py; docs/results/serving_h100_async):
    vLLM's speed model was fitted on an H200 and this GPU none of its fits saw (decode +0.1% / +4%, TTFT +5% /
    -11%); qwenhw's TTFT fit came from another H100's A/B (+14% / -4%). Each within its tolerance, and for each
    figure the planner ranks the engines as they measured (vLLM decodes faster there, qwenhw answers sooner)."""
    from qwenhw.models import get as catalog

    side_by_side._register_plugins()
    folder = ROOT / "docs" / "results" / "serving_h100_async"
    vllm = json.loads((folder / "side_by_side_vllm.json").read_text())
    native = json.loads((folder / "side_by_side_qwenhw.json").read_text())
    rows = json.loads((folder / "decode_rows.json").read_text())
    assert all(r["info"]["gpu"].startswith("NVIDIA H100") for r in (vllm, native, rows))

    def plan(backend, **workload):
        engine = {"engine": "one-gpu"} if backend == "native" else {}
        return qwenhw.plan(catalog(side_by_side.MODEL), hardware="1xH100-80G", backend=backend, dtype="bf16",
                           **engine, **workload).estimate

    for r in vllm["decode"]:
        n = r["rows"]
        mine = next(x["tok_s"] for x in rows["rows"] if x["rows"] == n and x["variant"] == "slots")
        work = dict(concurrency=n, prompt_tokens=side_by_side.PROMPT, output_tokens=side_by_side.LONG, context=512)
        theirs, ours = plan("vllm", **work).throughput_tok_s, plan("native", **work).throughput_tok_s
        assert abs(theirs / r["tok_s"] - 1) < side_by_side.TOLERANCE["decode"], n
        assert (theirs > ours) == (r["tok_s"] > mine), n
    for r, q in zip(vllm["ttft"], native["ttft"]):
        assert (r["rows"], r["prompt_tokens"]) == (q["rows"], q["prompt_tokens"])
        work = dict(concurrency=r["rows"], prompt_tokens=r["prompt_tokens"], output_tokens=1, context=4096)
        theirs, ours = plan("vllm", **work).ttft_s, plan("native", **work).ttft_s
        measured_theirs, measured_ours = r["engine_generate"]["s"], q["engine_generate"]["s"]
        assert abs(theirs / measured_theirs - 1) < side_by_side.TOLERANCE["ttft"], r["rows"]
        assert abs(ours / measured_ours - 1) < side_by_side.TOLERANCE["ttft"], r["rows"]
        assert (theirs > ours) == (measured_theirs > measured_ours), r["rows"]
