"""Plans of the offload backend: transformers on the CPU, accelerate's GPU + host RAM + disk, DeepSpeed ZeRO-3. Pure.

Memory: qwenhw.planning.footprint. Speed: decode reads every resident weight byte once per token from where it
lives; weights that live off the computing device cross the host link (accelerate streams them, ZeRO-3
gathers them), and transformers' generate() pays its Python and launches per layer.
"""

from __future__ import annotations

from qwenhw.hardware.profile import GiB, HardwareProfile
from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec
from qwenhw.planning import footprint as fp
from qwenhw.planning import speed as mechanisms
from qwenhw.planning.placement import place
from qwenhw.planning.plan import DeviceUse, Estimate, Offload, Parallel, Plan, Request
from qwenhw.planning.precision import stored_dtype, with_weight_dtype
from qwenhw.planning.workload import Workload, context_floor, default_context, estimate, shortest, workload

from .engines import Engine

# transformers sees a whole prompt in one forward pass; plans reserve activations for up to this many tokens
# per sequence (the native engine's chunk), so a longer prompt may need more than the plan reserved
PROMPT_PASS = 2048
ACCELERATE_COPY_EFFICIENCY = 0.12  # of the pinned host-to-device rate, for accelerate's pageable copies
ACCELERATE_GPU_BANDWIDTH = 0.75  # of the datasheet bandwidth, for generate() over resident weights (not measured)
ACCELERATE_BASIS = ("accelerate's offload: copies at 0.12 of the pinned host link (0.16-0.18 tok/s with 38 GiB "
                    "offloaded, one H100 host, 2026-11-27); 1.2 ms per layer of generate()'s overhead",)
PREFILL = mechanisms.TRANSFORMERS_PREFILL


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
        return [_unfit(spec, hw, req, Engine.TRANSFORMERS, why)]
    context = req.context or default_context(spec.max_position, workload(req))
    kv_dtype = "bf16" if req.kv_dtype in (None, "auto") else req.kv_dtype
    floor = context_floor(spec.max_position, workload(req)) if req.context is None else context

    def spills(p: Plan) -> bool:  # weights in host RAM or on disk, or no fit: a shorter context may avoid it
        return not p.fits or p.offload.cpu_gib > 0 or p.offload.disk_gib > 0

    out = [shortest(lambda c: cpu_plan(spec, hw, req, req_dtype, c, kv_dtype), context, floor,
                    lambda p: not p.fits or p.offload.disk_gib > 0)]
    if node.gpus("nvidia") or node.gpus("intel"):
        out.append(shortest(lambda c: gpu_plan(spec, hw, req, req_dtype or "auto", c, kv_dtype), context, floor,
                            spills))
    out.append(zero3_plan(spec, hw, req, req_dtype, context, kv_dtype))
    if req.load_format == "dummy":
        out = [_without_dummy(p) if p.fits and not _makes_random_weights(p) else p for p in out]
    return out


def _makes_random_weights(p: Plan) -> bool:
    """--load-format dummy: transformers builds random weights on one device (not across accelerate's)."""
    return p.engine == Engine.TRANSFORMERS and len(set(p.config.get("device_map", {}).values()) or {"cpu"}) == 1


def _without_dummy(p: Plan) -> Plan:
    how = "through DeepSpeed" if p.engine == Engine.DEEPSPEED_ZERO3 else "across devices with accelerate"
    return p.replace(fits=False, estimate=Estimate(), reasons=(
        f"{p.engine} cannot run random weights (--load-format dummy): it reads the checkpoint {how}; "
        "transformers on one device and the native backend's one-GPU and hybrid engines can",) + p.reasons)


def cpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str | None, context: int,
             kv_dtype: str) -> Plan:
    """transformers on the CPU; layers that do not fit in RAM are memory-mapped from disk."""
    node = hw.node
    dt = fp.cpu_dtype(spec, node, dtype)
    served = with_weight_dtype(spec, dt)
    wb = mm.weight_bytes_split(served)
    ram = fp.ram_budget(node, req)
    kv = fp.kv_bytes(served, context, req.concurrency, kv_dtype)
    act = fp.activation_bytes(served, context, req.concurrency, PROMPT_PASS)
    runtime = fp.CPU_RUNTIME + fp.TOKENIZER
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
    est = fp.cpu_estimate(served, node, workload(req), disk_fraction=disk / max(wb.total, 1))
    devices = (DeviceUse("cpu", "cpu", ram / GiB, cpu_w / GiB, kv / GiB, (act + runtime) / GiB),)
    if disk:
        devices += (DeviceUse("disk", "disk", disk_room / GiB, disk / GiB),)
    per_token = mm.kv_bytes_per_token(served, kv_dtype)
    return Plan(
        model=spec.name, backend="offload", engine=Engine.TRANSFORMERS, fits=fits, parallel=Parallel(),
        devices=devices, offload=Offload(cpu_gib=0.0, disk_gib=disk / GiB), context=context,
        max_context=fp.context_fit(cpu_w + act + runtime, per_token, ram, served, req.concurrency) if not disk else context,
        concurrency=req.concurrency, dtype=dt, kv_dtype=kv_dtype, estimate=est, reasons=tuple(reasons),
        config={"device_map": placement.device_map if placement else {}, "dtype": dt, "main_device": "cpu",
                "threads": node.cpu.physical_cores, "offload_folder": None if not disk else "auto"},
    )


def gpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str) -> Plan:
    """transformers' generate() on one GPU, with what does not fit in host RAM (then on disk): accelerate's
    hooks copy the offloaded modules to the GPU every forward pass. MoE models offload routed experts first."""
    b = fp.one_gpu(spec, hw, req, dtype, context, kv_dtype, PROMPT_PASS)
    node, gpu, served, dt, cap, kv, act, ram = b.node, b.gpu, b.served, b.dtype, b.cap, b.kv, b.act, b.ram
    wb = mm.weight_bytes_split(served)
    dev = gpu.device_id
    room = cap - kv - act - fp.CUDA_CONTEXT
    placement = place(served, [(dev, max(room, 0.0)), ("cpu", ram), ("disk", node.disk.free_bytes * 0.9)],
                      experts_last=spec.is_moe)
    gpu_w = placement.used.get(dev, 0.0) if placement else 0.0
    cpu_w = placement.used.get("cpu", 0.0) if placement else 0.0
    disk_w = placement.used.get("disk", 0.0) if placement else 0.0
    fits = placement is not None and room > 0
    reasons: list[str] = []
    if room <= 0:
        reasons.append(f"KV cache ({kv / GiB:.1f} GiB) and activations ({act / GiB:.1f} GiB) alone exceed the "
                       f"{cap / GiB:.1f} GiB GPU budget: lower --context or --concurrency")
    elif placement is None:
        reasons.append(f"weights ({wb.total / GiB:.1f} GiB) exceed GPU {room / GiB:.1f} + RAM {ram / GiB:.1f} GiB + disk")
    elif cpu_w or disk_w:
        what = "routed experts first" if spec.is_moe else "whole layers"
        reasons.append(f"{gpu_w / GiB:.1f} GiB on {dev}; {cpu_w / GiB:.1f} GiB in host RAM and {disk_w / GiB:.1f} "
                       f"GiB on disk ({what} offloaded; accelerate copies them to the GPU every token)")
    else:
        reasons.append(f"everything fits on {dev} ({gpu_w / GiB:.1f} GiB of weights): transformers' generate()")
    est = _accelerate_estimate(served, node, gpu, workload(req), kv_dtype, gpu_w, cpu_w, disk_w)
    devices = [DeviceUse(dev, f"{gpu.vendor}-gpu", cap / GiB, gpu_w / GiB, kv / GiB, (act + fp.CUDA_CONTEXT) / GiB)]
    if cpu_w:
        devices.append(DeviceUse("cpu", "cpu", ram / GiB, cpu_w / GiB))
    if disk_w:
        devices.append(DeviceUse("disk", "disk", node.disk.free_bytes * 0.9 / GiB, disk_w / GiB))
    per_token = mm.kv_bytes_per_token(served, kv_dtype)
    return Plan(
        model=spec.name, backend="offload", engine=Engine.TRANSFORMERS, fits=fits, parallel=Parallel(),
        devices=tuple(devices),
        offload=Offload(cpu_gib=cpu_w / GiB, disk_gib=disk_w / GiB, experts_on_cpu=spec.is_moe and cpu_w > 0),
        context=context,
        max_context=fp.context_fit(gpu_w + act + fp.CUDA_CONTEXT, per_token, cap, served, req.concurrency),
        concurrency=req.concurrency, dtype=dt, kv_dtype=kv_dtype, estimate=est, reasons=tuple(reasons),
        config={"device_map": placement.device_map if placement else {}, "dtype": dt, "main_device": dev,
                "threads": node.cpu.physical_cores, "offload_folder": "auto" if disk_w else None},
    )


def _accelerate_estimate(spec, node, gpu, w: Workload, kv_dtype, gpu_w, cpu_w, disk_w) -> Estimate:
    """transformers' generate() with accelerate's hooks: resident weights streamed by the GPU, offloaded
    modules copied over the host link every forward pass."""
    total = gpu_w + cpu_w + disk_w or 1.0
    stream = fp.stream_bytes(spec, w.concurrency)
    kv_read = w.concurrency * w.kv_tokens * mm.kv_bytes_per_token(spec, kv_dtype)
    passes = mechanisms.row_passes(w.concurrency, w.prompt_tokens, PROMPT_PASS)
    ttft = mechanisms.prefill(PREFILL, spec, gpu.bf16_tflops, passes, w.concurrency)
    frac_gpu, frac_cpu, frac_disk = gpu_w / total, cpu_w / total, disk_w / total
    t = (stream * frac_gpu + kv_read) / (gpu.bandwidth_gbs * 1e9 * ACCELERATE_GPU_BANDWIDTH)
    # accelerate's hooks copy every offloaded module whole (all its experts) to the GPU each forward,
    # from pageable memory: measured 0.16-0.18 tok/s with 38 GiB offloaded on an H100 host
    copies = cpu_w / (node.host_to_device_gbs * 1e9 * ACCELERATE_COPY_EFFICIENCY) + disk_w / (node.disk.read_gbs * 1e9)
    step = t + copies + spec.num_layers * fp.EAGER_LAYER_OVERHEAD  # Python and kernel launches per layer
    ttft += len(passes) * copies
    bound = "GPU memory bandwidth" if frac_cpu + frac_disk < 0.02 else "host-to-GPU copies"
    return estimate(step, ttft, w, bound, ACCELERATE_BASIS + (PREFILL.source,))


def zero3_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str | None, context: int,
               kv_dtype: str) -> Plan:
    """DeepSpeed ZeRO-3 inference: parameters live in host RAM (or NVMe) and are gathered layer by layer."""
    node = hw.node
    gpus = node.gpus("nvidia")
    dt = fp.cpu_dtype(spec, node, dtype) if not gpus else (stored_dtype(spec) if spec.quant.method is None else "bf16")
    served = with_weight_dtype(spec, dt)
    wb = mm.weight_bytes_split(served)
    ram = fp.ram_budget(node, req)
    kv = fp.kv_bytes(served, context, req.concurrency, kv_dtype)
    act = fp.activation_bytes(served, context, req.concurrency, PROMPT_PASS)
    largest_layer = max(sum(served.layer_params(i)) for i in range(served.num_layers)) * wb.total / max(served.total_params(), 1)
    nvme = wb.total > ram * 0.9
    reasons = [f"DeepSpeed ZeRO-3 inference: parameters offloaded to {'NVMe' if nvme else 'host RAM'} and "
               f"fetched one layer at a time (largest layer {largest_layer / GiB:.2f} GiB)"]
    compute = gpus[0].device_id if gpus else "cpu"
    if gpus:
        cap = gpus[0].memory_bytes * fp.GPU_UTILISATION if req.gpu_memory_gib is None else req.gpu_memory_gib * GiB
        on_dev = 2 * largest_layer + wb.embeddings + kv + act + fp.CUDA_CONTEXT
        fits = on_dev <= cap and (wb.total <= ram or node.disk.free_bytes > wb.total * 1.2)
        devices = (DeviceUse(compute, "nvidia-gpu", cap / GiB, (2 * largest_layer + wb.embeddings) / GiB, kv / GiB,
                             (act + fp.CUDA_CONTEXT) / GiB),
                   DeviceUse("cpu", "cpu", ram / GiB, 0.0 if nvme else wb.total / GiB))
        link = node.host_to_device_gbs * 1e9 * 0.7
    else:
        on_dev = wb.total + kv + act + fp.CPU_RUNTIME
        fits = on_dev <= ram or (nvme and node.disk.free_bytes > wb.total * 1.2)
        devices = (DeviceUse("cpu", "cpu", ram / GiB, (0.0 if nvme else wb.total) / GiB, kv / GiB,
                             (act + fp.CPU_RUNTIME) / GiB),)
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
        passes = mechanisms.row_passes(w.concurrency, w.prompt_tokens, PROMPT_PASS)
        step_s, prompt_s = 0.0, mechanisms.prefill(PREFILL, served, gpus[0].bf16_tflops, passes, w.concurrency)
    else:
        cpu = fp.cpu_estimate(served, node, w)
        passes, step_s, prompt_s = [None], cpu.tpot_s, cpu.ttft_s
    t = wb.total / link + step_s + spec.num_layers * fp.EAGER_LAYER_OVERHEAD  # + ZeRO's fetch hooks
    ttft = len(passes) * wb.total / link + prompt_s  # every prompt pass gathers every parameter too
    est = estimate(t, ttft, w, "parameter gathering",
                   ("ZeRO-3: every parameter gathered over the link each token (0.7 of the pinned host rate, "
                    "not measured) and generate()'s 1.2 ms per layer",))
    return Plan(
        model=spec.name, backend="offload", engine=Engine.DEEPSPEED_ZERO3, fits=fits, devices=devices,
        offload=Offload(cpu_gib=0.0 if nvme else wb.total / GiB, disk_gib=wb.total / GiB if nvme else 0.0),
        context=context, max_context=context, concurrency=req.concurrency, dtype=dt, kv_dtype=kv_dtype,
        estimate=est, reasons=tuple(reasons),
        config={"dtype": dt, "offload_device": "nvme" if nvme else "cpu", "compute_device": compute,
                "threads": node.cpu.physical_cores, "nvme_path": node.disk.path if nvme else None},
    )


def _unfit(spec: ModelSpec, hw: HardwareProfile, req: Request, engine: str, why: str) -> Plan:
    return Plan(model=spec.name, backend="offload", engine=engine, fits=False, reasons=(why,),
                context=req.context or 0, concurrency=req.concurrency, hardware=hw.name)
