"""Plans of the offload backend: CPU-only, GPU + host RAM (+ disk), MoE hybrid, DeepSpeed ZeRO-3. Pure.

Memory model (checked against measurements: tests for CPU RSS, bench/ for GPU peaks):
  device total = weights placed there + KV cache for context x concurrency + activation peak + runtime.
Speed model: decode reads every resident weight byte once per token from where it lives; weights that
live off the computing device cross the host link (accelerate streams them), except in the MoE hybrid
engine, where routed experts are computed by the CPU from host RAM.
"""

from __future__ import annotations

from qwenhw.hardware.profile import GiB, HardwareProfile, Node
from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec
from qwenhw.planning import speed as mechanisms
from qwenhw.planning.layout import CPU_TORCH_GEMV_EFFICIENCY, experts_touched, prefill_time, rank_experts
from qwenhw.planning.plan import DeviceUse, Estimate, Offload, Parallel, Plan, Request
from qwenhw.planning.precision import stored_dtype, with_weight_dtype
from qwenhw.planning.workload import Workload, context_floor, default_context, estimate, shortest, workload

from . import speed
from .placement import place

PREFILL_CHUNK = 2048  # tokens one forward pass sees at most when we plan the activation peak
# CUDA context and cuBLAS workspaces outside torch's allocator (0.60 GiB measured, torch 2.11 on H100) plus the
# caching allocator's slack over a 2048-token prefill (0.18-0.44 GiB reserved beyond what it handed out)
CUDA_CONTEXT = 0.85 * GiB
NCCL_BUFFERS = 0.3 * GiB  # NCCL communicator buffers per rank
# Host memory on top of the weights, measured on the tiny checkpoint (tests/test_offload_engine.py):
CPU_RUNTIME = 16 * 2**20  # first forward pass: oneDNN and allocator state
TOKENIZER = 118 * 2**20  # the Qwen2/Qwen3 fast tokenizer (151k vocabulary) in memory
RAM_HEADROOM = 0.85  # leave the OS and the page cache some room
GPU_UTILISATION = 0.92
CPU_EFFICIENCY = CPU_TORCH_GEMV_EFFICIENCY  # transformers on the CPU: torch GEMVs
# Per-layer fixed costs of a decode step, measured on an H100 host (docs/benchmarks.md)
EAGER_LAYER_OVERHEAD = 1.2e-3  # transformers generate(): Python + ~30 launches per layer
# qwenhw's engine (CUDA graphs of the fused decode kernels), one GPU, TP and the hybrid: speed.py
# all-reducing one decode step's hidden states inside our CUDA graphs over NVLink (parallel.Reducer: a
# symmetric-memory one-shot kernel; NCCL took 7-13 us), beyond the per-layer overhead: 8.4 us (the previous
# fit, "Dependent launches"; no row of the new one reduces unfused)
GRAPH_ALLREDUCE_S = 8.4e-6
# ...and with the next RMSNorm in the same kernel, which replaces the RMSNorm kernel the per-layer overhead
# counts. parallel.Reducer pushes (fused.reduce_norm_push, 16-bit models) up to PUSH_MAX_REMOTE_ROWS rows
# sent over the links (sequences x (GPUs - 1)): 16 rows took 5.1 us on 2 H200s and 7.3 on 4, against 11.4
# and 12.6 for the one-shot kernel and the norm apart. The fit prices it at 0.1 us per row sent, nothing
# more. The pulling kernel (fused.reduce_norm) is used up to FUSE_MAX_REMOTE_ROWS rows read over the links
# (16 rows on 4 GPUs: 14.8 us).
GRAPH_FUSED_ALLREDUCE_S = 0.0
GRAPH_PUSH_ROW_S = 0.1e-6
FUSE_MAX_REMOTE_ROWS = 16
PUSH_MAX_REMOTE_ROWS = 48


def fuses_reduce(rows: int, world: int, push: bool = True) -> bool:
    """Whether a decode step's all-reduce of `rows` sequences over `world` GPUs takes the fused kernel
    (pushing, or `push=False` pulling)."""
    return rows * (world - 1) <= (PUSH_MAX_REMOTE_ROWS if push else FUSE_MAX_REMOTE_ROWS)
ACCELERATE_COPY_EFFICIENCY = 0.12  # of the pinned host-to-device rate, for accelerate's pageable copies
CPU_COMPUTE_EFFICIENCY = 0.4  # of the CPU's estimated bf16 rate, for prompts on the CPU (not measured)
CPU_BASIS = ("transformers on the CPU: weights at 0.17 of the profile's RAM bandwidth (a 16-core Sapphire Rapids "
             "host, 2026-11-27) and 1.2 ms per layer of generate()'s overhead (an H100 host); prompts at 0.4 of "
             "the CPU's bf16 rate (not measured)",)
ACCELERATE_BASIS = ("accelerate's offload: copies at 0.12 of the pinned host link (0.16-0.18 tok/s with 38 GiB "
                    "offloaded, one H100 host, 2026-11-27); 1.2 ms per layer of generate()'s overhead",)
FAST_ARCHITECTURES = ("qwen3", "qwen3_moe", "qwen2")
RANK_ENGINES = ("transformers-tp", "transformers-dp")  # one process per GPU, in a torchrun job
# Routing statistics for the static expert cache come from a short, varied prompt.
CALIBRATION_PROMPT = (
    "You are a helpful assistant. Explain step by step how to compute 17 * 23, then write a Python function "
    "that checks whether a string is a palindrome, summarise the causes of the French Revolution in three "
    "sentences, and translate 'good morning, how are you?' into German, Spanish and Chinese."
)


def activation_bytes(spec: ModelSpec, context: int, concurrency: int) -> float:
    """Peak activation bytes of one forward pass (prefill of up to PREFILL_CHUNK tokens per sequence).

    Hidden states, q/k/v, the MLP or routed-expert intermediates, fp32 router logits and fp32 LM-head
    logits for the last position.
    """
    tokens = concurrency * min(context, PREFILL_CHUNK)
    h = spec.hidden_size
    attn = h + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim * 2
    if spec.moe:
        mlp = spec.moe.top_k * (h + 3 * spec.moe.moe_intermediate_size) + 2 * spec.moe.num_experts
    else:
        mlp = 3 * spec.intermediate_size
    logits = concurrency * spec.vocab_size * 4 * 2  # fp32 logits and their softmax
    return tokens * (4 * h + attn + mlp) * 2 + logits


# On GPUs the caching allocator reserves more than the tensors a prefill holds at once (their sizes change
# from layer to layer and freed blocks stay reserved). Measured on H200s, 16 prompts of 1023 tokens at TP=2:
# 3.27 GiB reserved for the 1.70 GiB activation_bytes counts (docs/benchmarks.md, "worst prefill").
CUDA_PREFILL_RESERVE = 1.92


def gpu_activation_bytes(spec: ModelSpec, context: int, concurrency: int) -> float:
    """What a GPU gives up for the activations of the largest prefill the plan allows."""
    return activation_bytes(spec, context, concurrency) * CUDA_PREFILL_RESERVE


def runtime_batches(concurrency: int | None) -> list[int]:
    """The lean runtimes a fast-path or rank engine builds: batch 1 (streams, single prompts), and one of the
    plan's concurrency for prompt lists. Each holds its own KV cache."""
    n = int(concurrency or 1)
    return [1, n] if n > 1 else [1]


def kv_bytes(spec: ModelSpec, context: int, concurrency: int, kv_dtype: str) -> float:
    return (mm.kv_bytes_per_token(spec, kv_dtype) * context + mm.linear_state_bytes_per_seq(spec)) * concurrency


def cpu_dtype(spec: ModelSpec, node: Node, requested: str | None) -> str:
    if requested not in (None, "auto"):
        return requested
    stored = stored_dtype(spec)
    if stored in ("bf16", "fp16") and not node.cpu.native_bf16:
        return "fp32"  # without AVX512-BF16/AMX, bf16 matmuls are emulated and slow
    return stored if stored in ("bf16", "fp16", "fp32") else "bf16"


def plans(spec: ModelSpec, hw: HardwareProfile, req: Request) -> list[Plan]:
    node = hw.node
    if spec.quant.method is not None and req.dtype in (None, "auto"):
        # transformers on CPU cannot run FP8-block or AWQ/GPTQ kernels: serve dequantized in bf16
        req_dtype = "bf16"
    else:
        req_dtype = req.dtype
    if req_dtype in ("fp8", "int4", "int8"):
        why = (f"the offload backend runs {req_dtype} only through other engines; use --backend vllm "
               f"(GPU) or intel (ipex-llm low-bit) for {req_dtype}, or --dtype bf16 here")
        return [_unfit(spec, hw, req, "transformers", why)]
    context = req.context or default_context(spec.max_position, workload(req))
    kv_dtype = "bf16" if req.kv_dtype in (None, "auto") else req.kv_dtype
    floor = context_floor(spec.max_position, workload(req)) if req.context is None else context

    def spills(p: Plan) -> bool:  # weights in host RAM or on disk, or no fit: a shorter context may avoid it
        return not p.fits or p.offload.cpu_gib > 0 or p.offload.disk_gib > 0

    out = [shortest(lambda c: cpu_plan(spec, hw, req, req_dtype, c, kv_dtype), context, floor,
                    lambda p: not p.fits or p.offload.disk_gib > 0)]
    gpus = node.gpus("nvidia") or node.gpus("intel")
    if gpus:
        whole = shortest(lambda c: gpu_plan(spec, hw, req, req_dtype or "auto", c, kv_dtype, hybrid=False), context,
                         floor, spills)
        out.append(whole)
        if whole.engine == "transformers-fast" and req.engine == "transformers":  # plain generate(), asked for
            out.append(gpu_plan(spec, hw, req, req_dtype or "auto", whole.context, kv_dtype, hybrid=False, fast=False))
        if spec.is_moe and (not whole.fits or whole.offload.cpu_gib or whole.offload.disk_gib):
            out.append(gpu_plan(spec, hw, req, req_dtype or "auto", context, kv_dtype, hybrid=True))
        n = 2
        while n <= len(gpus) and spec.architecture in FAST_ARCHITECTURES:
            tp = 1
            while tp <= n:  # n // tp replicas of tp GPUs: pure DP (tp=1) ... pure TP+EP (tp=n)
                out.append(shortest(lambda c, n=n, tp=tp: parallel_plan(spec, hw, req, req_dtype or "auto", c,
                                                                        kv_dtype, n, tp), context, floor, spills))
                tp *= 2
            n *= 2
    elif req.engine in ("transformers-fast", "hybrid-moe") and spec.architecture in FAST_ARCHITECTURES + ("qwen3_moe",):
        # no GPU: the lean runtime runs on the CPU too (this is how CI checks it token for token)
        base = out[0]
        config = {**base.config, "cuda_graphs": False, "decode_experts": "grouped_mm"}
        if req.engine == "hybrid-moe":
            if not spec.is_moe:
                return [_unfit(spec, hw, req, "hybrid-moe", "the hybrid engine is for MoE models")]
            config.update(expert_cache_bytes=0, prefill_threshold=32, cache_policy="static")
        out.append(base.replace(engine=req.engine, config=config,
                                reasons=base.reasons + (f"{req.engine} on the CPU (forced): the lean runtime without "
                                                        f"CUDA graphs",)))
    out.append(zero3_plan(spec, hw, req, req_dtype, context, kv_dtype))
    if req.load_format == "dummy":
        out = [_without_dummy(p) if p.fits and not _makes_random_weights(p) else p for p in out]
    return out


def _makes_random_weights(p: Plan) -> bool:
    """Engines that can run random weights made from the config (--load-format dummy): those that build the
    whole model in this process on one device (or the hybrid, which moves the experts to host RAM itself)."""
    if p.engine in ("transformers-fast", "hybrid-moe"):
        return True
    return p.engine == "transformers" and len(set(p.config.get("device_map", {}).values()) or {"cpu"}) == 1


def _without_dummy(p: Plan) -> Plan:
    return p.replace(fits=False, estimate=Estimate(), reasons=(
        f"{p.engine} cannot run random weights (--load-format dummy): it reads the checkpoint "
        + ("per rank" if p.engine in RANK_ENGINES else "through DeepSpeed" if p.engine == "deepspeed-zero3" else
           "across devices with accelerate") + "; the one-GPU fast path and the hybrid can",) + p.reasons)


def _ram_budget(node: Node, req: Request) -> float:
    if req.cpu_memory_gib is not None:
        return req.cpu_memory_gib * GiB
    ram = node.cpu.ram_available_bytes or node.cpu.ram_bytes
    return ram * RAM_HEADROOM


def _context_fit(fixed: float, per_token: float, room: float, spec: ModelSpec, concurrency: int) -> int:
    if per_token <= 0:
        return spec.max_position
    return max(0, min(spec.max_position, int((room - fixed) / (per_token * concurrency))))


def cpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str | None, context: int,
             kv_dtype: str) -> Plan:
    """transformers on the CPU; layers that do not fit in RAM are memory-mapped from disk."""
    node = hw.node
    dt = cpu_dtype(spec, node, dtype)
    served = with_weight_dtype(spec, dt)
    wb = mm.weight_bytes_split(served)
    ram = _ram_budget(node, req)
    kv = kv_bytes(served, context, req.concurrency, kv_dtype)
    act = activation_bytes(served, context, req.concurrency)
    runtime = CPU_RUNTIME + TOKENIZER
    room = ram - kv - act - runtime
    disk_room = node.disk.free_bytes * 0.9
    placement = place(served, [("cpu", max(room, 0.0)), ("disk", disk_room)], experts_last=False)
    reasons = [f"CPU-only: {node.cpu.physical_cores} physical cores, weights in {dt}"
               + (" (AVX512-BF16/AMX present)" if dt == "bf16" and node.cpu.native_bf16 else "")]
    if dt == "fp32" and stored_dtype(spec) in ("bf16", "fp16"):
        reasons.append("this CPU lacks AVX512-BF16/AMX: fp32 doubles the weights but avoids emulated bf16")
    fits = placement is not None and room > 0
    disk = placement.used.get("disk", 0.0) if placement else 0.0
    cpu_w = placement.used.get("cpu", 0.0) if placement else wb.total
    if not fits:
        reasons.insert(0, f"needs {(wb.total + kv + act) / GiB:.1f} GiB; host RAM budget {ram / GiB:.1f} GiB and "
                          f"disk {disk_room / GiB:.0f} GiB free cannot hold it")
    elif disk:
        reasons.append(f"{disk / GiB:.2f} GiB of layers do not fit the {ram / GiB:.2f} GiB RAM budget: "
                       f"memory-mapped from {node.disk.path} (slow: {node.disk.read_gbs:.1f} GB/s)")
    est = _cpu_estimate(served, node, workload(req), disk_fraction=disk / max(wb.total, 1))
    devices = (DeviceUse("cpu", "cpu", ram / GiB, cpu_w / GiB, kv / GiB, (act + runtime) / GiB),)
    if disk:
        devices += (DeviceUse("disk", "disk", disk_room / GiB, disk / GiB),)
    per_token = mm.kv_bytes_per_token(served, kv_dtype)
    return Plan(
        model=spec.name, backend="offload", engine="transformers", fits=fits, parallel=Parallel(),
        devices=devices, offload=Offload(cpu_gib=0.0, disk_gib=disk / GiB), context=context,
        max_context=_context_fit(cpu_w + act + runtime, per_token, ram, served, req.concurrency) if not disk else context,
        concurrency=req.concurrency, dtype=dt, kv_dtype=kv_dtype, estimate=est, reasons=tuple(reasons),
        config={"device_map": placement.device_map if placement else {}, "dtype": dt, "main_device": "cpu",
                "threads": node.cpu.physical_cores, "offload_folder": None if not disk else "auto"},
    )


def _cpu_estimate(spec: ModelSpec, node: Node, w: Workload, disk_fraction: float = 0.0) -> Estimate:
    bw = max(node.cpu.memory_bandwidth_gbs, 1.0) * 1e9 * CPU_EFFICIENCY
    stream = _stream_bytes(spec, w.concurrency) + w.concurrency * w.kv_tokens * mm.kv_bytes_per_token(spec, "bf16")
    t = stream * (1 - disk_fraction) / bw + stream * disk_fraction / (node.disk.read_gbs * 1e9)
    rate = max(node.cpu.bf16_tflops, 0.05) * 1e12 * CPU_COMPUTE_EFFICIENCY
    t = max(t, 2 * spec.active_params() * w.concurrency / rate)
    t += spec.num_layers * EAGER_LAYER_OVERHEAD  # generate()'s Python and dispatch per layer, as on a GPU
    ttft = 2 * spec.active_params() * w.concurrency * w.prompt_tokens / rate + spec.num_layers * EAGER_LAYER_OVERHEAD
    bound = "disk reads" if disk_fraction > 0.05 else "host RAM bandwidth"
    return estimate(t, ttft, w, bound, CPU_BASIS)


def _stream_bytes(spec: ModelSpec, batch: int) -> float:
    wb = mm.weight_bytes_split(spec)
    head = wb.embeddings if spec.tie_embeddings else wb.embeddings / 2
    experts = experts_touched(spec, batch) * mm.expert_bytes(spec) * spec.num_moe_layers if spec.moe else 0.0
    return wb.non_expert + head + experts


def gpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str,
             hybrid: bool, fast: bool = True) -> Plan:
    """One GPU plus host RAM (plus disk). `hybrid`: MoE experts computed on the CPU, hot ones cached on GPU."""
    node = hw.node
    gpu = (node.gpus("nvidia") or node.gpus("intel"))[0]
    served = with_weight_dtype(spec, dtype)
    if served.quant.method is not None:
        served = with_weight_dtype(spec, "bf16")
    dt = stored_dtype(served)
    wb = mm.weight_bytes_split(served)
    cap = gpu.memory_bytes * GPU_UTILISATION
    if req.gpu_memory_gib is not None:
        cap = min(cap, req.gpu_memory_gib * GiB)
    sequences = sum(runtime_batches(req.concurrency)) if fast and not hybrid else req.concurrency
    kv = kv_bytes(served, context, sequences, kv_dtype)
    act = gpu_activation_bytes(served, context, req.concurrency)
    ram = _ram_budget(node, req)
    dev = gpu.device_id
    room = cap - kv - act - CUDA_CONTEXT
    stage = cache = 0.0
    if hybrid:
        # all routed experts live in host RAM (the CPU computes them); the GPU holds everything else, one
        # layer's experts as a staging buffer for prefill, and a cache of hot experts in what is left
        stage = mm.expert_bytes(served) * served.moe.num_experts
        room -= stage
        placement = place(served, [(dev, max(room, 0.0)), ("cpu", ram)], experts_last=True)
        if placement is not None:
            for name in placement.device_map:
                if name.endswith(".mlp.experts"):
                    placement.device_map[name] = "cpu"
            moved = placement.expert_bytes_on.get(dev, 0.0)
            placement.used[dev] -= moved
            placement.used["cpu"] += moved
            one = mm.expert_bytes(served)
            cache = min(wb.experts, max(0.0, room - placement.used[dev]) // one * one)
    else:
        placement = place(served, [(dev, max(room, 0.0)), ("cpu", ram), ("disk", node.disk.free_bytes * 0.9)],
                          experts_last=spec.is_moe)
    gpu_w = placement.used.get(dev, 0.0) if placement else 0.0
    cpu_w = placement.used.get("cpu", 0.0) if placement else 0.0
    disk_w = placement.used.get("disk", 0.0) if placement else 0.0
    fits = placement is not None and room > 0
    reasons: list[str] = []
    if room <= 0:
        reasons.append(f"KV cache ({kv / GiB:.1f} GiB), activations ({act / GiB:.1f} GiB)"
                       + (f" and the prefill staging buffer ({stage / GiB:.1f} GiB)" if stage else "")
                       + f" alone exceed the {cap / GiB:.1f} GiB GPU budget: lower --context or --concurrency")
    elif placement is None:
        reasons.append(f"weights ({wb.total / GiB:.1f} GiB) exceed GPU {room / GiB:.1f} + RAM {ram / GiB:.1f} GiB"
                       + ("" if hybrid else " + disk"))
    elif hybrid and cpu_w > ram:
        fits = False
        reasons.append(f"the hybrid engine keeps all routed experts in host RAM: {cpu_w / GiB:.1f} GiB needed, "
                       f"{ram / GiB:.1f} GiB available")
    elif hybrid:
        reasons.append(
            f"MoE hybrid: attention, norms, router and embeddings on {dev} ({gpu_w / GiB:.1f} GiB); all routed "
            f"experts in host RAM ({cpu_w / GiB:.1f} GiB), only the top-{served.moe.top_k} of each token computed "
            f"by {node.cpu.physical_cores} CPU cores (qwenhw's fused bf16 kernel, built with the system C compiler "
            f"at load; without one, torch GEMVs run ~4x slower); {cache / GiB:.1f} GiB of GPU memory caches the most-used "
            f"experts ({cache / max(wb.experts, 1):.0%} of them)")
    elif cpu_w or disk_w:
        what = "routed experts first" if spec.is_moe else "whole layers"
        reasons.append(f"{gpu_w / GiB:.1f} GiB on {dev}; {cpu_w / GiB:.1f} GiB in host RAM and {disk_w / GiB:.1f} "
                       f"GiB on disk ({what} offloaded; accelerate copies them to the GPU every token)")
    else:
        reasons.append(f"everything fits on {dev} ({gpu_w / GiB:.1f} GiB of weights)")
    fast = fast and not hybrid and fits and not cpu_w and not disk_w and spec.architecture in FAST_ARCHITECTURES
    engine = "hybrid-moe" if hybrid else ("transformers-fast" if fast else "transformers")
    if fast:
        reasons.append("fast path: static KV cache and one CUDA graph per decode step over transformers' modules, "
                       "batched expert matmuls")
    est = _gpu_estimate(served, node, gpu, workload(req), kv_dtype, gpu_w, cpu_w, disk_w, engine, cache, wb.experts)
    devices = [DeviceUse(dev, f"{gpu.vendor}-gpu", cap / GiB, (gpu_w + cache) / GiB, kv / GiB,
                         (act + CUDA_CONTEXT + stage) / GiB)]
    if cpu_w:
        devices.append(DeviceUse("cpu", "cpu", ram / GiB, cpu_w / GiB))
    if disk_w:
        devices.append(DeviceUse("disk", "disk", node.disk.free_bytes * 0.9 / GiB, disk_w / GiB))
    per_token = mm.kv_bytes_per_token(served, kv_dtype)
    config = {"device_map": placement.device_map if placement else {}, "dtype": dt, "main_device": dev,
              "threads": node.cpu.physical_cores, "offload_folder": "auto" if disk_w else None}
    if engine in ("hybrid-moe", "transformers-fast"):
        config.update(cuda_graphs=True, decode_experts="grouped_mm")  # measured: faster and leaner on H100
    if hybrid:
        config.update(expert_cache_bytes=int(cache), prefill_threshold=32, cache_policy="static",
                      calibration_prompt=CALIBRATION_PROMPT)
    return Plan(
        model=spec.name, backend="offload", engine=engine, fits=fits, parallel=Parallel(), devices=tuple(devices),
        offload=Offload(cpu_gib=cpu_w / GiB, disk_gib=disk_w / GiB, experts_on_cpu=spec.is_moe and cpu_w > 0,
                        gpu_expert_cache_gib=cache / GiB),
        context=context,
        max_context=_context_fit(gpu_w + cache + stage + act + CUDA_CONTEXT, per_token, cap, served,
                                 req.concurrency),
        concurrency=req.concurrency, dtype=dt, kv_dtype=kv_dtype, estimate=est, reasons=tuple(reasons),
        config=config,
    )


# Tensor-parallel replicas keep every expert on every GPU where that fits the plan's memory ("replicated"):
# decode steps deal the touched experts out in turn (fused._dealt), so no GPU waits for the one whose
# experts a batch touched most (16 tokens on 2 GPUs: 41.5 experts per GPU per layer against 43.4)
REPLICATE_EXPERTS = True


def expert_split(spec: ModelSpec, tp: int) -> str:
    """How a tensor-parallel replica of `tp` GPUs holds the routed experts (parallel.py): "ep", whole
    experts per GPU, when their count divides; else "tp", every expert split by its intermediate size.
    Each GPU then reads the same share of every expert a batch touches, where with whole experts a step
    waits for the GPU whose experts the batch touched most; but each GPU's MoE kernels work on smaller
    matrices. Measured on H200s with the dependent launches and the router kernel: -0.3% / +0.3% (batch
    1 / 16) against whole experts on 2 GPUs, +1.7% / -1.3% on 4 (docs/benchmarks.md), and both load as
    fast since load_shard cuts columns on the GPU. Whole experts stay the default where they divide (and
    every expert does not fit every GPU: parallel_plan replicates them then)."""
    if spec.moe and spec.moe.num_experts % tp and spec.moe.moe_intermediate_size % tp == 0:
        return "tp"
    return "ep"


def split_rule(spec: ModelSpec, n: int, experts: str | None = None) -> str | None:
    """Why tensor-parallel attention + the experts held as `experts` ("ep", "tp", "replicated"; default
    `expert_split`'s) cannot use `n` GPUs (parallel.check asks the same of a transformers config)."""
    experts = experts or (expert_split(spec, n) if spec.moe else None)
    return split_counts(spec.num_heads, spec.num_kv_heads, spec.moe.num_experts if experts == "ep" else 0, n,
                        spec.moe.moe_intermediate_size if experts == "tp" else 0)


def split_counts(heads: int, kv_heads: int, experts: int, n: int, inter: int = 0) -> str | None:
    """Why `n` GPUs cannot share these heads, whole experts (`experts`, 0: not split) or every expert's
    intermediate size (`inter`, 0: not split) evenly, or None."""
    if heads % n:
        return f"{heads} attention heads are not divisible by {n} GPUs"
    if kv_heads % n and n % kv_heads:
        return f"{kv_heads} KV heads cannot be shared evenly by {n} GPUs"
    if experts and experts % n:
        return f"{experts} experts are not divisible by {n} GPUs"
    if inter and inter % n:
        return f"the experts' intermediate size {inter} is not divisible by {n} GPUs"
    return None


def parallel_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str,
                  n: int, tp: int | None = None, experts: str | None = None) -> Plan:
    """`n` GPUs of one node, one process per GPU, as `n // tp` data-parallel replicas of `tp` GPUs each.

    Inside a replica of tp > 1, attention is tensor-parallel. Every rank holds every expert where they fit
    with the rest of the plan (`REPLICATE_EXPERTS`; decode steps deal the touched ones out), else the
    experts split (`expert_split`): whole experts [r*E/tp, (r+1)*E/tp) or 1/tp of every expert. `experts`
    ("ep", "tp", "replicated") asks for one of them. Embeddings, norms and router are replicated; two
    all-reduces per layer cross the GPU links. Replicas share nothing: each decodes its share of the
    sequences (one replica per GPU needs the whole model to fit one GPU).
    """
    from qwenhw.planning.layout import link_between

    tp = n if tp is None else tp
    dp = n // tp
    node = hw.node
    gpu = node.gpus("nvidia")[0] if node.gpus("nvidia") else node.gpus()[0]
    served = with_weight_dtype(spec, dtype)
    if served.quant.method is not None:
        served = with_weight_dtype(spec, "bf16")
    wb = mm.weight_bytes_split(served)
    cap = gpu.memory_bytes * GPU_UTILISATION if req.gpu_memory_gib is None else req.gpu_memory_gib * GiB
    batch = req.concurrency
    per_replica = -(-batch // dp)  # sequences one replica decodes at a time
    kv_share = max(1, spec.num_kv_heads // tp) / spec.num_kv_heads
    kv = kv_bytes(served, context, sum(runtime_batches(per_replica)), kv_dtype) * kv_share
    act = gpu_activation_bytes(served, context, per_replica)
    weights = wb.embeddings + (wb.non_expert + wb.experts) / tp
    overhead = act + CUDA_CONTEXT + (NCCL_BUFFERS if tp > 1 else 0.0)
    asked, experts = experts, expert_split(spec, tp) if spec.is_moe and tp > 1 else None
    whole = wb.embeddings + wb.non_expert / tp + wb.experts  # every expert on every GPU
    if experts and asked:
        experts = asked
    elif experts and REPLICATE_EXPERTS and whole + kv + overhead <= cap and not split_rule(spec, tp, "replicated"):
        experts = "replicated"
    if experts == "replicated":
        weights = whole
    why = split_rule(spec, tp, experts) if tp > 1 else None
    fits = why is None and weights + kv + overhead <= cap
    ep = tp if experts in ("ep", "replicated") else 1
    reasons = [why] if why else []
    if not why and not fits:
        reasons.append(f"{(weights + kv + overhead) / GiB:.1f} GiB per GPU exceed the {cap / GiB:.1f} GiB budget")
    bw, latency = link_between(node, tp)
    fused = bw >= 100 and fuses_reduce(per_replica, tp)
    if bw >= 100:  # NVLink-class: our in-graph kernels, as measured (the generic link figure is NCCL's)
        latency = GRAPH_FUSED_ALLREDUCE_S + GRAPH_PUSH_ROW_S * per_replica * (tp - 1) if fused else GRAPH_ALLREDUCE_S
    if fits and tp > 1:
        fused_note = ", each fused with the next RMSNorm" if fused else ""
        reasons.append(
            (f"{dp} replicas of {tp} GPUs, each decoding {per_replica} of the {batch} sequences; in a replica, "
             if dp > 1 else f"{n} GPUs, one process each: ")
            + f"attention split by heads ({spec.num_heads // tp} per GPU), "
            + (f"every expert split by its intermediate size ({spec.moe.moe_intermediate_size // tp} of "
               f"{spec.moe.moe_intermediate_size} per GPU: each GPU reads its share of every expert a batch "
               "touches), " if experts == "tp" else
               f"all {spec.moe.num_experts} experts on every GPU (they fit: {weights / GiB:.1f} GiB of weights "
               "per GPU), a decode step dealing the experts it touches out to the GPUs in turn (none waits for "
               "a GPU the batch touched more than the others), " if experts == "replicated" else
               f"experts by expert parallelism ({spec.moe.num_experts // tp} whole experts per GPU), " if spec.moe
               else "MLPs split by columns/rows, ")
            + f"2 all-reduces per layer over {node.link(0, 1).kind if node.link(0, 1) else 'PCIe'} "
              f"({bw:.0f} GB/s{fused_note}); "
              f"embeddings and router replicated")
    elif fits:
        reasons.append(f"{dp} data-parallel replicas, one whole model per GPU ({weights / GiB:.1f} GiB), each "
                       f"decoding {per_replica} of the {batch} sequences through the fast path; nothing crosses "
                       f"the GPU links during decode")
    w = workload(req)
    share = Workload(w.prompt_tokens, w.output_tokens, per_replica, w.goal)  # what one replica serves
    if tp == 1:  # each replica is the single-GPU fast path: the same speed model, so ties go to fewer GPUs
        one = _gpu_estimate(served, node, gpu, share, kv_dtype, weights, 0.0, 0.0, "transformers-fast", 0.0,
                            wb.experts)
        est = estimate(one.tpot_s, one.ttft_s, w, one.bound, one.basis, rows=per_replica,
                       busy=min(dp, -(-batch // per_replica)), tokenize=False)
    else:
        # per step: each GPU streams its share; graph replay and the all-reduces do not shrink with tp. With
        # whole experts per GPU a step waits for the GPU whose experts the batch touched most
        head = wb.embeddings if spec.tie_embeddings else wb.embeddings / 2  # the LM head, whole on every GPU
        routed = rank_experts(served, per_replica, tp, ep, experts == "replicated") * mm.expert_bytes(served) \
            * served.num_moe_layers if served.moe else 0.0
        per_gpu = wb.non_expert / tp + head + routed
        kv_read = per_replica * w.kv_tokens * mm.kv_bytes_per_token(served, kv_dtype) * kv_share
        t = mechanisms.decode_step(speed.TP_DECODE, gpu.bandwidth_gbs, spec.num_layers, per_replica, per_gpu + kv_read)
        msg = per_replica * spec.hidden_size * 2
        t += 2 * spec.num_layers * (latency + 2 * msg * (tp - 1) / tp / (bw * 1e9))

        def passes(prompts: int, tokens: int) -> list:
            return mechanisms.row_passes(prompts, tokens, PREFILL_CHUNK)

        ttft = prefill_time(served, Parallel(tp=tp, dp=dp), gpu, node, batch, w.prompt_tokens, speed.PREFILL, passes)
        est = estimate(t, ttft, w, "GPU memory bandwidth and per-layer launches",
                       (speed.TP_DECODE.source, speed.PREFILL.source), rows=per_replica,
                       busy=min(dp, -(-batch // per_replica)))
    devices = tuple(DeviceUse(f"cuda:{i}", f"{gpu.vendor}-gpu", cap / GiB, weights / GiB, kv / GiB, overhead / GiB)
                    for i in range(n))
    per_token = mm.kv_bytes_per_token(served, kv_dtype) * kv_share
    return Plan(
        model=spec.name, backend="offload", engine="transformers-tp" if dp == 1 else "transformers-dp", fits=fits,
        parallel=Parallel(tp=tp, dp=dp, ep=ep), devices=devices, context=context,
        max_context=_context_fit(weights + overhead, per_token, cap, served, per_replica),
        concurrency=batch, dtype=stored_dtype(served), kv_dtype=kv_dtype, estimate=est,
        reasons=tuple(reasons),
        config={"dtype": stored_dtype(served), "world": n, "tp": tp, "cuda_graphs": True,
                "decode_experts": "grouped_mm", "threads": node.cpu.physical_cores,
                **({"experts": experts} if experts else {}), "env": {"NCCL_NVLS_ENABLE": "0"}},
    )


def _gpu_estimate(spec, node, gpu, w: Workload, kv_dtype, gpu_w, cpu_w, disk_w, engine, cache, experts_total,
                  prefill_threshold: int = 32) -> Estimate:
    """One GPU (+ host RAM, + disk) for the workload: the fast path, the MoE hybrid, or transformers'
    generate() with accelerate's hooks."""
    total = gpu_w + cpu_w + disk_w + cache or 1.0
    rows = w.concurrency
    stream = _stream_bytes(spec, rows)
    kv_read = rows * w.kv_tokens * mm.kv_bytes_per_token(spec, kv_dtype)
    gpu_bw = gpu.bandwidth_gbs * 1e9 * speed.DECODE.bandwidth
    passes = mechanisms.row_passes(rows, w.prompt_tokens, PREFILL_CHUNK)
    ttft = mechanisms.prefill(speed.PREFILL, spec, gpu.bf16_tflops, passes, rows)
    if engine == "transformers-fast":
        step = mechanisms.decode_step(speed.DECODE, gpu.bandwidth_gbs, spec.num_layers, rows, stream + kv_read)
        return estimate(step, ttft, w, "GPU memory bandwidth", (speed.DECODE.source, speed.PREFILL.source))
    if engine == "hybrid-moe":
        expert_stream = experts_touched(spec, rows) * mm.expert_bytes(spec) * spec.num_moe_layers
        hit = cache / experts_total if experts_total else 0.0  # uniform routing: hit rate = share cached
        cpu_bw = max(node.cpu.memory_bandwidth_gbs, 1) * 1e9 * speed.HYBRID_CPU_BANDWIDTH
        step = (stream - expert_stream + kv_read) / gpu_bw + expert_stream * (1 - hit) / cpu_bw
        # per MoE layer: a host sync and two small copies, and a few CPU kernel launches per expert
        step += spec.num_moe_layers * speed.HYBRID_LAYER_S
        # prompt passes of prefill_threshold tokens or more ship every layer's experts over pinned memory
        shipped = experts_total / (node.host_to_device_gbs * 1e9 * speed.HYBRID_STREAM)
        ttft += sum(shipped if p.tokens >= prefill_threshold else p.tokens * step for p in passes)
        return estimate(step, ttft, w, "host RAM bandwidth (CPU experts)", (speed.HYBRID_SOURCE, speed.PREFILL.source))
    frac_gpu, frac_cpu, frac_disk = gpu_w / total, cpu_w / total, disk_w / total
    t = (stream * frac_gpu + kv_read) / (gpu.bandwidth_gbs * 1e9 * 0.75)
    # accelerate's hooks copy every offloaded module whole (all its experts) to the GPU each forward,
    # from pageable memory: measured 0.16-0.18 tok/s with 38 GiB offloaded on an H100 host
    copies = cpu_w / (node.host_to_device_gbs * 1e9 * ACCELERATE_COPY_EFFICIENCY) + disk_w / (node.disk.read_gbs * 1e9)
    step = t + copies + spec.num_layers * EAGER_LAYER_OVERHEAD  # Python and kernel launches per layer
    ttft += len(passes) * copies
    bound = "GPU memory bandwidth" if frac_cpu + frac_disk < 0.02 else "host-to-GPU copies"
    return estimate(step, ttft, w, bound, ACCELERATE_BASIS + (speed.PREFILL.source,))


def zero3_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str | None, context: int,
               kv_dtype: str) -> Plan:
    """DeepSpeed ZeRO-3 inference: parameters live in host RAM (or NVMe) and are gathered layer by layer."""
    node = hw.node
    gpus = node.gpus("nvidia")
    dt = cpu_dtype(spec, node, dtype) if not gpus else (stored_dtype(spec) if spec.quant.method is None else "bf16")
    served = with_weight_dtype(spec, dt)
    wb = mm.weight_bytes_split(served)
    ram = _ram_budget(node, req)
    kv = kv_bytes(served, context, req.concurrency, kv_dtype)
    act = activation_bytes(served, context, req.concurrency)
    largest_layer = max(sum(served.layer_params(i)) for i in range(served.num_layers)) * wb.total / max(served.total_params(), 1)
    nvme = wb.total > ram * 0.9
    reasons = [f"DeepSpeed ZeRO-3 inference: parameters offloaded to {'NVMe' if nvme else 'host RAM'} and "
               f"fetched one layer at a time (largest layer {largest_layer / GiB:.2f} GiB)"]
    compute = gpus[0].device_id if gpus else "cpu"
    if gpus:
        cap = gpus[0].memory_bytes * GPU_UTILISATION if req.gpu_memory_gib is None else req.gpu_memory_gib * GiB
        on_dev = 2 * largest_layer + wb.embeddings + kv + act + CUDA_CONTEXT
        fits = on_dev <= cap and (wb.total <= ram or node.disk.free_bytes > wb.total * 1.2)
        devices = (DeviceUse(compute, "nvidia-gpu", cap / GiB, (2 * largest_layer + wb.embeddings) / GiB, kv / GiB,
                             (act + CUDA_CONTEXT) / GiB),
                   DeviceUse("cpu", "cpu", ram / GiB, 0.0 if nvme else wb.total / GiB))
        link = node.host_to_device_gbs * 1e9 * 0.7
    else:
        on_dev = wb.total + kv + act + CPU_RUNTIME
        fits = on_dev <= ram or (nvme and node.disk.free_bytes > wb.total * 1.2)
        devices = (DeviceUse("cpu", "cpu", ram / GiB, (0.0 if nvme else wb.total) / GiB, kv / GiB,
                             (act + CPU_RUNTIME) / GiB),)
        link = max(node.cpu.memory_bandwidth_gbs, 1.0) * 1e9 * 0.3  # gather = copy inside RAM
    if nvme:
        devices += (DeviceUse("disk", "disk", node.disk.free_bytes * 0.9 / GiB, wb.total / GiB),)
        link = min(link, node.disk.read_gbs * 1e9)
    if not fits:
        reasons.insert(0, f"ZeRO-3 needs {on_dev / GiB:.1f} GiB on {compute} and {wb.total / GiB:.1f} GiB of "
                          f"parameters in RAM or NVMe")
    # every parameter (experts included: ZeRO gathers whole modules) crosses the link each token
    # gathering crosses the link, then the gathered layer is computed like any resident one
    w = workload(req)
    if gpus:  # the gathered layers compute like resident ones: prompts as transformers' modules do
        passes = mechanisms.row_passes(w.concurrency, w.prompt_tokens, PREFILL_CHUNK)
        step_s, prompt_s = 0.0, mechanisms.prefill(speed.PREFILL, served, gpus[0].bf16_tflops, passes, w.concurrency)
    else:
        cpu = _cpu_estimate(served, node, w)
        passes, step_s, prompt_s = [None], cpu.tpot_s, cpu.ttft_s
    t = wb.total / link + step_s + spec.num_layers * EAGER_LAYER_OVERHEAD  # + ZeRO's fetch hooks
    ttft = len(passes) * wb.total / link + prompt_s  # every prompt pass gathers every parameter too
    est = estimate(t, ttft, w, "parameter gathering",
                   ("ZeRO-3: every parameter gathered over the link each token (0.7 of the pinned host rate, "
                    "not measured) and generate()'s 1.2 ms per layer",))
    return Plan(
        model=spec.name, backend="offload", engine="deepspeed-zero3", fits=fits, devices=devices,
        offload=Offload(cpu_gib=0.0 if nvme else wb.total / GiB, disk_gib=wb.total / GiB if nvme else 0.0),
        context=context, max_context=context, concurrency=req.concurrency, dtype=dt, kv_dtype=kv_dtype,
        estimate=est, reasons=tuple(reasons),
        config={"dtype": dt, "offload_device": "nvme" if nvme else "cpu", "compute_device": compute,
                "threads": node.cpu.physical_cores, "nvme_path": node.disk.path if nvme else None},
    )


def _unfit(spec: ModelSpec, hw: HardwareProfile, req: Request, engine: str, why: str) -> Plan:
    return Plan(model=spec.name, backend="offload", engine=engine, fits=False, reasons=(why,),
                context=req.context or 0, concurrency=req.concurrency, hardware=hw.name)

