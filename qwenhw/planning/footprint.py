"""What a model served through torch + transformers takes on a device, and the budgets plans fill. Pure.

Shared by the backends that run transformers' modules (offload, native) and, for the budgets, by all:
  device total = weights placed there + KV cache for context x concurrency + activation peak + runtime.
Checked against measurements: CPU RSS in the tests, GPU peaks in bench/ (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hardware.profile import GiB, HardwareProfile, Node
from ..models import memory as mm
from ..models.spec import ModelSpec
from .layout import CPU_TORCH_GEMV_EFFICIENCY, experts_touched
from .plan import Estimate, Request
from .precision import stored_dtype, with_weight_dtype
from .workload import Workload, estimate

GPU_UTILISATION = 0.92  # of each GPU's memory a plan fills: vLLM's default gpu_memory_utilization (0.20), ours too
RAM_HEADROOM = 0.85  # of the host's available RAM a plan fills: the OS and the page cache keep the rest
# CUDA context and cuBLAS workspaces outside torch's allocator (0.60 GiB measured, torch 2.11 on H100) plus the
# caching allocator's slack over a 2048-token prefill (0.18-0.44 GiB reserved beyond what it handed out)
CUDA_CONTEXT = 0.85 * GiB
NCCL_BUFFERS = 0.3 * GiB  # NCCL communicator buffers per rank
# Host memory on top of the weights, measured on the tiny checkpoint (plugins/offload/tests/test_offload_engine.py):
CPU_RUNTIME = 16 * 2**20  # first forward pass: oneDNN and allocator state
TOKENIZER = 118 * 2**20  # the Qwen2/Qwen3 fast tokenizer (151k vocabulary) in memory
# On GPUs the caching allocator reserves more than the tensors a prefill holds at once (their sizes change
# from layer to layer and freed blocks stay reserved). Measured on H200s, 16 prompts of 1023 tokens at TP=2:
# 3.27 GiB reserved for the 1.70 GiB activation_bytes counts (docs/benchmarks.md, "worst prefill").
CUDA_PREFILL_RESERVE = 1.92

# transformers' generate() on the CPU: torch GEMVs over the weights, Python and dispatch per layer
CPU_EFFICIENCY = CPU_TORCH_GEMV_EFFICIENCY
EAGER_LAYER_OVERHEAD = 1.2e-3  # generate(): Python + ~30 launches per layer, measured on an H100 host
CPU_COMPUTE_EFFICIENCY = 0.4  # of the CPU's estimated bf16 rate, for prompts on the CPU (not measured)
CPU_BASIS = ("transformers on the CPU: weights at 0.17 of the profile's RAM bandwidth (a 16-core Sapphire Rapids "
             "host, 2026-11-27) and 1.2 ms per layer of generate()'s overhead (an H100 host); prompts at 0.4 of "
             "the CPU's bf16 rate (not measured)",)


def usable_ram(node: Node) -> float:
    return (node.cpu.ram_available_bytes or node.cpu.ram_bytes) * RAM_HEADROOM


def ram_budget(node: Node, req: Request) -> float:
    """Host RAM a plan may fill: --cpu-memory-gib when given, else what the host has available, less headroom."""
    return req.cpu_memory_gib * GiB if req.cpu_memory_gib is not None else usable_ram(node)


def gpu_budget(memory_bytes: float, req: Request) -> float:
    cap = memory_bytes * GPU_UTILISATION
    return cap if req.gpu_memory_gib is None else min(cap, req.gpu_memory_gib * GiB)


def served_16bit(spec: ModelSpec, dtype: str) -> ModelSpec:
    """The model as torch modules hold it: quantized checkpoints are served dequantized, in bf16."""
    served = with_weight_dtype(spec, dtype)
    return with_weight_dtype(spec, "bf16") if served.quant.method is not None else served


def cpu_dtype(spec: ModelSpec, node: Node, requested: str | None) -> str:
    if requested not in (None, "auto"):
        return requested
    stored = stored_dtype(spec)
    if stored in ("bf16", "fp16") and not node.cpu.native_bf16:
        return "fp32"  # without AVX512-BF16/AMX, bf16 matmuls are emulated and slow
    return stored if stored in ("bf16", "fp16", "fp32") else "bf16"


def activation_bytes(spec: ModelSpec, context: int, concurrency: int, chunk: int,
                     pass_tokens: int | None = None) -> float:
    """Peak activation bytes of one forward pass over up to `chunk` prompt tokens per sequence (and at most
    `pass_tokens` in all, for an engine that cuts its passes there whatever the concurrency).

    Hidden states, q/k/v, the MLP or routed-expert intermediates, fp32 router logits and fp32 LM-head
    logits for the last position.
    """
    tokens = concurrency * min(context, chunk)
    if pass_tokens is not None:
        tokens = min(tokens, pass_tokens)
    h = spec.hidden_size
    attn = h + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim * 2
    if spec.moe:
        mlp = spec.moe.top_k * (h + 3 * spec.moe.moe_intermediate_size) + 2 * spec.moe.num_experts
    else:
        mlp = 3 * spec.intermediate_size
    logits = concurrency * spec.vocab_size * 4 * 2  # fp32 logits and their softmax
    return tokens * (4 * h + attn + mlp) * 2 + logits


def gpu_activation_bytes(spec: ModelSpec, context: int, concurrency: int, chunk: int,
                         pass_tokens: int | None = None) -> float:
    """What a GPU gives up for the activations of the largest prefill the plan allows."""
    return activation_bytes(spec, context, concurrency, chunk, pass_tokens) * CUDA_PREFILL_RESERVE


@dataclass(frozen=True)
class OneGpu:
    """The budget of a plan on the first GPU of a host (and its RAM), for a model in a 16-bit dtype."""

    node: Node
    gpu: Any
    served: ModelSpec  # the model with the weights in the dtype the plan runs
    dtype: str
    cap: float  # the GPU's budget
    kv: float  # KV cache for the plan's context and sequences
    act: float  # the activation peak of the largest prompt pass
    ram: float  # the host RAM budget


def one_gpu(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str,
            chunk: int, sequences: int | None = None, pass_tokens: int | None = None) -> OneGpu:
    """`sequences`: the KV cache's rows (the runtimes an engine builds), default the request's concurrency;
    `chunk`: the prompt tokens per sequence one pass holds activations for (`pass_tokens`: in all)."""
    node = hw.node
    gpu = (node.gpus("nvidia") or node.gpus("intel"))[0]
    served = served_16bit(spec, dtype)
    return OneGpu(node=node, gpu=gpu, served=served, dtype=stored_dtype(served),
                  cap=gpu_budget(gpu.memory_bytes, req),
                  kv=kv_bytes(served, context, req.concurrency if sequences is None else sequences, kv_dtype),
                  act=gpu_activation_bytes(served, context, req.concurrency, chunk, pass_tokens),
                  ram=ram_budget(node, req))


def kv_bytes(spec: ModelSpec, context: int, concurrency: int, kv_dtype: str) -> float:
    return (mm.kv_bytes_per_token(spec, kv_dtype) * context + mm.linear_state_bytes_per_seq(spec)) * concurrency


def context_fit(fixed: float, per_token: float, room: float, spec: ModelSpec, concurrency: int) -> int:
    """The longest context `concurrency` sequences get in `room` bytes once `fixed` ones are taken."""
    if per_token <= 0:
        return spec.max_position
    return max(0, min(spec.max_position, int((room - fixed) / (per_token * concurrency))))


def stream_bytes(spec: ModelSpec, batch: int) -> float:
    """Weight bytes one decode step of `batch` sequences reads: every non-expert weight, the LM head and the
    experts the batch's tokens touch."""
    wb = mm.weight_bytes_split(spec)
    head = wb.embeddings if spec.tie_embeddings else wb.embeddings / 2
    experts = experts_touched(spec, batch) * mm.expert_bytes(spec) * spec.num_moe_layers if spec.moe else 0.0
    return wb.non_expert + head + experts


def cpu_estimate(spec: ModelSpec, node: Node, w: Workload, disk_fraction: float = 0.0) -> Estimate:
    """transformers' generate() on the CPU: the weights streamed from RAM (and disk), or its compute."""
    bw = max(node.cpu.memory_bandwidth_gbs, 1.0) * 1e9 * CPU_EFFICIENCY
    stream = stream_bytes(spec, w.concurrency) + w.concurrency * w.kv_tokens * mm.kv_bytes_per_token(spec, "bf16")
    t = stream * (1 - disk_fraction) / bw + stream * disk_fraction / (node.disk.read_gbs * 1e9)
    rate = max(node.cpu.bf16_tflops, 0.05) * 1e12 * CPU_COMPUTE_EFFICIENCY
    t = max(t, 2 * spec.active_params() * w.concurrency / rate)
    t += spec.num_layers * EAGER_LAYER_OVERHEAD  # generate()'s Python and dispatch per layer, as on a GPU
    ttft = 2 * spec.active_params() * w.concurrency * w.prompt_tokens / rate + spec.num_layers * EAGER_LAYER_OVERHEAD
    bound = "disk reads" if disk_fraction > 0.05 else "host RAM bandwidth"
    return estimate(t, ttft, w, bound, CPU_BASIS)
