"""Plans of the native backend: qwenhw's own engine on one GPU, tensor parallel, replicas, the MoE hybrid. Pure.

Memory: qwenhw.planning.footprint, plus what the runtime holds (a KV cache per runtime it builds,
limits.runtime_batches: static, or one pool in pages for several sequences on one GPU, `kv_pool`; activations for
the largest prefill pass, limits.PREFILL_TOKENS). Speed: the shared mechanisms (qwenhw.planning.speed) with this
engine's fitted constants (speed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qwenhw.hardware.profile import GiB, HardwareProfile, Node
from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec
from qwenhw.planning import footprint as fp
from qwenhw.planning import speed as mechanisms
from qwenhw.planning.layout import experts_touched, prefill_time, rank_experts
from qwenhw.planning.placement import place
from qwenhw.planning.plan import DeviceUse, Estimate, Offload, Parallel, Plan, Request
from qwenhw.planning.precision import stored_dtype
from qwenhw.planning.workload import Workload, context_floor, default_context, estimate, in_waves, shortest, workload

from . import speed
from .engines import RANK_ENGINES, Engine
from .config import NativeConfig
from .limits import (ARCHITECTURES, PAGE, PREFILL_CHUNK, PREFILL_THRESHOLD, PREFILL_TOKENS, fuses_reduce,
                     pages_for, pass_budgets, runtime_batches, split_counts)

# Routing statistics for the hybrid's static expert cache come from a short, varied prompt.
CALIBRATION_PROMPT = (
    "You are a helpful assistant. Explain step by step how to compute 17 * 23, then write a Python function "
    "that checks whether a string is a palindrome, summarise the causes of the French Revolution in three "
    "sentences, and translate 'good morning, how are you?' into German, Spanish and Chinese."
)


def plans(spec: ModelSpec, hw: HardwareProfile, req: Request) -> list[Plan]:
    node = hw.node
    asked = (req.engine or "").split(":")[0]
    forced = Engine(asked) if asked in {e.value for e in Engine} else None
    if spec.architecture not in ARCHITECTURES:
        return [_unfit(spec, hw, req, forced or Engine.ONE_GPU, f"the native engine runs {', '.join(ARCHITECTURES)} "
                       f"models (transformers' modules of those), not {spec.architecture}")]
    if req.dtype in ("fp8", "int4", "int8"):
        return [_unfit(spec, hw, req, forced or Engine.ONE_GPU, f"the native engine runs bf16/fp16 weights, not "
                       f"{req.dtype}; use --backend vllm for {req.dtype}, or --dtype bf16")]
    dtype = "bf16" if spec.quant.method is not None and req.dtype in (None, "auto") else (req.dtype or "auto")
    context = req.context or default_context(spec.max_position, workload(req))
    kv_dtype = "bf16" if req.kv_dtype in (None, "auto") else req.kv_dtype
    floor = context_floor(spec.max_position, workload(req)) if req.context is None else context
    gpus = node.gpus("nvidia") or node.gpus("intel")
    if not gpus:
        if forced in (Engine.ONE_GPU, Engine.HYBRID):  # the lean runtime on the CPU: how CI checks it token for token
            return [cpu_plan(spec, hw, req, dtype, context, kv_dtype, forced)]
        return []
    out = [shortest(lambda c: one_gpu_plan(spec, hw, req, dtype, c, kv_dtype), context, floor, lambda p: not p.fits)]
    if spec.is_moe and not out[0].fits:
        out.append(hybrid_plan(spec, hw, req, dtype, context, kv_dtype))
    n = 2
    while n <= len(gpus):
        tp = 1
        while tp <= n:  # n // tp replicas of tp GPUs: pure DP (tp=1) ... pure TP+EP (tp=n)
            out.append(shortest(lambda c, n=n, tp=tp: parallel_plan(spec, hw, req, dtype, c, kv_dtype, n, tp),
                                context, floor, lambda p: not p.fits))
            tp *= 2
        n *= 2
    if req.load_format == "dummy":
        out = [_without_dummy(p) if p.fits and p.engine in RANK_ENGINES else p for p in out]
    return out


def _without_dummy(p: Plan) -> Plan:
    return p.replace(fits=False, estimate=Estimate(), reasons=(
        f"{p.engine} cannot run random weights (--load-format dummy): each rank reads its slices of the "
        "checkpoint; the one-GPU and hybrid engines can",) + p.reasons)


def one_gpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int,
                 kv_dtype: str) -> Plan:
    """Everything on one GPU: one CUDA graph per decode step over transformers' modules, the decode
    projections, attention, router and experts on our Triton kernels. Several sequences: their KV cache in
    pages (kv_cache.py), a pool of what memory is left (`kv_pool`); one: a static cache. The largest prompt
    pass whose activations leave the pool room for every sequence of the workload at once (limits.pass_budgets);
    where none does, the smallest, and the sequences the pool cannot hold wait for pages (vLLM's admission)."""
    c = req.concurrency or 1
    m = None
    for budget in pass_budgets():
        trial = _one_gpu_memory(spec, hw, req, dtype, context, kv_dtype, budget)
        if m is None or trial.fits or not m.fits:  # the smallest budget's, while none fits (the most room)
            m = trial
        if trial.fits and trial.rows >= c:
            break
    b, wb, per_token, pool, kv, room, fits, budget = m.b, m.wb, m.per_token, m.pool, m.kv, m.room, m.fits, m.budget
    node, gpu, served, cap, act = b.node, b.gpu, b.served, b.cap, b.act
    dev = gpu.device_id
    w = workload(req)
    # pages go to a sequence as its answer grows (Runtime.stream_batch): on average it holds its prompt and half
    # its answer, so more run at once than the pool holds whole
    running = min(c, max(m.rows, pool // (pages_for(int(w.kv_tokens)) * PAGE))) if pool else m.rows
    if room <= 0:
        why = (f"KV cache ({kv / GiB:.1f} GiB) and activations ({act / GiB:.1f} GiB) alone exceed the "
               f"{cap / GiB:.1f} GiB GPU budget: lower --context or --concurrency")
    elif not fits:
        why = (f"weights ({wb.total / GiB:.1f} GiB) exceed the {room / GiB:.1f} GiB the GPU has left beside the "
               f"KV cache and activations")
    else:
        held = (f"{m.rows} of the {c} sequences of the workload's {reach(context, w)} tokens at once (~{running} as "
                f"pages go to answers as they grow), the others waiting for pages" if m.rows < c else
                f"{c} sequences of the workload's {reach(context, w)} tokens, or fewer longer ones")
        cache = f"KV cache in pages ({pool} tokens: {held}, up to {context} each)" if pool else "static KV cache"
        why = (f"everything fits on {dev} ({wb.total / GiB:.1f} GiB of weights): {cache} and one CUDA graph "
               "per decode step over transformers' modules, decode on qwenhw's Triton kernels")
        if budget < PREFILL_TOKENS:
            why += (f"; prompt passes of at most {budget} tokens (activations {act / GiB:.1f} GiB), so that "
                    f"{m.rows} sequences' KV cache fits")
    fixed = wb.total + act + fp.CUDA_CONTEXT
    if pool:  # the longest context one sequence of the pool may take
        max_context = _longest(lambda n: pages_for(n) * PAGE * per_token <= cap - fixed, served.max_position)
    else:
        max_context = fp.context_fit(fixed, per_token, cap, served, sum(runtime_batches(req.concurrency)))
    return Plan(
        model=spec.name, backend="native", engine=Engine.ONE_GPU, fits=fits, parallel=Parallel(),
        devices=(DeviceUse(dev, f"{gpu.vendor}-gpu", cap / GiB, wb.total / GiB, kv / GiB,
                           (act + fp.CUDA_CONTEXT) / GiB),),
        context=context, max_context=max_context,
        concurrency=req.concurrency, dtype=stored_dtype(served), kv_dtype=kv_dtype,
        estimate=(in_waves(lambda n: _one_gpu_estimate(served, gpu, replace(w, concurrency=n), kv_dtype, budget),
                           running, w) if fits else Estimate()),
        reasons=(why,), config=NativeConfig(dtype=stored_dtype(served), main_device=dev, threads=node.cpu.physical_cores,
                                            prefill_tokens=budget, kv_tokens=pool,
                                            prefix_caching=req.prefix_caching).to_dict(),
    )


@dataclass(frozen=True)
class _Memory:
    """A one-GPU plan's memory at one prompt-pass budget."""

    budget: int
    b: fp.OneGpu
    wb: mm.WeightBytes
    per_token: float  # KV bytes per token
    pool: int  # the paged pool's slots (0: a static cache)
    kv: float  # KV bytes: the pool, or the static caches
    room: float  # what the GPU has left for the weights
    fits: bool
    rows: int  # sequences of the workload the cache holds at once


def _one_gpu_memory(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str,
                    budget: int) -> _Memory:
    """Weights, KV and activations of a one-GPU plan whose prompt passes hold `budget` tokens."""
    c = req.concurrency or 1
    paged = c > 1
    b = fp.one_gpu(spec, hw, req, dtype, context, kv_dtype, PREFILL_CHUNK, 0 if paged else sum(runtime_batches(c)),
                   budget)
    per_token = mm.kv_bytes_per_token(b.served, kv_dtype)
    wb = mm.weight_bytes_split(b.served)
    pool = kv_pool(b.cap - wb.total - b.kv - b.act - fp.CUDA_CONTEXT, per_token, context, c) if paged else 0
    kv = b.kv + pool * per_token
    room = b.cap - kv - b.act - fp.CUDA_CONTEXT
    rows = min(c, pool // (pages_for(reach(context, workload(req))) * PAGE)) if paged else c
    return _Memory(budget, b, wb, per_token, pool, kv, room, room > 0 and wb.total <= room, max(rows, 1))


def reach(context: int, w: Workload) -> int:
    """The most slots one of the workload's sequences takes: its prompt and whole answer (at most the context)."""
    return min(context, w.prompt_tokens + w.output_tokens)


def kv_pool(room: float, per_token: float, context: int, rows: int) -> int:
    """The paged pool a plan gives the batched runtime: what `room` bytes hold, in pages, at least one sequence
    of the whole context (a sequence waits until its pages are free: a pool of less would never take one that
    long) and at most every row at the whole context (more would never be used)."""
    one, most = pages_for(context) * PAGE, rows * pages_for(context) * PAGE
    held = int(room // per_token) // PAGE * PAGE if per_token > 0 else most
    return max(one, min(most, held))


def _longest(ok, top: int) -> int:
    """The largest context in [0, top] for which ok(context) holds (ok is monotone: true, then false)."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _one_gpu_estimate(spec: ModelSpec, gpu, w: Workload, kv_dtype: str, budget: int = PREFILL_TOKENS) -> Estimate:
    rows = w.concurrency
    kv_read = rows * w.kv_tokens * mm.kv_bytes_per_token(spec, kv_dtype)
    passes = mechanisms.budget_passes(rows, w.prompt_tokens, PREFILL_CHUNK, budget)
    ttft = mechanisms.prefill(speed.PROMPT_KERNELS_PREFILL, spec, gpu.bf16_tflops, passes, rows)
    step = mechanisms.decode_step(speed.DECODE, gpu.bandwidth_gbs, spec.num_layers, rows,
                                  fp.stream_bytes(spec, rows) + kv_read)
    return estimate(step, ttft, w, "GPU memory bandwidth", (speed.DECODE.source, speed.PROMPT_KERNELS_PREFILL.source),
                    continuous=True)


def hybrid_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str) -> Plan:
    """MoE models on one GPU and the host: every routed expert lives in host RAM and the CPU computes the
    top-k of each token; attention, norms, router and embeddings stay on the GPU with one layer's experts as
    a staging buffer for prompts, and a cache of hot experts in what the GPU has left."""
    b = fp.one_gpu(spec, hw, req, dtype, context, kv_dtype, PREFILL_CHUNK, pass_tokens=PREFILL_TOKENS)
    node, gpu, served, dt, cap, kv, act, ram = b.node, b.gpu, b.served, b.dtype, b.cap, b.kv, b.act, b.ram
    wb = mm.weight_bytes_split(served)
    dev = gpu.device_id
    stage = mm.expert_bytes(served) * served.moe.num_experts
    room = cap - kv - act - fp.CUDA_CONTEXT - stage
    placement = place(served, [(dev, max(room, 0.0)), ("cpu", ram)], experts_last=True)
    cache = 0.0
    if placement is not None:
        for name in placement.device_map:
            if name.endswith(".mlp.experts"):
                placement.device_map[name] = "cpu"
        moved = placement.expert_bytes_on.get(dev, 0.0)
        placement.used[dev] -= moved
        placement.used["cpu"] += moved
        one = mm.expert_bytes(served)
        cache = min(wb.experts, max(0.0, room - placement.used[dev]) // one * one)
    gpu_w = placement.used.get(dev, 0.0) if placement else 0.0
    cpu_w = placement.used.get("cpu", 0.0) if placement else 0.0
    fits = placement is not None and room > 0
    if room <= 0:
        why = (f"KV cache ({kv / GiB:.1f} GiB), activations ({act / GiB:.1f} GiB) and the prefill staging buffer "
               f"({stage / GiB:.1f} GiB) alone exceed the {cap / GiB:.1f} GiB GPU budget: lower --context or "
               "--concurrency")
    elif placement is None:
        why = f"weights ({wb.total / GiB:.1f} GiB) exceed GPU {room / GiB:.1f} + RAM {ram / GiB:.1f} GiB"
    elif cpu_w > ram:
        fits = False
        why = (f"the hybrid engine keeps all routed experts in host RAM: {cpu_w / GiB:.1f} GiB needed, "
               f"{ram / GiB:.1f} GiB available")
    else:
        why = (f"MoE hybrid: attention, norms, router and embeddings on {dev} ({gpu_w / GiB:.1f} GiB); all routed "
               f"experts in host RAM ({cpu_w / GiB:.1f} GiB), only the top-{served.moe.top_k} of each token computed "
               f"by {node.cpu.physical_cores} CPU cores (qwenhw's fused bf16 kernel, built with the system C compiler "
               f"at load; without one, torch GEMVs run ~4x slower); {cache / GiB:.1f} GiB of GPU memory caches the "
               f"most-used experts ({cache / max(wb.experts, 1):.0%} of them)")
    est = _hybrid_estimate(served, node, gpu, workload(req), kv_dtype, cache, wb.experts)
    per_token = mm.kv_bytes_per_token(served, kv_dtype)
    return Plan(
        model=spec.name, backend="native", engine=Engine.HYBRID, fits=fits, parallel=Parallel(),
        devices=(DeviceUse(dev, f"{gpu.vendor}-gpu", cap / GiB, (gpu_w + cache) / GiB, kv / GiB,
                           (act + fp.CUDA_CONTEXT + stage) / GiB), DeviceUse("cpu", "cpu", ram / GiB, cpu_w / GiB)),
        offload=Offload(cpu_gib=cpu_w / GiB, experts_on_cpu=cpu_w > 0, gpu_expert_cache_gib=cache / GiB),
        context=context,
        max_context=fp.context_fit(gpu_w + cache + stage + act + fp.CUDA_CONTEXT, per_token, cap, served,
                                   req.concurrency),
        concurrency=req.concurrency, dtype=dt, kv_dtype=kv_dtype, estimate=est, reasons=(why,),
        config=NativeConfig(dtype=dt, main_device=dev, threads=node.cpu.physical_cores, expert_cache_bytes=int(cache),
                            calibration_prompt=CALIBRATION_PROMPT).to_dict(),
    )


def _hybrid_estimate(spec: ModelSpec, node: Node, gpu, w: Workload, kv_dtype: str, cache: float,
                     experts_total: float) -> Estimate:
    rows = w.concurrency
    kv_read = rows * w.kv_tokens * mm.kv_bytes_per_token(spec, kv_dtype)
    passes = mechanisms.budget_passes(rows, w.prompt_tokens, PREFILL_CHUNK, PREFILL_TOKENS)
    ttft = mechanisms.prefill(speed.PREFILL, spec, gpu.bf16_tflops, passes, rows)
    gpu_bw = gpu.bandwidth_gbs * 1e9 * speed.DECODE.bandwidth
    expert_stream = experts_touched(spec, rows) * mm.expert_bytes(spec) * spec.num_moe_layers
    hit = cache / experts_total if experts_total else 0.0  # uniform routing: hit rate = share cached
    cpu_bw = max(node.cpu.memory_bandwidth_gbs, 1) * 1e9 * speed.HYBRID_CPU_BANDWIDTH
    step = (fp.stream_bytes(spec, rows) - expert_stream + kv_read) / gpu_bw + expert_stream * (1 - hit) / cpu_bw
    # per MoE layer: a host sync and two small copies, and a few CPU kernel launches per expert
    step += spec.num_moe_layers * speed.HYBRID_LAYER_S
    # prompt passes of PREFILL_THRESHOLD tokens or more ship every layer's experts over pinned memory
    shipped = experts_total / (node.host_to_device_gbs * 1e9 * speed.HYBRID_STREAM)
    ttft += sum(shipped if p.tokens >= PREFILL_THRESHOLD else p.tokens * step for p in passes)
    return estimate(step, ttft, w, "host RAM bandwidth (CPU experts)", (speed.HYBRID_SOURCE, speed.PREFILL.source),
                    continuous=True)


def cpu_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str,
             engine: Engine) -> Plan:
    """The lean runtime on the CPU, eagerly (no CUDA graphs, torch's own kernels): asked for by --engine on a
    host without a GPU. Priced as transformers on the CPU (the same weights streamed by torch's GEMVs)."""
    node = hw.node
    if engine == Engine.HYBRID and not spec.is_moe:
        return _unfit(spec, hw, req, engine, "the hybrid engine is for MoE models")
    dt = fp.cpu_dtype(spec, node, dtype)
    served = fp.served_16bit(spec, dt)
    wb = mm.weight_bytes_split(served)
    ram = fp.ram_budget(node, req)
    c = req.concurrency or 1
    paged = engine == Engine.ONE_GPU and c > 1  # a pool of every row at the whole context (RAM is plenty)
    pool = c * pages_for(context) * PAGE if paged else 0
    sequences = sum(runtime_batches(c, paged)) if engine == Engine.ONE_GPU else c
    kv = fp.kv_bytes(served, pool if paged else context, 1 if paged else sequences, kv_dtype)
    act = fp.activation_bytes(served, context, req.concurrency, PREFILL_CHUNK, PREFILL_TOKENS) + fp.CPU_RUNTIME \
        + fp.TOKENIZER
    fits = wb.total + kv + act <= ram
    why = (f"{engine} on the CPU (forced): the lean runtime without CUDA graphs, {node.cpu.physical_cores} physical "
           f"cores, weights in {dt}" if fits else
           f"needs {(wb.total + kv + act) / GiB:.1f} GiB; the host RAM budget is {ram / GiB:.1f} GiB")
    config = NativeConfig(dtype=dt, main_device="cpu", threads=node.cpu.physical_cores, cuda_graphs=False,
                          kv_tokens=pool, prefix_caching=req.prefix_caching).to_dict()
    per_token = mm.kv_bytes_per_token(served, kv_dtype)
    return Plan(
        model=spec.name, backend="native", engine=engine, fits=fits, parallel=Parallel(),
        devices=(DeviceUse("cpu", "cpu", ram / GiB, wb.total / GiB, kv / GiB, act / GiB),), context=context,
        max_context=fp.context_fit(wb.total + act, per_token, ram, served, sequences), concurrency=req.concurrency,
        dtype=dt, kv_dtype=kv_dtype, estimate=fp.cpu_estimate(served, node, workload(req)), reasons=(why,),
        config=config,
    )


# Tensor-parallel replicas keep every expert on every GPU where that fits the plan's memory ("replicated"):
# decode steps deal the touched experts out in turn (kernels/moe.py, `_dealt`), so no GPU waits for the one whose
# experts a batch touched most (16 tokens on 2 GPUs: 41.5 experts per GPU per layer against 43.4)
REPLICATE_EXPERTS = True


def expert_split(spec: ModelSpec, tp: int) -> str:
    """How a tensor-parallel replica of `tp` GPUs holds the routed experts (sharding.py): "ep", whole
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
    `expert_split`'s) cannot use `n` GPUs (sharding.check asks the same of a transformers config)."""
    experts = experts or (expert_split(spec, n) if spec.moe else None)
    return split_counts(spec.num_heads, spec.num_kv_heads, spec.moe.num_experts if experts == "ep" else 0, n,
                        spec.moe.moe_intermediate_size if experts == "tp" else 0)


def parallel_plan(spec: ModelSpec, hw: HardwareProfile, req: Request, dtype: str, context: int, kv_dtype: str,
                  n: int, tp: int | None = None, experts: str | None = None,
                  reduce: speed.ReduceFit = speed.TP_REDUCE) -> Plan:
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
    served = fp.served_16bit(spec, dtype)
    wb = mm.weight_bytes_split(served)
    cap = gpu.memory_bytes * fp.GPU_UTILISATION if req.gpu_memory_gib is None else req.gpu_memory_gib * GiB
    batch = req.concurrency
    per_replica = -(-batch // dp)  # sequences one replica decodes at a time
    kv_share = max(1, spec.num_kv_heads // tp) / spec.num_kv_heads
    kv = fp.kv_bytes(served, context, sum(runtime_batches(per_replica)), kv_dtype) * kv_share
    act = fp.gpu_activation_bytes(served, context, per_replica, PREFILL_CHUNK, PREFILL_TOKENS)
    weights = wb.embeddings + (wb.non_expert + wb.experts) / tp
    overhead = act + fp.CUDA_CONTEXT + (fp.NCCL_BUFFERS if tp > 1 else 0.0)
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
        latency = reduce.fused_s + reduce.push_row_s * per_replica * (tp - 1) if fused else reduce.apart_s
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
        one = _one_gpu_estimate(served, gpu, share, kv_dtype)
        est = estimate(1.0 / one.decode_tok_s, one.ttft_s, w, one.bound, one.basis, rows=per_replica,
                       busy=min(dp, -(-batch // per_replica)), tokenize=False, continuous=True)
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
            return mechanisms.budget_passes(prompts, tokens, PREFILL_CHUNK, PREFILL_TOKENS)

        ttft = prefill_time(served, Parallel(tp=tp, dp=dp), gpu, node, batch, w.prompt_tokens, speed.PREFILL, passes)
        est = estimate(t, ttft, w, "GPU memory bandwidth and per-layer launches",
                       (speed.TP_DECODE.source, speed.PREFILL.source), rows=per_replica,
                       busy=min(dp, -(-batch // per_replica)), continuous=True)
    devices = tuple(DeviceUse(f"cuda:{i}", f"{gpu.vendor}-gpu", cap / GiB, weights / GiB, kv / GiB, overhead / GiB)
                    for i in range(n))
    per_token = mm.kv_bytes_per_token(served, kv_dtype) * kv_share
    return Plan(
        model=spec.name, backend="native", engine=Engine.TENSOR_PARALLEL if dp == 1 else Engine.REPLICAS, fits=fits,
        parallel=Parallel(tp=tp, dp=dp, ep=ep), devices=devices, context=context,
        max_context=fp.context_fit(weights + overhead, per_token, cap, served, per_replica),
        concurrency=batch, dtype=stored_dtype(served), kv_dtype=kv_dtype, estimate=est,
        reasons=tuple(reasons),
        config=NativeConfig(dtype=stored_dtype(served), world=n, tp=tp, experts=experts or None,
                            threads=node.cpu.physical_cores, env={"NCCL_NVLS_ENABLE": "0"}).to_dict(),
    )


def _unfit(spec: ModelSpec, hw: HardwareProfile, req: Request, engine: Engine, why: str) -> Plan:
    return Plan(model=spec.name, backend="native", engine=engine, fits=False, reasons=(why,),
                context=req.context or 0, concurrency=req.concurrency, hardware=hw.name)
