"""vLLM's speed on NVIDIA GPUs: the shared mechanisms (qwenhw.planning.speed) with constants fitted to vLLM.

Refit with `python bench/fit_speed.py docs/results/h200_side_by_side` after a new bench/side_by_side.py run.
"""

from __future__ import annotations

from qwenhw.planning.speed import DecodeFit, PrefillFit

# bench/side_by_side.py: vLLM 0.20.0 with its CUDA graphs and torch.compile, Qwen3-30B-A3B's shape at 48
# and 24 layers, random bf16 weights
MEASURED = "one H200, vLLM 0.20.0, 2026-12-04, docs/results/h200_side_by_side"

# Every row within 7.5% (1-64 sequences, both layer counts); the weights and KV read at 0.89 of the
# datasheet bandwidth (the same fraction as qwenhw's engine); per step 673 us outside the layers
# (scheduler, sampler, the engine core's round trip), 47.3 us per layer.
DECODE = DecodeFit(step_s=672.6e-6, layer_s=47.33e-6, bandwidth=0.89,
                   source=f"vLLM decode at 1-64 sequences ({MEASURED})")

# Chunked prefill in steps of max_num_batched_tokens; passes up to 512 tokens replay piecewise CUDA graphs
# (vLLM's capture sizes), longer ones pay 0.77 ms of launches per layer; 11.6 us per prompt token outside
# the layers, 2.9 ms per prompt; the matrix products at 0.54 of the bf16 peak. Rows within 20%
# (512-8192 tokens, alone and 16 at once, both layer counts).
PREFILL = PrefillFit(call_s=11.66e-3, pass_layer_s=0.7745e-3, token_s=11.61e-6, flops=0.543, prompt_s=2.866e-3,
                     graph_tokens=512, source=f"vLLM time to first token, 512-8192-token prompts ({MEASURED})")

# cpu_offload_gb: vLLM maps the offloaded weights into the GPU's address space (UVA) and its kernels read
# them in place, so only the bytes a step touches cross the host link: per token each offloaded layer's
# attention and router and the experts the tokens are routed to. They arrive at 0.91 of the pinned
# host-to-device copy rate: 11.3 tok/s measured with 42.6 GiB offloaded at a 20 GiB cap (same run).
UVA = 0.91
UVA_SOURCE = f"vLLM cpu_offload_gb=42 under a 20 GiB GPU cap ({MEASURED})"
# Prefill-sized batches run vLLM's tuned fused-MoE configs for the H200 with 128-row blocks: a touched
# expert's weights are read once per block of its tokens.
MOE_PREFILL_BLOCK = 128
