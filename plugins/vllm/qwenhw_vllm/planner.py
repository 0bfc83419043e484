"""Plans of the vllm backend: vLLM's layouts, rules and memory model, as plain arithmetic. Never imports vllm.

Memory per GPU, the way vLLM sizes it at start-up (v1 `Worker.determine_available_memory`):
    gpu_memory_utilization x capacity  =  weights (minus cpu_offload_gb)
                                        + activation peak of a profile run over max_num_batched_tokens
                                        + non-torch memory (CUDA context, cuBLAS, NCCL buffers) + CUDA graphs
                                        + KV cache pages (everything that is left)
and the KV pages must hold at least one max_model_len request (we ask for `concurrency` of them).
Rules that make vLLM refuse a layout at load time are checked here first, each with the reason users hit:
heads % TP, KV-head replication (TP > KV heads), the 128 block rule of block-FP8 checkpoints, expert counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qwenhw.hardware.profile import Accelerator, GiB, HardwareProfile
from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec
from qwenhw.planning import speed as mechanisms
from qwenhw.planning.footprint import GPU_UTILISATION, RAM_HEADROOM, usable_ram
from qwenhw.planning.layout import candidate_layouts, decode_step, experts_touched, head_rules, prefill_time, shard
from qwenhw.planning.plan import DeviceUse, Estimate, Offload, Parallel, Plan, Request
from qwenhw.planning.precision import stored_dtype, with_weight_dtype
from qwenhw.planning.workload import Workload, context_floor, default_context, estimate, in_waves, workload

from . import speed



def batch_limits(gpu: Accelerator) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) as vLLM's LLM class picks them for this GPU (arg_utils.py
    get_batch_defaults: 16384 / 1024 on GPUs of 70 GiB and more but A100s, else 8192 / 256). The plan sets
    them explicitly, so the activation peak it plans is the one vLLM profiles."""
    if gpu.memory_bytes >= 70 * GiB and "a100" not in gpu.name.lower():
        return 16384, 1024
    return 8192, 256
NON_TORCH = 0.6 * GiB  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator, counted by vLLM
# vLLM sizes its budget from the memory CUDA reports, which is NVML's total less what the driver keeps:
# 143771 MiB against 139.80 GiB on an H200 (docs/results/h200_side_by_side)
CUDA_RESERVED = 0.6 * GiB
COMM_BUFFERS = 0.25 * GiB  # NCCL + custom all-reduce buffers per rank when world > 1
# vLLM estimates its CUDA graphs' memory before it sizes the KV cache (0.20: "Estimated CUDA graph memory"):
# 0.64 GiB at 48 layers and 0.50 at 24 for its 51 capture sizes up to 512 (one H200, same run)
CUDA_GRAPHS = 0.36 * GiB
CUDA_GRAPHS_PER_LAYER = 5.8 * 2**20
# the profile run's activation peak over the formula's tensors (allocator rounding): with NON_TORCH and the
# graphs it makes the non-KV memory vLLM reported, 4.09 GiB at 48 layers and 3.93 at 24 (same run)
ACTIVATION_SLACK = 1.03
BLOCK_TOKENS = 16  # KV page size on CUDA
FP8_BLOCK = 128  # block-FP8 checkpoints (Qwen3-*-FP8) quantize in 128x128 tiles
# vLLM-CPU: one decode step costs this much beyond the weight stream (scheduler, sampler, ZMQ between the
# front end and the engine core). bench/vllm_overhead.py on the tiny model (whose weights stream in well under
# a millisecond), 2-core Xeon: 6.7 ms per step idle, 8.7-11.5 ms with other jobs running.
CPU_STEP_OVERHEAD_S = 0.007
CPU_EFFICIENCY = 0.6  # fraction of RAM bandwidth the CPU GEMV kernels reach (same figure as the offload backend)
CPU_COMPUTE_EFFICIENCY = 0.4  # of the CPU's estimated bf16 rate, for prompts (not measured)
CPU_BASIS = ("vLLM-CPU: per-step overhead from bench/vllm_overhead.py (tiny model, 2-core Xeon); weights at 0.6 of "
             "the profile's RAM bandwidth and prompts at 0.4 of its bf16 rate, neither measured",)
CPU_MAX_NUM_SEQS = 32
CPU_MAX_BATCHED_TOKENS = 4096  # vLLM-CPU's own default for the LLM class
# vLLM-CPU beyond weights and KV: three processes (front end with tokenizer ~0.8 GiB, engine core ~0.5, worker
# runtime ~0.5). Measured as the USS sum of the tiny model's processes: 3.0 GiB for 0.07 weights + 1 KV.
CPU_RUNTIME = 1.8 * GiB


# --- precision ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    served: ModelSpec  # the spec as it sits in GPU memory
    dtype: str  # the plan's weight dtype (bf16, fp16, fp8, int4 ...)
    quantization: str | None  # vLLM's `quantization` argument (None: unquantized or read from the checkpoint)
    torch_dtype: str  # vLLM's `dtype` argument: activations / unquantized tensors
    block_fp8: bool  # block-quantized FP8 checkpoint: the 128 rule applies to every TP split
    notes: tuple[str, ...] = ()
    error: str | None = None


def precision(spec: ModelSpec, gpu: Accelerator | None, req: Request) -> Precision:
    """Which weights vLLM will hold and how to ask for them. `gpu` None means vLLM's CPU platform."""
    stored = stored_dtype(spec)
    want = (req.dtype or "auto").lower()
    cc = float(gpu.compute_capability or 0) if gpu else 0.0
    act = "bfloat16" if (gpu is None or cc >= 8.0 or not gpu.compute_capability) else "float16"
    if gpu is not None and act == "float16":
        notes = (f"{gpu.name} (sm {gpu.compute_capability}) has no bf16 units: activations in fp16",)
    else:
        notes = ()

    def bad(why: str) -> Precision:
        return Precision(spec, stored, None, act, False, notes, why)

    q = spec.quant.method
    if q is not None:  # quantized checkpoint: vLLM serves it as stored, reading quantization_config
        if want not in ("auto", stored):
            return bad(f"vLLM serves the {q.upper()} checkpoint as stored; it cannot turn it into {want}. "
                       f"Use the bf16 repository ({spec.name.split('-' + q.upper())[0]}) for {want}")
        if gpu is None:
            return bad(f"vLLM's CPU platform has no {q.upper()} kernels for this model; use the bf16 checkpoint")
        if q == "fp8":
            if cc and cc < 8.0:
                return bad(f"{gpu.name} (sm {gpu.compute_capability}) cannot run FP8 checkpoints (needs sm 8.0+)")
            if not gpu.fp8:
                notes += (f"{gpu.name} has no fp8 tensor cores: vLLM runs the FP8 weights through Marlin "
                          f"(weight-only, W8A16), memory halves but compute stays bf16",)
            return Precision(spec, "fp8", "fp8", act, spec.quant.group_size == FP8_BLOCK, notes)
        # AWQ/GPTQ: leave `quantization` unset so vLLM picks its fastest kernel (awq_marlin / gptq_marlin)
        notes += (f"{q.upper()} int{spec.quant.bits} checkpoint: vLLM reads quantization_config and picks the "
                  f"Marlin kernel ({q}_marlin) itself",)
        return Precision(spec, stored, None, "float16" if spec.dtype == "fp16" else act, False, notes)
    if want in ("auto", stored):
        dt = stored if gpu is None or act == "bfloat16" else "fp16"
        return Precision(with_weight_dtype(spec, dt), dt, None, "bfloat16" if dt == "bf16" else
                         {"fp16": "float16", "fp32": "float32"}.get(dt, act), False, notes)
    if want in ("bf16", "fp16", "fp32"):
        torch_dt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[want]
        return Precision(with_weight_dtype(spec, want), want, None, torch_dt, False, notes)
    if want == "fp8":
        if gpu is None:
            return bad("vLLM's CPU platform has no fp8 weights; run bf16 on the CPU")
        if cc and cc < 8.0:
            return bad(f"online fp8 needs sm 8.0+ ({gpu.name} is sm {gpu.compute_capability})")
        note = ("weights quantized to fp8 at load time (--quantization fp8, per-tensor scales): half the memory "
                + ("" if gpu.fp8 else f"; {gpu.name} has no fp8 tensor cores, so Marlin runs them weight-only"))
        # online fp8 is per-tensor, not 128-blocked: the block rule does not apply
        return Precision(with_weight_dtype(spec, "fp8"), "fp8", "fp8", act, False, notes + (note,))
    return bad(f"vLLM quantizes online only to fp8; for {want} serve a pre-quantized checkpoint "
               f"(AWQ / GPTQ-Int4 repositories, e.g. {spec.name}-GPTQ-Int4 where Qwen publishes one)")


# --- rules ---------------------------------------------------------------------------------------------
def layout_rules(spec: ModelSpec, layout: Parallel, prec: Precision) -> str | None:
    """Why vLLM refuses this layout at load time, or None."""
    tp = layout.tp
    why = head_rules(spec, tp)
    if why:
        return f"vLLM needs attention heads % TP == 0: {why}"
    kv = spec.num_kv_heads
    if tp > kv and tp % kv:
        return f"TP={tp} is neither a divisor nor a multiple of the {kv} KV heads (vLLM needs one or the other)"
    la = spec.linear_attention
    if la is not None and (la.num_key_heads % tp or la.num_value_heads % tp):
        return (f"the linear-attention layers have {la.num_key_heads} key / {la.num_value_heads} value heads, "
                f"not divisible by TP={tp}")
    if layout.pp > spec.num_layers:
        return f"PP={layout.pp} exceeds the {spec.num_layers} layers"
    m = spec.moe
    if m is not None and layout.ep > 1 and m.num_experts % layout.ep:
        return f"{m.num_experts} experts do not split evenly over EP={layout.ep}"
    if prec.block_fp8 and tp > 1:
        for what, size in fp8_split_dims(spec, layout):
            if (size / tp) % FP8_BLOCK:
                fix = ("enable expert parallel (experts stay whole, EP = TP x DP) or use TP <= "
                       f"{max_tp_for_block(size)}" if what.startswith("expert") else
                       f"use TP <= {max_tp_for_block(size)}")
                return (f"block-FP8 rule: {what} {size} / TP={tp} = {size / tp:g} is not a multiple of "
                        f"{FP8_BLOCK} (vLLM: 'not divisible by weight quantization block_n = {FP8_BLOCK}'); {fix}")
    return None


def fp8_split_dims(spec: ModelSpec, layout: Parallel) -> list[tuple[str, int]]:
    """Dimensions TP splits that a 128x128 FP8 block must divide (those that EP keeps whole are left out)."""
    dims = [("attention q/o size", spec.num_heads * spec.head_dim)]
    if spec.num_kv_heads >= layout.tp:
        dims.append(("k/v size", spec.num_kv_heads * spec.head_dim))
    m = spec.moe
    dense_layers = spec.num_layers - spec.num_moe_layers
    if m is None or dense_layers:
        dims.append(("intermediate_size", spec.intermediate_size))
    if m is not None:
        if layout.ep <= 1:
            dims.append(("expert moe_intermediate_size", m.moe_intermediate_size))
        if m.shared_expert_intermediate_size:
            dims.append(("shared_expert_intermediate_size", m.shared_expert_intermediate_size))
    return dims


def max_tp_for_block(size: int) -> int:
    tp = 1
    while (size / (tp * 2)) % FP8_BLOCK == 0 and tp < 64:
        tp *= 2
    return tp


def int4_kernel_warning(spec: ModelSpec, layout: Parallel, prec: Precision) -> str | None:
    """AWQ/GPTQ MoE: Marlin needs moe_intermediate_size / TP % 128; otherwise vLLM falls back (slower)."""
    m = spec.moe
    if spec.quant.method not in ("awq", "gptq") or m is None or layout.ep > 1 or layout.tp == 1:
        return None
    part = m.moe_intermediate_size / layout.tp
    if part % max(64, spec.quant.group_size):
        return (f"expert slice {part:g} (moe_intermediate_size / TP={layout.tp}) is not a multiple of "
                f"{max(64, spec.quant.group_size)}: vLLM leaves the Marlin MoE kernel for the slower moe_wna16 path; "
                f"expert parallel avoids it")
    return None


def kv_waste_warning(spec: ModelSpec, layout: Parallel, kv_dtype: str) -> str | None:
    kv, tp = spec.num_kv_heads, layout.tp
    if tp <= kv:
        return None
    copies = tp // kv
    per_rank = mm.kv_bytes_per_token(spec, kv_dtype) / kv / layout.pp
    return (f"KV waste: TP={tp} > {kv} KV heads, so each rank holds one whole KV head and every head is stored "
            f"{copies}x ({per_rank / 1024:.0f} KiB per token per GPU instead of {per_rank / copies / 1024:.0f}; "
            f"{(1 - 1 / copies):.0%} of the KV cache holds duplicates). For long contexts prefer TP <= {kv} with "
            f"{'expert parallel / ' if spec.is_moe else ''}PP or DP")


# --- memory ---------------------------------------------------------------------------------------------
def activation_bytes(spec: ModelSpec, layout: Parallel, tokens: int, max_num_seqs: int, act_bytes: float = 2.0) -> float:
    """Peak of vLLM's profile run: one forward over `tokens` tokens plus a sampler pass over max_num_seqs rows.

    Live at the peak: residual + hidden + norm outputs, q/k/v and attention output, the fused-MoE
    intermediate caches (tokens x top_k x (2 x inter, inter, hidden)) or the dense MLP, fp32 router logits,
    and fp32 logits + probabilities for the sampler; ACTIVATION_SLACK for allocator rounding.
    """
    tp = layout.tp
    h = spec.hidden_size
    q = spec.num_heads * spec.head_dim * (2 if spec.attn_output_gate else 1) / tp
    kv = 2 * max(1, spec.num_kv_heads // tp) * spec.head_dim
    attn = q + kv + spec.num_heads * spec.head_dim / tp
    m = spec.moe
    if m is not None:
        inter = m.moe_intermediate_size / (1 if layout.ep > 1 else tp)
        mlp = m.top_k * (3 * inter + h) + 3 * m.shared_expert_intermediate_size / tp
        router = m.num_experts * 4 / act_bytes
    else:
        mlp, router = 3 * spec.intermediate_size / tp, 0.0
    per_token = (4 * h + attn + mlp + router) * act_bytes
    logits = max_num_seqs * spec.vocab_size / tp * 4 * 2
    return ACTIVATION_SLACK * (tokens * per_token + logits)


def per_gpu_overhead(spec: ModelSpec, layout: Parallel, cuda_graphs: bool = True) -> float:
    graphs = CUDA_GRAPHS + CUDA_GRAPHS_PER_LAYER * spec.num_layers / layout.pp if cuda_graphs else 0.0
    return NON_TORCH + (COMM_BUFFERS if layout.world > 1 or layout.ep > 1 else 0.0) + graphs


def kv_need(spec: ModelSpec, layout: Parallel, kv_dtype: str, context: int, seqs: int,
            reach: int | None = None) -> float:
    """KV pages (and Qwen3-Next recurrent state) one rank needs for `seqs` sequences of `context` tokens, or
    (`reach`: the most tokens one of the workload's requests holds, prompt + answer) for `seqs` sequences of
    that many: vLLM hands a sequence pages as it grows, so one short of max_model_len holds only what it
    uses; it still needs one whole `context` sequence's pages to start."""
    sh = shard(spec, layout, kv_dtype)

    def one(tokens: int) -> float:
        return math.ceil(tokens / BLOCK_TOKENS) * BLOCK_TOKENS * sh.kv_per_token + sh.state_per_seq

    if reach is None:
        return seqs * one(context)
    return max(one(context), seqs * one(min(reach, context)))


def fitting_context(spec: ModelSpec, layout: Parallel, kv_dtype: str, pool: float, seqs: int,
                    reach: int | None = None) -> int:
    """The longest context whose KV pages `pool` holds: `seqs` sequences of it, or (`reach`, as `kv_need`) one
    of it beside `seqs` requests of `reach` tokens when those fit (else `seqs` of it, as short as it takes)."""
    sh = shard(spec, layout, kv_dtype)
    if sh.kv_per_token <= 0:
        return spec.max_position
    each = pool / seqs
    if reach is not None and kv_need(spec, layout, kv_dtype, reach, seqs, reach) <= pool:
        each = pool
    tokens = int((each - sh.state_per_seq) / sh.kv_per_token) // BLOCK_TOKENS * BLOCK_TOKENS
    return max(0, min(spec.max_position, tokens))


# --- plans ------------------------------------------------------------------------------------------------
def plans(spec: ModelSpec, hw: HardwareProfile, req: Request, cpu_allowed: bool, cpu_gate_reason: str) -> list[Plan]:
    gpus = [a for a in hw.accelerators if a.vendor == "nvidia"]
    if gpus:
        return gpu_plans(spec, hw, req)
    if cpu_allowed:
        return [cpu_plan(spec, hw, req)]
    return [_unfit(spec, hw, req, "vllm-cpu", cpu_gate_reason)]


def gpu_plans(spec: ModelSpec, hw: HardwareProfile, req: Request) -> list[Plan]:
    node = hw.node
    gpu = next(a for a in node.accelerators if a.vendor == "nvidia")
    prec = precision(spec, gpu, req)
    if prec.error:
        return [_unfit(spec, hw, req, "vllm", prec.error)]
    kv_choice = (req.kv_dtype or "auto").lower()
    if kv_choice == "fp8" and not gpu.fp8:
        return [_unfit(spec, hw, req, "vllm", f"--kv-dtype fp8 needs fp8 support (Ada/Hopper); {gpu.name} has none")]
    out = _layout_plans(spec, prec, hw, gpu, req)
    on_gpus = any(p.fits and not p.offload.cpu_gib for p in out)
    if not on_gpus and (req.dtype or "auto") == "auto" and spec.quant.method is None and gpu.fp8:
        # the weights do not fit the GPUs as stored: vLLM's online fp8 halves them (lossy, so a candidate the
        # reasons name, not a silent choice; --dtype bf16 insists)
        fp8 = precision(spec, gpu, Request(**{**req.to_dict(), "dtype": "fp8"}))
        if not fp8.error:
            note = (f"weights quantized to fp8 at load (lossy) because {prec.dtype} does not fit the GPUs without "
                    f"offloading; pass --dtype {prec.dtype} to insist")
            out += [p.replace(reasons=p.reasons + (note,), config={**p.config, "quantized_at_load": True})
                    if p.fits else p for p in _layout_plans(spec, fp8, hw, gpu, req)]
    return out


def _layout_plans(spec: ModelSpec, prec: Precision, hw: HardwareProfile, gpu: Accelerator, req: Request) -> list[Plan]:
    out: list[Plan] = []
    for layout in candidate_layouts(prec.served, hw):
        if nodes_used(hw, layout) > 1 and layout.dp > 1:
            continue  # across nodes we plan PP over Ray; multi-node DP needs one launch per node
        out.append(layout_plan(spec, prec, hw, gpu, layout, req))
    return out


def nodes_used(hw: HardwareProfile, layout: Parallel) -> int:
    return max(1, math.ceil(layout.world / max(1, len(hw.node.accelerators))))


def _budget(gpu: Accelerator, req: Request) -> tuple[float, float]:
    """(gpu_memory_utilization, bytes it allows) for one GPU."""
    visible = gpu.memory_bytes - CUDA_RESERVED
    util = GPU_UTILISATION
    if req.gpu_memory_gib is not None:
        util = min(util, req.gpu_memory_gib * GiB / visible)
    util = math.floor(util * 1000) / 1000  # vLLM takes a fraction; never round above the budget asked for
    return util, util * visible


def layout_plan(spec: ModelSpec, prec: Precision, hw: HardwareProfile, gpu: Accelerator, layout: Parallel,
                req: Request) -> Plan:
    served = prec.served
    node = hw.node
    nodes = nodes_used(hw, layout)
    util, budget = _budget(gpu, req)
    seqs = max(1, math.ceil(req.concurrency / layout.dp))  # sequences one DP replica holds
    batched_tokens, default_seqs = batch_limits(gpu)
    max_num_seqs = max(default_seqs, seqs)
    weights = shard(served, layout).weights
    act = activation_bytes(served, layout, batched_tokens, max_num_seqs)
    overhead = act + per_gpu_overhead(served, layout)
    pool = budget - weights - overhead  # what vLLM hands the KV cache
    warnings: list[str] = []
    reasons: list[str] = []
    rule = layout_rules(served, layout, prec)

    # KV dtype and context: the request first; when it is open, shrink the context before touching precision
    # "auto" in the request = let the planner choose; an explicit bf16/fp16 = the model's dtype (vLLM's "auto")
    want_kv = (req.kv_dtype or "auto").lower()
    kv_options = ["fp8"] if want_kv == "fp8" else ["auto"] + (["fp8"] if gpu.fp8 and want_kv == "auto" else [])
    w = workload(req)
    reach = w.prompt_tokens + w.output_tokens  # the most KV pages one request of the workload holds
    context = req.context or default_context(served.max_position, w)
    chosen = None
    for kv_dtype in kv_options:
        need = kv_need(served, layout, _kv_bytes_dtype(kv_dtype, served), context, seqs, reach)
        if pool >= need:
            chosen = (kv_dtype, context)
            break
        if req.context is None:
            fit = fitting_context(served, layout, _kv_bytes_dtype(kv_dtype, served), pool, seqs, reach) // 1024 * 1024
            if fit >= context_floor(served.max_position, w):
                chosen = (kv_dtype, fit)
                many = f"{seqs} sequence{'s' if seqs > 1 else ''}"
                held = (f"the longest one sequence's KV pages fit ({many} of {reach} tokens fit them too)"
                        if kv_need(served, layout, _kv_bytes_dtype(kv_dtype, served), reach, seqs, reach) <= pool
                        else f"the largest that leaves KV pages for {many} of that length")
                reasons.append(f"max_model_len {fit} (not {context}): {held} per replica; pass --context to insist")
                break
    if chosen and chosen[0] == "fp8" and "auto" in kv_options:
        reasons.append(f"fp8 KV cache (kv_cache_dtype=fp8): halves KV bytes so context {chosen[1]} fits "
                       f"({gpu.name} has fp8 support)")
    held = running = seqs  # the workload's sequences one replica's KV pages hold whole / run at once on average
    if chosen is None:
        # vLLM's scheduler queues the requests its pages cannot hold (and preempts the newest as answers grow):
        # a pool with room for one whole context serves the workload, the others waiting their turn. Pages go to
        # a sequence as it grows, so on average one holds its prompt and half its answer
        kvb = _kv_bytes_dtype(kv_options[0], served)
        each = kv_need(served, layout, kvb, min(reach, context), 1)
        if each > 0 and pool >= kv_need(served, layout, kvb, context, 1, reach):
            held = max(1, min(seqs, int(pool // each)))
            running = max(held, min(seqs, int(pool // kv_need(served, layout, kvb, int(w.kv_tokens), 1))))
            chosen = (kv_options[0], context)
            reasons.append(f"KV pages for {held} of the {seqs} sequences of {min(reach, context)} tokens at once per "
                           f"replica (~{running} with pages handed out as answers grow): vLLM's scheduler keeps "
                           f"the others waiting and preempts the newest when pages run out; throughput counts them "
                           f"as later waves")
    if chosen is None and req.context is None:
        # not even the shortest context keeps the weights on the GPU: plan that one, so the least crosses PCIe
        floor = context_floor(served.max_position, w)
        if floor < context:
            long_need = kv_need(served, layout, _kv_bytes_dtype(kv_options[0], served), context, seqs, reach)
            reasons.append(f"max_model_len {floor} (not {context}): no context keeps the weights on the GPU, and "
                           f"the shortest offloads the least ({long_need / GiB:.1f} GiB more KV pages at {context} "
                           f"tokens would move as many weights to host RAM); pass --context to insist")
            context = floor
    kv_dtype, context = chosen or (kv_options[0], context)
    kvb = _kv_bytes_dtype(kv_dtype, served)
    need = kv_need(served, layout, kvb, context, held, reach)
    shortfall = weights + overhead + need - budget
    offload_per_gpu = 0.0
    if chosen is None and shortfall > 0 and not rule:
        gpus_per_node = min(layout.world, len(node.accelerators))
        ram = usable_ram(node)
        if req.cpu_memory_gib is not None:
            ram = min(ram, req.cpu_memory_gib * GiB)
        off = math.ceil(shortfall / GiB * 2) / 2 * GiB  # vLLM takes GiB; round up to half a GiB
        possible = off < weights * 0.95 and off * gpus_per_node <= ram
        if req.allow_offload and possible:
            offload_per_gpu = off
            layers = _offloaded(served, layout, off)
            warnings.append(f"cpu_offload_gb={off / GiB:g} per GPU ({off * layout.world / GiB:.0f} GiB of weights in "
                            f"pinned host RAM, {layers.layers:.0f} layers' worth): vLLM's kernels read them in place "
                            f"over PCIe ({node.host_to_device_gbs:.0f} GB/s), "
                            f"{layers.touched(1) / 1e9:.1f} GB per token at one sequence, so decode is far "
                            f"slower than all-GPU")
        else:
            advice = _fit_advice(spec, served, prec, layout, weights, shortfall, off, gpus_per_node, ram, gpu)
            rule = (f"per GPU: weights {weights / GiB:.1f} GiB + activations/overhead {overhead / GiB:.1f} GiB + KV "
                    f"{need / GiB:.1f} GiB ({seqs} x {min(reach, context)} tokens) exceed {budget / GiB:.1f} GiB "
                    f"({util:g} x {gpu.memory_bytes / GiB:.1f} GiB) by {shortfall / GiB:.1f} GiB; {advice}")
    fits = rule is None
    if not fits:
        reasons.insert(0, rule)
    w_gpu = weights - offload_per_gpu
    kv_pool = max(budget - w_gpu - overhead, need) if fits else need
    max_context = fitting_context(served, layout, kvb, budget - w_gpu - overhead, seqs, reach) if fits else 0
    for note in (kv_waste_warning(served, layout, kvb), int4_kernel_warning(served, layout, prec)):
        if note:
            warnings.append(note)
    if layout.dp > 1:
        warnings.append(f"data parallel ({layout.dp} replicas) runs as `vllm serve --data-parallel-size "
                        f"{layout.dp}` (see artifacts); qwenhw.load runs one replica in this process")
    est = in_waves(lambda n: _estimate(served, layout, gpu, hw, replace(w, concurrency=n), kvb, offload_per_gpu,
                                       batched_tokens), min(running * layout.dp, w.concurrency), w)
    if fits:
        reasons.append(_explain(spec, prec, hw, gpu, layout, w_gpu, kv_pool, kvb, context))
        reasons += list(prec.notes)
    devices = _devices(hw, layout, budget, w_gpu, kv_pool, overhead)
    if offload_per_gpu:
        devices.append(DeviceUse("cpu", "cpu", (node.cpu.ram_bytes * RAM_HEADROOM) / GiB,
                                 offload_per_gpu * min(layout.world, len(node.accelerators)) / GiB))
    engine_args = {
        "model": None,  # filled with the checkpoint path at load / artifact time
        "tensor_parallel_size": layout.tp,
        "pipeline_parallel_size": layout.pp,
        "data_parallel_size": layout.dp,
        "enable_expert_parallel": layout.ep > 1,
        "gpu_memory_utilization": util,
        "max_model_len": context,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": batched_tokens,
        "kv_cache_dtype": "fp8" if kv_dtype == "fp8" else "auto",
        "cpu_offload_gb": round(offload_per_gpu / GiB, 1),
        "quantization": prec.quantization,
        "dtype": prec.torch_dtype,
        "distributed_executor_backend": "ray" if nodes > 1 else ("mp" if layout.world > 1 else None),
        "load_format": "dummy" if req.load_format == "dummy" else None,
        "enable_prefix_caching": None if req.prefix_caching else False,  # None: vLLM's default (on)
    }
    return Plan(
        model=spec.name, backend="vllm", engine="vllm", fits=fits, parallel=layout, devices=tuple(devices),
        offload=Offload(cpu_gib=offload_per_gpu * layout.world / GiB), context=context, max_context=max_context,
        concurrency=req.concurrency, dtype=prec.dtype, kv_dtype=kvb,
        estimate=est if fits else Estimate(), reasons=tuple(reasons), warnings=tuple(warnings),
        config={"engine_args": engine_args, "env": gpu_env(hw, layout, gpu), "platform": "cuda",
                "nodes": [n.hostname for n in hw.nodes][:nodes],
                "gpus_per_node": min(layout.world, len(node.accelerators))},
    )


def _auto_kv(spec: ModelSpec) -> str:
    return spec.dtype if spec.dtype in ("bf16", "fp16", "fp32") else "bf16"


def _kv_bytes_dtype(kv_dtype: str, spec: ModelSpec) -> str:
    return _auto_kv(spec) if kv_dtype == "auto" else kv_dtype


def _fit_advice(spec, served, prec, layout, weights, shortfall, off, gpus_per_node, ram, gpu) -> str:
    out = []
    if spec.quant.method is None and prec.dtype in ("bf16", "fp16"):
        fp8_w = weights / 2
        if weights - fp8_w > shortfall:
            out.append(f"fp8 weights (--dtype fp8 or the -FP8 checkpoint) need about {fp8_w / GiB:.0f} GiB per GPU "
                       f"and fit")
    if off < weights * 0.95 and off * gpus_per_node <= ram:
        out.append(f"cpu_offload_gb={off / GiB:g} per GPU would fit (slow: weights cross PCIe every step)")
    elif off * gpus_per_node > ram:
        out.append(f"offloading {off / GiB:.0f} GiB per GPU needs {off * gpus_per_node / GiB:.0f} GiB of host RAM "
                   f"(budget {ram / GiB:.0f})")
    out.append("spread it over more GPUs (higher TP/PP)")
    return "what would fit: " + "; ".join(out[:-1]) + ("; or " if len(out) > 1 else "") + out[-1]


def _devices(hw: HardwareProfile, layout: Parallel, budget: float, weights: float, kv: float,
             overhead: float) -> list[DeviceUse]:
    out = []
    per_node = len(hw.node.accelerators)
    for rank in range(layout.world):
        n, i = divmod(rank, per_node)
        if n >= len(hw.nodes):
            break
        acc = hw.nodes[n].accelerators[i]
        dev_id = acc.device_id if len(hw.nodes) == 1 else f"{hw.nodes[n].hostname}/{acc.device_id}"
        out.append(DeviceUse(dev_id, "nvidia-gpu", budget / GiB, weights / GiB, kv / GiB, overhead / GiB))
    return out


def _estimate(spec: ModelSpec, layout: Parallel, gpu: Accelerator, hw: HardwareProfile, w: Workload,
              kv_dtype: str, offload: float, batched_tokens: int) -> Estimate:
    node = hw.node
    step = decode_step(spec, layout, gpu, node, w.concurrency, w.kv_tokens, kv_dtype, speed.DECODE,
                       network_gbs=node.network_gbs)

    def passes(prompts: int, tokens: int) -> list:
        return mechanisms.chunked_passes(prompts, tokens, batched_tokens)

    ttft = prefill_time(spec, layout, gpu, node, w.concurrency, w.prompt_tokens, speed.PREFILL, passes)
    step_s, bound, basis = step.step_s, step.bound, (speed.DECODE.source, speed.PREFILL.source)
    if offload:
        layers, host = _offloaded(spec, layout, offload), node.host_to_device_gbs * 1e9 * speed.UVA
        micro = math.ceil(step.rows / min(step.rows, layout.pp))
        step_s += layout.pp * layers.touched(micro) / host
        ttft += sum(layers.prefill(p.tokens) for p in passes(step.rows, w.prompt_tokens)) / host
        bound, basis = "the host link (cpu_offload_gb: offloaded weights read in place)", basis + (speed.UVA_SOURCE,)
    return estimate(step_s, ttft, w, bound, basis, rows=step.rows, busy=step.busy, continuous=True)


@dataclass(frozen=True)
class _Offloaded:
    """What one GPU's cpu_offload_gb holds: whole layers from the first (vLLM offloads parameter by
    parameter in layer order), so a step reads their attention and router and the experts it routes to."""

    spec: ModelSpec
    layers: float  # layers of this rank (its stage) in host memory
    non_expert: float  # bytes of one such layer outside its routed experts
    expert: float  # bytes of one routed expert

    def touched(self, tokens: int) -> float:
        experts = experts_touched(self.spec, tokens) if self.spec.moe else 0.0
        return self.layers * (self.non_expert + experts * self.expert)

    def prefill(self, tokens: int) -> float:
        """Bytes one prefill pass of `tokens` tokens reads over the host link: a touched expert once per
        block of its tokens (vLLM's fused-MoE tiles)."""
        m = self.spec.moe
        if m is None:
            return self.layers * self.non_expert
        touched = experts_touched(self.spec, tokens)
        blocks = mechanisms.expected_blocks(tokens * m.top_k / max(touched, 1.0), speed.MOE_PREFILL_BLOCK)
        return self.layers * (self.non_expert + touched * blocks * self.expert)


def _offloaded(spec: ModelSpec, layout: Parallel, offload: float) -> _Offloaded:
    wb = mm.weight_bytes_split(spec)
    sh = 1 / layout.tp
    experts_rank = spec.moe.num_experts / (layout.ep if layout.ep > 1 else 1) if spec.moe else 0
    expert = mm.expert_bytes(spec) * (sh if layout.ep <= 1 else 1.0) if spec.moe else 0.0
    non_expert = wb.non_expert / spec.num_layers * sh
    per_layer = non_expert + experts_rank * expert
    return _Offloaded(spec, min(spec.num_layers / layout.pp, offload / max(per_layer, 1.0)), non_expert, expert)


def _explain(spec, prec, hw, gpu, layout, weights, kv_pool, kv_dtype, context) -> str:
    sh = shard(prec.served, layout, kv_dtype)
    tokens = int(kv_pool / sh.kv_per_token) if sh.kv_per_token else 0
    parts = [f"vLLM {layout} on {layout.world}x {gpu.name}"]
    if layout.ep > 1:
        parts.append(f"experts spread by expert parallel (EP={layout.ep} = TP x DP, {spec.moe.num_experts // layout.ep} "
                     f"experts per GPU)")
    if nodes_used(hw, layout) > 1:
        parts.append(f"TP within a node, PP across {nodes_used(hw, layout)} nodes over Ray")
    parts.append(f"{weights / GiB:.1f} GiB weights ({prec.dtype}) and {kv_pool / GiB:.1f} GiB KV cache per GPU "
                 f"(~{tokens:,} tokens of {kv_dtype} KV, context {context})")
    return "; ".join(parts)


def gpu_env(hw: HardwareProfile, layout: Parallel, gpu: Accelerator) -> dict[str, str]:
    per_node = min(layout.world, len(hw.node.accelerators))
    env = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(per_node))}
    consumer = "geforce" in gpu.name.lower() or "rtx 40" in gpu.name.lower() or "rtx 30" in gpu.name.lower()
    linked = any(l.kind == "nvlink" for l in hw.node.links)
    if consumer and layout.world > 1 and not linked:
        # GeForce cards have PCIe peer-to-peer disabled; NCCL's P2P probe can hang or corrupt without this
        env["NCCL_P2P_DISABLE"] = "1"
    if nodes_used(hw, layout) > 1:
        # which NIC NCCL/Gloo use between nodes (replace eth0 with the InfiniBand/RoCE interface's name)
        env.update({"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"})
    return env


# --- vLLM's CPU platform ---------------------------------------------------------------------------------------
def cpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request) -> Plan:
    """vLLM-CPU: weights in RAM, KV cache sized by VLLM_CPU_KVCACHE_SPACE (whole GiB). On several nodes (a
    Ray cluster's profile) one pipeline stage per node: vLLM's CPU platform has no Ray executor (its
    `ray_device_key` is empty), so its multiprocess executor spans them (--nnodes; qwenhw starts the other
    nodes' ranks through Ray)."""
    nodes = hw.nodes
    node = min(nodes, key=lambda n: n.cpu.ram_available_bytes or n.cpu.ram_bytes)  # the tightest sizes it
    prec = precision(spec, None, req)
    if prec.error:
        return _unfit(spec, hw, req, "vllm-cpu", prec.error)
    served = prec.served
    if prec.torch_dtype == "bfloat16" and not node.cpu.native_bf16 and req.dtype in (None, "auto"):
        # without AVX512-BF16/AMX vLLM-CPU emulates bf16 matmuls: fp32 doubles memory but runs at full speed
        served = with_weight_dtype(spec, "fp32")
        prec = Precision(served, "fp32", None, "float32", False)
    wb = mm.weight_bytes_split(served)
    layout = Parallel(pp=len(nodes))
    kv_dtype = _auto_kv(served) if req.kv_dtype in (None, "auto") else req.kv_dtype
    if kv_dtype == "fp8":
        return _unfit(spec, hw, req, "vllm-cpu", "vLLM's CPU platform keeps the KV cache in the model dtype; drop --kv-dtype fp8")
    w = workload(req)
    context = req.context or default_context(served.max_position, w)
    seqs = req.concurrency
    kv = kv_need(served, layout, kv_dtype, context, seqs)
    kv_space_gib = max(1, math.ceil(kv / GiB))  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    act = activation_bytes(served, layout, CPU_MAX_BATCHED_TOKENS, max(CPU_MAX_NUM_SEQS, seqs), 4.0 if prec.dtype == "fp32" else 2.0)
    ram = usable_ram(node)
    if req.cpu_memory_gib is not None:
        ram = min(ram, req.cpu_memory_gib * GiB)
    weights = shard(served, layout).weights  # the fullest stage
    total = weights + kv_space_gib * GiB + act + CPU_RUNTIME
    fits = total <= ram
    reasons = []
    where = "RAM" if layout.pp == 1 else f"RAM on each of the {layout.pp} nodes"
    if not fits:
        reasons.append(f"vLLM-CPU needs {total / GiB:.1f} GiB of {where} (weights {weights / GiB:.1f}, KV "
                       f"{kv_space_gib} GiB, activations + runtime {(act + CPU_RUNTIME) / GiB:.1f}); the budget is "
                       f"{ram / GiB:.1f} GiB and vLLM cannot spill weights to disk (the offload backend can)")
    reasons.append(f"vLLM's CPU platform: {node.cpu.physical_cores} cores, weights in {prec.dtype}, "
                   f"VLLM_CPU_KVCACHE_SPACE={kv_space_gib} GiB for {seqs} x {context} tokens")
    if layout.pp > 1:
        reasons.append(f"one pipeline stage on each of the {layout.pp} nodes ({', '.join(n.hostname for n in nodes)}), "
                       f"{served.num_layers // layout.pp} layers each, through vLLM's multiprocess executor across "
                       f"nodes (its CPU platform runs no Ray executor); qwenhw starts the other nodes' ranks on the Ray "
                       f"cluster")
    threads = node.cpu.physical_cores
    bw = max(node.cpu.memory_bandwidth_gbs, 1.0) * 1e9 * CPU_EFFICIENCY
    head = wb.embeddings if served.tie_embeddings else wb.embeddings / 2
    experts = experts_touched(served, seqs) * mm.expert_bytes(served) * served.num_moe_layers if served.moe else 0.0
    stream = wb.non_expert + head + experts + seqs * w.kv_tokens * mm.kv_bytes_per_token(served, kv_dtype)
    rate = max(node.cpu.bf16_tflops, 0.05) * 1e12 * CPU_COMPUTE_EFFICIENCY
    # the stages run one after another for a token; each hop between nodes moves the hidden states
    hops = (layout.pp - 1) * (20e-6 + seqs * served.hidden_size * 2 / (max(node.network_gbs, 0.1) * 1e9))
    step = max(stream / bw, 2 * served.active_params() * seqs / rate) + CPU_STEP_OVERHEAD_S + hops
    ttft = 2 * served.active_params() * seqs * w.prompt_tokens / rate + CPU_STEP_OVERHEAD_S + hops
    est = estimate(step, ttft, w, "host RAM bandwidth" if stream / bw > CPU_STEP_OVERHEAD_S else
                   "per-step engine overhead", CPU_BASIS, continuous=True)
    per_token = mm.kv_bytes_per_token(served, kv_dtype)
    max_context = min(served.max_position, int(kv_space_gib * GiB / max(per_token * seqs, 1))) if per_token else served.max_position
    engine_args = {
        "model": None, "tensor_parallel_size": 1, "pipeline_parallel_size": layout.pp, "data_parallel_size": 1,
        "enable_expert_parallel": False, "max_model_len": context, "max_num_seqs": max(CPU_MAX_NUM_SEQS, seqs),
        "max_num_batched_tokens": CPU_MAX_BATCHED_TOKENS, "kv_cache_dtype": "auto", "quantization": None,
        "dtype": prec.torch_dtype, "distributed_executor_backend": "mp" if layout.pp > 1 else None,
        "load_format": "dummy" if req.load_format == "dummy" else None,
        "enable_prefix_caching": None if req.prefix_caching else False,  # None: vLLM's default (on)
    }
    head_ip = nodes[0].address or "127.0.0.1"
    if layout.pp > 1:  # node_rank and master_port are set per node when the ranks start
        engine_args.update(nnodes=layout.pp, node_rank=0, master_addr=head_ip)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib), "VLLM_HOST_IP": head_ip if layout.pp > 1 else "127.0.0.1"}
    devices = tuple(DeviceUse("cpu" if layout.pp == 1 else f"{n.hostname}/cpu", "cpu", ram / GiB, weights / GiB,
                              kv_space_gib, (act + CPU_RUNTIME) / GiB) for n in nodes)
    config = {"engine_args": engine_args, "env": env, "platform": "cpu", "threads": threads,
              "nodes": [n.hostname for n in nodes], "gpus_per_node": 0}
    if layout.pp > 1:
        config.update(addresses=[n.address for n in nodes], cpus_per_node=node.cpu.logical_cores,
                      ram_per_node_gib=round(total / GiB, 2), ray_address=req.ray_address)
    return Plan(
        model=spec.name, backend="vllm", engine="vllm-cpu", fits=fits, parallel=layout, devices=devices,
        context=context, max_context=max_context, concurrency=req.concurrency, dtype=prec.dtype, kv_dtype=kv_dtype,
        estimate=est if fits else Estimate(), reasons=tuple(reasons), config=config,
    )


def _unfit(spec: ModelSpec, hw: HardwareProfile, req: Request, engine: str, why: str) -> Plan:
    return Plan(model=spec.name, backend="vllm", engine=engine, fits=False, reasons=(why,),
                context=req.context or 0, concurrency=req.concurrency, hardware=hw.name)
