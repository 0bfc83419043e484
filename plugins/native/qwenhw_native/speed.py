"""Speed of qwenhw's own engine: the shared mechanisms (qwenhw.planning.speed) with constants fitted to it.

Refit the one-GPU constants with `python bench/fit_speed.py docs/results/h200_side_by_side` after a new
bench/side_by_side.py run; the tensor-parallel ones come from bench/multi_gpu.py (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwenhw.planning.speed import TRANSFORMERS_PREFILL, DecodeFit

# bench/side_by_side.py: Engine.generate over CUDA graphs of the fused Triton decode kernels, Qwen3-30B-A3B's
# shape at 48 and 24 layers, random bf16 weights
MEASURED = "one H200, 2026-12-04, docs/results/h200_side_by_side"

# A GPU decoding alone (one GPU; each data-parallel replica): weights and KV at 0.89 of the datasheet
# bandwidth (the fraction vLLM reaches too), 123 us per step and 37.3 us per layer of kernel latency; past
# the 16 rows the fused projections take (kernels.linear.MAX_TOKENS) cuBLAS and separate kernels cost 2.7 us
# per layer and row. Every row within 5.2% (1-64 sequences, both layer counts). Past 32 rows a row costs 0.15 us
# per layer with a step's pairs sorted once for the routed experts' kernels: fitted to 64 and 128 rows on one
# H100, 2026-12-07 (bench/decode_rows.py, variant indexed, docs/results/serving_h100_paged/decode_rows.json;
# -1.8% and -0.7%). The 1-32 row constants predate sorting at every size (Tiles.moe_index_pairs = 0 since
# 2026-12-07), which on one H100 made 1 row 11% faster, 16 rows no faster and 32 rows 2%
# (docs/results/serving_h100_lazy/decode_rows.json): at one sequence the plan is ~10% low until an H200 rerun.
DECODE = DecodeFit(step_s=123.0e-6, layer_s=37.27e-6, bandwidth=0.89, row_layer_s=2.67e-6, rows_fused=16,
                   wide_row_layer_s=0.15e-6, rows_wide=32,
                   source=f"qwenhw decode at 1-64 sequences ({MEASURED}); past 32, one H100, 2026-12-07")

# Prompts: transformers' modules as this engine runs them (the fit lives with the mechanisms, since the
# offload backend's engines run the same modules); what tensor-parallel ranks and the hybrid are priced with
PREFILL = TRANSFORMERS_PREFILL

# One GPU with the prompt kernels (KernelConfig.prompt: q/k norms + RoPE + cache write in one kernel, the
# experts' element-wise work in two): the same mechanisms, the per-pass layer cost x0.71 (fewer launches) and
# the matrix throughput x1.33, the change each made in one A/B run (2048-token prompts alone and 16 at once,
# kernels off then on, one H100, 2026-12-07, docs/results/serving_h100/prompt_kernels_*.json), applied to the
# H200 fit above
PROMPT_KERNELS_PREFILL = dataclasses.replace(
    TRANSFORMERS_PREFILL, pass_layer_s=TRANSFORMERS_PREFILL.pass_layer_s * 0.708,
    flops=TRANSFORMERS_PREFILL.flops * 1.332,
    source="qwenhw time to first token with its prompt kernels (the H200 fit of 2026-12-04 scaled by an A/B on "
           "one H100, 2026-12-07, docs/results/serving_h100)")

# The MoE hybrid (routed experts in host RAM, computed by cpu_moe.c): the CPU streams a token's experts at
# 0.72 of the profile's RAM bandwidth (92 GB/s on a 16-core host estimated at 128), and a token pays 310 us
# per MoE layer for its attention graph, the router sync and the copies. Fitted on an H100 host
# (2026-11-28); one H200 host: 19.2 tok/s measured, 18.2 predicted (the first machine of the same day ran
# its CPU side ~35% slower: 12.5). Prompts ship every layer's experts to the GPU over pinned memory at 0.98
# of the host link (TTFT of 2048 tokens: 1.18 s measured).
HYBRID_LAYER_S = 310e-6
HYBRID_CPU_BANDWIDTH = 0.72
HYBRID_STREAM = 0.98
HYBRID_SOURCE = f"qwenhw hybrid under a 20 GiB GPU cap, 1 sequence ({MEASURED}; CPU constants from an H100 host)"

# Tensor parallel (one process per GPU, the all-reduce fused with the next RMSNorm): 46 us per layer besides
# the weight stream, fitted to 13 rows on 4x H200 before the Triton projections (docs/benchmarks.md,
# "Experts on every GPU", 2026-11-28); not re-measured since.
TP_DECODE = DecodeFit(step_s=0.0, layer_s=46e-6, bandwidth=0.92, source="qwenhw tensor parallel decode, 4x H200, "
                      "2026-11-28 (docs/benchmarks.md)")


@dataclass(frozen=True)
class ReduceFit:
    """Seconds one tensor-parallel all-reduce of a decode step's hidden states adds inside the engine's CUDA
    graphs over NVLink, beyond the per-layer cost (reducer.Reducer)."""

    apart_s: float  # the symmetric-memory one-shot kernel, the RMSNorm after it apart
    fused_s: float  # the sum and the next RMSNorm in one kernel (it replaces the norm's kernel) ...
    push_row_s: float  # ... plus this per row pushed to a peer (limits.fuses_reduce: up to how many)
    source: str

    def replace(self, **changes: float) -> "ReduceFit":
        return dataclasses.replace(self, **changes)


# 8.4 us apart (NCCL took 7-13); fused, 0.1 us per row pushed and nothing more (16 rows: 5.1 us on 2 H200s
# and 7.3 on 4 against 11.4 and 12.6 apart, which the per-layer fit already holds)
TP_REDUCE = ReduceFit(apart_s=8.4e-6, fused_s=0.0, push_row_s=0.1e-6,
                      source="bench/multi_gpu.py allreduce rows, 2x and 4x H200, 2026-11-28 (docs/benchmarks.md)")
