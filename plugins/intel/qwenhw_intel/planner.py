"""Plans of the intel backend: ipex-llm on one XPU card, pipeline-parallel across cards, DeepSpeed AutoTP
across cards or CPU sockets, IPEX bf16/AMX and ipex-llm low-bit on the CPU. Pure: sizes in, Plans out.

Memory: device total = resident weights (formats.py) + KV cache + activation peak + runtime. Host RAM is
also checked at load time, because ipex-llm converts on the host before `.to("xpu")`, and every
pipeline-parallel or AutoTP rank loads the whole checkpoint before keeping its share.
Speed: a roofline per engine (bytes streamed per token over bandwidth x efficiency, FLOPs, links) plus the
per-layer Python/launch cost of a transformers-style forward. Efficiencies are datasheet fractions; only
the CPU paths were run here (no Intel GPU on this machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwenhw.hardware.profile import GiB, HardwareProfile, Node
from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec
from qwenhw.planning.layout import (CPU_TORCH_GEMV_EFFICIENCY, experts_touched, head_rules, link_between,
                                    powers_of_two, shard)
from qwenhw.planning.footprint import ram_budget
from qwenhw.planning.plan import DeviceUse, Estimate, Offload, Parallel, Plan, Request
from qwenhw.planning.precision import stored_dtype
from qwenhw.planning.workload import context_floor, default_context, shortest, workload

from . import flashmoe
from .formats import GGUF_BPW, LOW_BIT_BYTES, REQUEST_TO_LOW_BIT, Bytes, low_bit_bytes, plain_bytes

PREFILL_CHUNK = 2048  # prompt tokens one forward pass holds activations for (we plan that peak)
XPU_UTILISATION = 0.95  # of the card's memory that Level Zero lets one process allocate in practice
XPU_RUNTIME = 0.5 * GiB  # SYCL/Level Zero context and oneDNN scratch, outside torch's allocator
CPU_RUNTIME = 0.25 * GiB  # IPEX/oneDNN kernel caches and allocator slack
COMPUTE_EFFICIENCY = 0.4
RANK_LATENCY_S = 20e-6  # one allreduce or PP hop between ranks (shm on a host, PCIe between Arc cards)
GENERATE_STEP_S = 2e-3  # transformers' generate() per token: logits processors, stopping criteria, cache update
BASIS = ("intel: a roofline per engine (bandwidth fractions and per-layer costs in FLAVOURS; transformers' "
         "generate() overhead measured on an H100 host, the rest not measured on Intel hardware)",)


@dataclass(frozen=True)
class Flavour:
    """How close an engine gets to the roofline: bandwidth efficiency and per-layer overhead per token."""

    bw_eff: float
    layer_s: float


GENERATE_LAYER_S = 1.2e-3  # transformers generate(): Python and dispatch per layer (measured on an H100 host)
FLAVOURS = {
    ("ipex-llm", "xpu"): Flavour(0.70, 0.25e-3),  # fused low-bit GEMV kernels; transformers' loop remains
    # CPU: the measured shared torch-GEMV efficiency and transformers' generate() cost per layer. IPEX's
    # fused kernels are surely faster, but until a run measures by how much it is not ranked above the
    # stock path on speed it has not shown (docs/benchmarks.md).
    ("ipex-llm", "cpu"): Flavour(CPU_TORCH_GEMV_EFFICIENCY, GENERATE_LAYER_S),
    ("ipex", "cpu"): Flavour(CPU_TORCH_GEMV_EFFICIENCY, GENERATE_LAYER_S),
    ("deepspeed-autotp", "cpu"): Flavour(CPU_TORCH_GEMV_EFFICIENCY, GENERATE_LAYER_S),  # stock, sharded
    ("deepspeed-autotp", "xpu"): Flavour(0.70, 0.25e-3),  # + ipex-llm optimize_model per rank
}
ENGINES = ("ipex-llm", "ipex", "deepspeed-autotp", "flashmoe")
XPU_RANK_ENV = {  # oneCCL between Arc cards over host sockets (ipex-llm's own multi-card scripts set these)
    "MASTER_ADDR": "127.0.0.1",
    "FI_PROVIDER": "tcp",
    "CCL_ATL_TRANSPORT": "ofi",
    "CCL_ZE_IPC_EXCHANGE": "sockets",
    "USE_XETLA": "OFF",
    "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS": "2",
    "TORCH_LLM_ALLREDUCE": "0",  # 1 on Data Center GPU Max
    "BIGDL_IMPORT_IPEX": "0",
}


def parse_engine(engine: str | None) -> tuple[str | None, str | None]:
    """`--engine NAME[:OPTION]`: ipex-llm:asym_int4 picks a low-bit format, deepspeed-autotp:2 a rank count.

    >>> parse_engine("ipex-llm:asym_int4"), parse_engine("deepspeed-autotp:2"), parse_engine(None)
    (('ipex-llm', 'asym_int4'), ('deepspeed-autotp', '2'), (None, None))
    """
    if not engine:
        return None, None
    name, _, option = engine.partition(":")
    return name, option or None


def plans(spec: ModelSpec, hw: HardwareProfile, req: Request) -> list[Plan]:
    node = hw.node
    name, option = parse_engine(req.engine)
    if name and name not in ENGINES:
        return [_unfit(spec, hw, req, name, f"the intel backend has no engine {name!r} (engines: {', '.join(ENGINES)}; "
                                            f"ipex-llm:<low_bit> and deepspeed-autotp:<ranks> take an option)")]
    if spec.quant.method == "fp8":
        return [_unfit(spec, hw, req, name or "ipex-llm",
                       "FP8 block-quantized checkpoints need CUDA kernels in transformers 4.51; plan the bf16 "
                       "checkpoint with --dtype fp8 (ipex-llm converts it to fp8_e5m2 while loading)")]
    if name == "ipex-llm" and option and option not in LOW_BIT_BYTES:
        return [_unfit(spec, hw, req, name, f"unknown ipex-llm low-bit format {option!r}; known: "
                                            f"{', '.join(LOW_BIT_BYTES)}")]
    if name == "flashmoe" and option and option not in GGUF_BPW:
        return [_unfit(spec, hw, req, name, f"unknown GGUF quant {option!r}; known: {', '.join(GGUF_BPW)}")]
    w = workload(req)
    context = req.context or default_context(spec.max_position, w)
    floor = context_floor(spec.max_position, w) if req.context is None else context
    fmt = _format(spec, req, option if name == "ipex-llm" else None)
    ranks = int(option) if name == "deepspeed-autotp" and option else None
    layouts = len(_plans_for(spec, hw, req, fmt, context, name, ranks))  # the same layouts at every context
    out = [shortest(lambda c, i=i: _plans_for(spec, hw, req, fmt, c, name, ranks)[i], context, floor,
                    lambda p: not p.fits) for i in range(layouts)]
    gpu_fits = any(p.fits for p in out if p.devices and p.devices[0].kind == "intel-gpu")
    if req.dtype in (None, "auto") and node.gpus("intel") and not gpu_fits and fmt in ("bf16", "fp16") and name in (None, "ipex-llm"):
        # the weights do not fit the cards as stored: ipex-llm's int4 on them beats the CPU by far (lossy, so
        # it is a candidate the reasons name, not a silent choice)
        int4 = [shortest(lambda c, i=i: xpu_plans(spec, hw, req, "sym_int4", c)[i], context, floor,
                         lambda p: not p.fits) for i in range(len(xpu_plans(spec, hw, req, "sym_int4", context)))]
        out += [p.replace(reasons=p.reasons + (f"quantized to sym_int4 while loading (lossy) because {fmt} "
                                               f"does not fit the card{'s' if len(node.gpus('intel')) > 1 else ''}; "
                                               f"pass --dtype {fmt} to insist",),
                          config={**p.config, "quantized_at_load": True}) for p in int4]
    if req.dtype in (None, "auto") and not any(p.fits for p in out):
        hint = _low_bit_hint(spec, hw, req, floor)  # quantizing is the user's call: say what it would give
        out = [p.replace(reasons=p.reasons + (hint,)) if hint else p for p in out]
    if spec.is_moe and node.gpus("intel"):
        gguf = option if name == "flashmoe" else None
        out.append(shortest(lambda c: flashmoe.plan(spec, hw, req, c, gguf), context, floor, lambda p: not p.fits))
    if name:
        out = [p for p in out if p.engine == name] or [
            _unfit(spec, hw, req, name, f"engine {name} has no layout for this model and hardware")]
    return out


def _plans_for(spec: ModelSpec, hw: HardwareProfile, req: Request, fmt: str, context: int,
               forced: str | None = None, ranks: int | None = None) -> list[Plan]:
    out = xpu_plans(spec, hw, req, fmt, context) if hw.node.gpus("intel") else []
    return out + cpu_plans(spec, hw, req, fmt, context, forced=forced, ranks=ranks)


def _format(spec: ModelSpec, req: Request, option: str | None) -> str:
    """The ipex-llm format to serve: what was asked for, else the checkpoint's own (never a silent low-bit)."""
    if option:
        return option
    if spec.quant.method in ("awq", "gptq"):
        return "asym_int4"  # ipex-llm repacks AWQ/GPTQ weights into its asym_int4 blocks
    if req.dtype in (None, "auto"):
        stored = stored_dtype(spec)
        return stored if stored in ("bf16", "fp16") else "bf16"
    if req.dtype == "fp32":
        return "bf16"  # served in fp32 by IPEX on the CPU (cpu_plans); ipex-llm has no fp32 format
    return REQUEST_TO_LOW_BIT[req.dtype]


def _low_bit_hint(spec: ModelSpec, hw: HardwareProfile, req: Request, context: int) -> str | None:
    for dtype, fmt in (("int8", "sym_int8"), ("int4", "sym_int4")):
        fitting = [p for p in _plans_for(spec, hw, req, fmt, context) if p.fits]
        if fitting:
            best = max(fitting, key=lambda p: p.score)
            where = ", ".join(d.id for d in best.devices)
            return (f"--dtype {dtype} fits: {best.engine} {fmt} ({best.parallel}, on {where}, "
                    f"{sum(d.weights_gib for d in best.devices):.1f} GiB of weights, about "
                    f"{best.estimate.decode_tok_s:.1f} tok/s; lossy)")
    return None


# --- memory pieces ---------------------------------------------------------------------------------
def activation_bytes(spec: ModelSpec, context: int, concurrency: int, dtype_bytes: float = 2.0) -> float:
    """Peak activations of a prefill of up to PREFILL_CHUNK tokens; ipex-llm and IPEX compute the LM head
    for the last position only, so logits are one row per sequence (fp32)."""
    tokens = concurrency * min(context, PREFILL_CHUNK)
    h = spec.hidden_size
    attn = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    mlp = spec.moe.top_k * 3 * spec.moe.moe_intermediate_size if spec.moe else 3 * spec.intermediate_size
    return tokens * (4 * h + attn + mlp) * dtype_bytes + concurrency * spec.vocab_size * 4 * 2


def _kv_dtype(req: Request, device: str, rest: str) -> str:
    if req.kv_dtype == "fp8" and device == "xpu":
        return "fp8"  # IPEX_LLM_QUANTIZE_KV_CACHE=1
    return rest if rest in ("bf16", "fp16", "fp32") else "bf16"




def cpu_dtype(node: Node, requested: str | None) -> str:
    if requested in ("bf16", "fp16", "fp32"):
        return requested
    return "bf16" if node.cpu.native_bf16 else "fp32"  # no AVX512-BF16/AMX: bf16 is emulated, fp32 is faster


# --- XPU ------------------------------------------------------------------------------------------
def xpu_plans(spec: ModelSpec, hw: HardwareProfile, req: Request, fmt: str, context: int) -> list[Plan]:
    gpus = hw.node.gpus("intel")
    out = [xpu_plan(spec, hw, req, fmt, context, Parallel())]
    for n in powers_of_two(len(gpus))[1:]:
        out.append(xpu_plan(spec, hw, req, fmt, context, Parallel(pp=n)))
        out.append(xpu_plan(spec, hw, req, fmt, context, Parallel(tp=n)))
    return out


def xpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, fmt: str, context: int, layout: Parallel) -> Plan:
    """ipex-llm on one card (pp=tp=1), pipeline-parallel stages (pp), or DeepSpeed AutoTP ranks (tp)."""
    node = hw.node
    gpus = node.gpus("intel")
    gpu = gpus[0]
    rest = "bf16" if fmt == "bf16" else "fp16"  # ipex-llm runs the unquantized parts in fp16 on Arc
    w = low_bit_bytes(spec, fmt, rest)
    kv_dtype = _kv_dtype(req, "xpu", rest)
    kv_token = shard(spec, layout, kv_dtype).kv_per_token
    per_layer = (w.non_expert + w.experts) / spec.num_layers
    engine = "deepspeed-autotp" if layout.tp > 1 else "ipex-llm"
    reasons: list[str] = []
    if layout.pp > 1:
        stage_layers = math.ceil(spec.num_layers / layout.pp)
        weights = stage_layers * per_layer + max(w.embed, w.head)
        kv_token = mm.kv_bytes_per_token(spec, kv_dtype) * stage_layers / spec.num_layers
        host_peak = layout.pp * w.total  # each rank converts the whole model on the host, then drops layers
        what = f"ipex-llm pipeline_parallel_stages={layout.pp}: {stage_layers} layers per card"
    elif layout.tp > 1:
        weights = (w.non_expert + w.experts + w.head) / layout.tp + w.embed
        # ranks load the full checkpoint in fp16 one after another (RANK_WAIT_TIME), then keep a shard
        host_peak = plain_bytes(spec, "fp16").total + (layout.tp - 1) * weights
        what = f"DeepSpeed AutoTP over {layout.tp} cards (one rank per card), ipex-llm {fmt} per shard"
        bad = head_rules(spec, layout.tp)
        if bad:
            reasons.append(bad)
    else:
        weights = w.total
        host_peak = w.total
        what = f"ipex-llm {fmt} on {gpu.device_id}"
    kv = kv_token * context * req.concurrency
    act = activation_bytes(spec, context, req.concurrency) / max(layout.pp, 1)
    cap = gpu.memory_bytes * XPU_UTILISATION if req.gpu_memory_gib is None else req.gpu_memory_gib * GiB
    ram = ram_budget(node, req)
    total = weights + kv + act + XPU_RUNTIME
    fits = total <= cap and host_peak <= ram and not reasons
    if total > cap:
        reasons.append(f"{fmt} needs {total / GiB:.1f} GiB per card ({weights / GiB:.1f} weights, {kv / GiB:.2f} KV, "
                       f"{(act + XPU_RUNTIME) / GiB:.2f} runtime); {gpu.name} offers {cap / GiB:.1f} GiB")
    if host_peak > ram:
        reasons.append(f"loading needs {host_peak / GiB:.1f} GiB of host RAM (conversion happens on the host"
                       f"{', once per rank' if layout.world > 1 else ''}); budget {ram / GiB:.1f} GiB")
    if fits:
        reasons.append(f"{what}; {_format_note(fmt, spec)}")
    est = _estimate(spec, w, gpu.bandwidth_gbs, gpu.bf16_tflops, FLAVOURS[(engine, "xpu")], req.concurrency, workload(req).kv_tokens,
                    kv_token, layout, link_between(node, layout.world)) if fits else Estimate()
    devices = tuple(DeviceUse(g.device_id, "intel-gpu", cap / GiB, weights / GiB, kv / GiB, (act + XPU_RUNTIME) / GiB)
                    for g in gpus[:layout.world])
    env = {"SYCL_CACHE_PERSISTENT": "1", "USE_XETLA": "OFF", "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS": "1"}
    if kv_dtype == "fp8":
        env["IPEX_LLM_QUANTIZE_KV_CACHE"] = "1"
    if layout.world > 1:
        env.update(XPU_RANK_ENV)
    return Plan(
        model=spec.name, backend="intel", engine=engine, fits=fits, parallel=layout, devices=devices,
        context=context, max_context=_max_context(spec, cap - weights - act - XPU_RUNTIME, kv_token, req, context),
        concurrency=req.concurrency, dtype=fmt, kv_dtype=kv_dtype, estimate=est, reasons=tuple(reasons),
        config={"device": "xpu", "low_bit": fmt, "torch_dtype": rest, "ranks": layout.world, "pp": layout.pp,
                "tp": layout.tp, "threads": node.cpu.physical_cores, "env": env},
    )


# --- CPU ------------------------------------------------------------------------------------------
def cpu_plans(spec: ModelSpec, hw: HardwareProfile, req: Request, fmt: str, context: int,
              forced: str | None = None, ranks: int | None = None) -> list[Plan]:
    """IPEX for 16-bit weights, ipex-llm for low-bit ones (or when forced), AutoTP with one rank per socket."""
    node = hw.node
    sixteen = fmt in ("bf16", "fp16")
    out = []
    if sixteen:
        out.append(cpu_plan(spec, hw, req, "ipex", cpu_dtype(node, req.dtype), context))
    if not sixteen or forced == "ipex-llm":
        out.append(cpu_plan(spec, hw, req, "ipex-llm", fmt, context))
    n = ranks or (node.cpu.sockets if node.cpu.sockets > 1 else 0)
    if sixteen and (ranks or n > 1):
        out.append(cpu_plan(spec, hw, req, "deepspeed-autotp", cpu_dtype(node, req.dtype), context, ranks=n))
    return out


def cpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, engine: str, fmt: str, context: int,
             ranks: int = 1) -> Plan:
    node = hw.node
    cpu = node.cpu
    rest = cpu_dtype(node, None) if engine == "ipex-llm" and fmt not in ("bf16", "fp16") else fmt
    w = low_bit_bytes(spec, fmt, rest) if engine == "ipex-llm" else plain_bytes(spec, fmt)
    kv_dtype = _kv_dtype(req, "cpu", rest)
    layout = Parallel(tp=ranks)
    kv_token = mm.kv_bytes_per_token(spec, kv_dtype)
    kv = kv_token * context * req.concurrency
    act = activation_bytes(spec, context, req.concurrency, mm.dtype_bytes(rest)) * ranks
    weights = w.total + (ranks - 1) * w.embed  # AutoTP replicates the embedding on every rank
    runtime = CPU_RUNTIME * ranks
    ram = ram_budget(node, req)
    host_peak = ranks * w.total if ranks > 1 else weights  # every rank reads the full checkpoint first
    total = weights + kv + act + runtime
    reasons: list[str] = []
    if ranks > 1 and head_rules(spec, ranks):
        reasons.append(head_rules(spec, ranks) or "")
    fits = max(total, host_peak) <= ram and not reasons
    if not fits and not reasons:
        reasons.append(f"{engine} {fmt} needs {max(total, host_peak) / GiB:.1f} GiB of host RAM "
                       f"({weights / GiB:.1f} weights, {kv / GiB:.2f} KV{', load peak of every rank' if host_peak > total else ''}); "
                       f"budget {ram / GiB:.1f} GiB")
    amx = "AMX" if cpu.has("amx_bf16") else ("AVX512-BF16" if cpu.has("avx512_bf16") else "")
    if fits:
        if engine == "ipex":
            reasons.append(f"IPEX ipex.llm.optimize in {fmt} on {cpu.physical_cores} cores"
                           + (f" with {amx}: fused attention and {amx} linears beat stock transformers" if amx and fmt == "bf16"
                              else " (no AVX512-BF16/AMX: fp32 avoids emulated bf16)" if fmt == "fp32" else ""))
        elif engine == "ipex-llm":
            reasons.append(f"ipex-llm {fmt} on the CPU ({cpu.physical_cores} cores); {_format_note(fmt, spec)}")
        else:
            per = "socket" if cpu.sockets >= ranks else "share of one socket (no speed gain: same memory channels)"
            reasons.append(f"DeepSpeed AutoTP: {ranks} ranks, one per {per}; each rank holds 1/{ranks} of the "
                           f"linears and all-reduces twice per layer over shared memory")
    # one process spanning sockets reads remote NUMA memory; AutoTP ranks read their own socket's
    sockets = max(cpu.sockets, 1)
    bw = cpu.memory_bandwidth_gbs * (1.0 if sockets == 1 or ranks > 1 else 0.7)
    bw_rank = bw / max(ranks, 1) * min(ranks, sockets) if ranks > 1 else bw
    tflops_rank = cpu.bf16_tflops / max(ranks, 1) * min(ranks, sockets) if ranks > 1 else cpu.bf16_tflops
    if fmt == "fp32" or (rest == "fp32" and fmt in ("bf16", "fp16")):
        tflops_rank /= 2
    est = _estimate(spec, w, bw_rank, tflops_rank, FLAVOURS[(engine, "cpu")], req.concurrency, workload(req).kv_tokens,
                    kv_token / ranks, layout, (math.inf, RANK_LATENCY_S) if ranks > 1 else (math.inf, 0.0),
                    host=True) if fits else Estimate()
    if fits and engine == "ipex" and spec.is_moe:
        low = low_bit_bytes(spec, "sym_int4", rest)
        fast = _estimate(spec, low, bw, cpu.bf16_tflops, FLAVOURS[("ipex-llm", "cpu")], req.concurrency, workload(req).kv_tokens,
                         kv_token, layout, (math.inf, 0.0), host=True)
        reasons.append(f"--dtype int4 would run ipex-llm sym_int4 ({low.total / GiB:.1f} GiB) at about "
                       f"{fast.decode_tok_s:.1f} tok/s, lossy; planned in {fmt} because quantization was not asked for")
    env = {"OMP_NUM_THREADS": str(max(1, cpu.physical_cores // max(ranks, 1)))}
    if engine == "deepspeed-autotp":
        env.update({"LOCAL_SIZE": str(ranks), "DS_ACCELERATOR": "cpu"})
    return Plan(
        model=spec.name, backend="intel", engine=engine, fits=fits, parallel=layout,
        devices=(DeviceUse("cpu", "cpu", ram / GiB, weights / GiB, kv / GiB, (act + runtime) / GiB),),
        offload=Offload(), context=context,
        max_context=_max_context(spec, ram - weights - act - runtime, kv_token, req, context),
        concurrency=req.concurrency, dtype=fmt, kv_dtype=kv_dtype, estimate=est, reasons=tuple(reasons),
        config={"device": "cpu", "low_bit": fmt if engine == "ipex-llm" else None, "dtype": fmt, "torch_dtype": rest,
                "ranks": ranks, "tp": ranks, "pp": 1, "threads": cpu.physical_cores, "env": env},
    )


# --- speed ----------------------------------------------------------------------------------------
def _estimate(spec: ModelSpec, w: Bytes, bw_gbs: float, tflops: float, flavour: Flavour, concurrency: int,
              kv_tokens: float, kv_token: float, layout: Parallel, link: tuple[float, float],
              host: bool = False) -> Estimate:
    """Batch-`concurrency` decode step: every rank streams its share of the weights touched; PP stages run
    one after another for a batch (no micro-batching in ipex-llm's generate); TP adds two all-reduces per layer."""
    batch = concurrency
    experts = w.experts * experts_touched(spec, batch) / spec.moe.num_experts if spec.moe else 0.0
    stream = (w.non_expert + experts + w.head) / layout.tp
    kv_read = batch * kv_tokens * kv_token
    t_mem = (stream + kv_read) / (max(bw_gbs, 1.0) * 1e9 * flavour.bw_eff)
    flops = 2 * spec.active_params() * batch / layout.tp
    t_compute = flops / (max(tflops, 0.05) * 1e12 * COMPUTE_EFFICIENCY)
    bw, latency = link
    t_comm = 0.0
    if layout.tp > 1:
        msg = batch * spec.hidden_size * 2
        t_comm = 2 * spec.num_layers * (latency + 2 * msg * (layout.tp - 1) / layout.tp / (bw * 1e9))
    if layout.pp > 1:
        t_comm += (layout.pp - 1) * (RANK_LATENCY_S + batch * spec.hidden_size * 2 / (bw * 1e9))
    step = max(t_mem, t_compute) + t_comm + spec.num_layers * flavour.layer_s + GENERATE_STEP_S
    where = "host RAM bandwidth" if host else "XPU memory bandwidth"
    bound = where if t_mem >= max(t_compute, t_comm, spec.num_layers * flavour.layer_s) else (
        "compute" if t_compute >= max(t_comm, spec.num_layers * flavour.layer_s) else
        "rank communication" if t_comm >= spec.num_layers * flavour.layer_s else "per-layer overhead")
    prefill = max(tflops, 0.05) * 1e12 * COMPUTE_EFFICIENCY * layout.tp / (2 * spec.active_params())
    return Estimate(decode_tok_s=1 / step, throughput_tok_s=batch / step, prefill_tok_s=prefill, bound=bound,
                    basis=BASIS)


def _max_context(spec: ModelSpec, room: float, kv_token: float, req: Request, context: int) -> int:
    if room <= 0 or kv_token <= 0:
        return 0 if room <= 0 else spec.max_position
    return max(0, min(spec.max_position, int(room / (kv_token * req.concurrency))))


def _format_note(fmt: str, spec: ModelSpec) -> str:
    if fmt in ("bf16", "fp16"):
        return f"weights unquantized ({fmt})"
    return (f"{fmt} costs {LOW_BIT_BYTES[fmt]:.4f} B/weight ({LOW_BIT_BYTES[fmt] * 8:.2f} bits: ggml blocks of 64 with "
            f"scales); linears and the LM head are quantized, the embedding stays 16-bit; lossy vs {stored_dtype(spec)}")


def _unfit(spec: ModelSpec, hw: HardwareProfile, req: Request, engine: str, why: str) -> Plan:
    return Plan(model=spec.name, backend="intel", engine=engine, fits=False, reasons=(why,),
                context=req.context or 0, concurrency=req.concurrency, hardware=hw.name)
