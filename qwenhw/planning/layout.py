"""GPU layouts (TP/PP/DP/EP), their per-GPU memory and speed. Pure functions over sizes.

Backends call these with their own rules (utilisation caps, overheads, which layouts they can run) and
their own fitted constants (qwenhw.planning.speed); nothing here knows about a particular engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

from ..hardware.profile import Accelerator, HardwareProfile, Node
from ..models import memory as mm
from ..models.spec import ModelSpec
from . import speed
from .plan import Parallel
from .speed import DecodeFit, PrefillFit

# Fraction of the bf16 peak a decode step's matrix products would reach where compute, not memory, bounds
# it (no measured row is: up to 64 sequences of 30B-A3B the bytes dominate by 10x)
COMPUTE_EFFICIENCY = 0.45
# torch's bf16 matrix-vector products on the CPU (batch-1 decode) stream weights at ~21 GB/s on a 16-core
# Sapphire Rapids host whose profile estimates 128 GB/s: a shared, measured efficiency for every backend's
# CPU roofline (docs/benchmarks.md, 2026-11-27 H100-host run)
CPU_TORCH_GEMV_EFFICIENCY = 0.17
ALLREDUCE_LATENCY_S = 12e-6  # per all-reduce, NVLink; PCIe is slower (see link_latency)


@dataclass(frozen=True)
class Shard:
    """Bytes one GPU holds under a layout (the fullest rank)."""

    weights: float  # resident weight bytes
    kv_per_token: float  # KV bytes per token on one rank
    state_per_seq: float  # fixed per-sequence state (Qwen3-Next linear attention)


@dataclass(frozen=True)
class DecodeTime:
    step_s: float  # one decode step of every sequence of a replica
    rows: int  # sequences one replica decodes together
    busy: int  # replicas with sequences to decode
    bound: str


def powers_of_two(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out


def candidate_layouts(spec: ModelSpec, hardware: HardwareProfile, expert_parallel: bool = True) -> Iterator[Parallel]:
    """Every TP x PP x DP (x EP) that uses whole nodes or a power-of-two slice of one node.

    TP stays within a node (it all-reduces twice per layer); PP may span nodes.
    """
    nodes = len(hardware.nodes)
    per_node = min(len(n.accelerators) for n in hardware.nodes) if nodes else 0
    if per_node == 0:
        return
    seen = set()
    for used in powers_of_two(per_node):
        node_counts = [1] if used < per_node else list(range(1, nodes + 1))
        for n_nodes in node_counts:
            world = used * n_nodes
            for tp in powers_of_two(used):
                for pp in [p for p in range(1, world // tp + 1) if (world // tp) % p == 0]:
                    if n_nodes > 1 and pp % n_nodes:
                        continue  # a PP stage must not straddle nodes
                    dp = world // (tp * pp)
                    eps = [1]
                    if spec.is_moe and expert_parallel and tp * dp > 1:
                        eps.append(tp * dp)
                    for ep in eps:
                        layout = Parallel(tp=tp, pp=pp, dp=dp, ep=ep)
                        if layout not in seen:
                            seen.add(layout)
                            yield layout


def head_rules(spec: ModelSpec, tp: int) -> str | None:
    """Why attention cannot be split `tp` ways, or None."""
    if spec.num_heads % tp:
        return f"{spec.num_heads} attention heads are not divisible by TP={tp}"
    return None


def kv_replication(spec: ModelSpec, tp: int) -> int:
    """How many ranks hold a copy of each KV head (1 when TP <= KV heads)."""
    return max(1, tp // spec.num_kv_heads)


def shard(spec: ModelSpec, layout: Parallel, kv_dtype: str = "bf16") -> Shard:
    wb = mm.weight_bytes_split(spec)
    tp, pp = layout.tp, layout.pp
    # Embedding and LM head are vocab-parallel over TP; with PP the first stage holds one, the last the other.
    emb = wb.embeddings / tp
    if pp > 1 and not spec.tie_embeddings:
        emb /= 2
    experts = wb.experts / (layout.ep if layout.ep > 1 else tp)
    weights = (wb.non_expert / tp + experts) / pp + emb
    # TP beyond the KV-head count replicates heads: each rank still holds one whole head
    kv_heads_per_rank = max(1, spec.num_kv_heads // tp)
    kv = mm.kv_bytes_per_token(spec, kv_dtype) * kv_heads_per_rank / spec.num_kv_heads / pp
    state = mm.linear_state_bytes_per_seq(spec) / tp / pp
    return Shard(weights=weights, kv_per_token=kv, state_per_seq=state)


def streamed_bytes(spec: ModelSpec, layout: Parallel, batch: int) -> float:
    """Weight bytes one rank reads per decode step: its non-expert slice, the LM head slice and the
    experts the batch's tokens are routed to (uniform routing; real checkpoints are more skewed)."""
    wb = mm.weight_bytes_split(spec)
    head = wb.embeddings if spec.tie_embeddings else wb.embeddings / 2
    total = wb.non_expert / layout.tp / layout.pp + head / layout.tp
    if spec.moe is not None:
        total += rank_experts(spec, batch, layout.tp, layout.ep) * mm.expert_bytes(spec) * spec.num_moe_layers \
            / layout.pp
    return total


def experts_touched(spec: ModelSpec, tokens: int) -> float:
    """Expected distinct experts a layer reads for `tokens` tokens routed uniformly.

    >>> from qwenhw.models.spec import ModelSpec, MoE
    >>> s = ModelSpec("x", "x", "qwen3_moe", 2048, 48, 32, 4, 128, 6144, 151936, 40960, moe=MoE(128, 8, 768))
    >>> round(experts_touched(s, 1), 3), round(experts_touched(s, 16), 1)
    (8.0, 82.4)
    """
    m = spec.moe
    if m is None:
        return 0.0
    return m.num_experts * (1.0 - (1.0 - m.top_k / m.num_experts) ** tokens)


def busiest_rank_experts(spec: ModelSpec, tokens: int, ranks: int) -> float:
    """Expected distinct experts the busiest of `ranks` expert-parallel ranks (E / ranks whole experts each)
    reads in a layer for `tokens` tokens routed uniformly. A step waits for that rank, not the average one:
    at 16 tokens over 4 ranks 23.4 experts where the average is 20.6 (each expert taken as touched alone,
    with experts_touched's probability; the rank's count binomial).

    >>> from qwenhw.models.spec import ModelSpec, MoE
    >>> s = ModelSpec("x", "x", "qwen3_moe", 2048, 48, 32, 4, 128, 6144, 151936, 40960, moe=MoE(128, 8, 768))
    >>> round(busiest_rank_experts(s, 16, 4), 1), round(experts_touched(s, 16) / 4, 1)
    (23.4, 20.6)
    """
    m = spec.moe
    if m is None:
        return 0.0
    if ranks <= 1:
        return experts_touched(spec, tokens)
    n = m.num_experts // ranks
    p = experts_touched(spec, tokens) / m.num_experts
    cdf, expected = 0.0, 0.0
    for x in range(n):  # E[max] = sum over x of P(max > x), max of `ranks` independent binomials
        cdf += math.comb(n, x) * p ** x * (1.0 - p) ** (n - x)
        expected += 1.0 - min(cdf, 1.0) ** ranks
    return expected


def dealt_rank_experts(spec: ModelSpec, tokens: int, ranks: int) -> float:
    """Expected experts the busiest of `ranks` ranks reads in a layer when every rank holds every expert and
    the touched ones are dealt out in turn: ceil(touched / ranks), the touched count binomial (one token
    touches exactly top_k).

    >>> from qwenhw.models.spec import ModelSpec, MoE
    >>> s = ModelSpec("x", "x", "qwen3_moe", 2048, 48, 32, 4, 128, 6144, 151936, 40960, moe=MoE(128, 8, 768))
    >>> round(dealt_rank_experts(s, 16, 4), 1), round(dealt_rank_experts(s, 1, 2), 1)
    (21.0, 4.0)
    """
    m = spec.moe
    if m is None:
        return 0.0
    if tokens <= 1:
        return float(-(-m.top_k // ranks))
    p = experts_touched(spec, tokens) / m.num_experts
    return sum(math.comb(m.num_experts, n) * p ** n * (1.0 - p) ** (m.num_experts - n) * -(-n // ranks)
               for n in range(m.num_experts + 1))


def rank_experts(spec: ModelSpec, tokens: int, tp: int, ep: int, dealt: bool = False) -> float:
    """Experts' worth of weights one rank reads in a layer for `tokens` tokens: with every expert on every
    rank (`dealt`), its turn of the touched ones; the busiest rank's whole experts under expert parallelism
    (ep > 1); else its 1/tp share of every expert touched."""
    if dealt:
        return dealt_rank_experts(spec, tokens, tp)
    return busiest_rank_experts(spec, tokens, ep) if ep > 1 else experts_touched(spec, tokens) / tp


def link_between(node: Node, tp: int) -> tuple[float, float]:
    """(bandwidth GB/s, latency s) of the slowest link among the first `tp` GPUs of a node."""
    if tp <= 1:
        return math.inf, 0.0
    bws = []
    for a in range(tp):
        for b in range(a + 1, tp):
            link = node.link(a, b)
            bws.append(link.bandwidth_gbs if link else 16.0)  # no link recorded: PCIe through the host
    bw = min(bws) if bws else 16.0
    latency = ALLREDUCE_LATENCY_S if bw >= 100 else 30e-6
    return bw, latency


def decode_step(spec: ModelSpec, layout: Parallel, gpu: Accelerator, node: Node, concurrency: int,
                kv_tokens: float, kv_dtype: str, fit: DecodeFit, network_gbs: float = 0.0) -> DecodeTime:
    """One decode step of a GPU layout under an engine's fitted constants (`fit`), and what bounds it.

    Each rank streams its weights and KV share; TP all-reduces twice per layer, expert parallel exchanges
    tokens twice per MoE layer. With PP, up to PP micro-batches are in flight (vLLM's virtual engines): a
    sequence advances once per pass through all stages, and each stage runs one micro-batch at a time, so
    micro-batching pays off only where a stage is compute-bound.
    """
    sh = shard(spec, layout, kv_dtype)
    batch = max(1, math.ceil(concurrency / layout.dp))
    micro = math.ceil(batch / min(batch, layout.pp))  # sequences per micro-batch
    bw, latency = link_between(node, layout.tp)
    # expert parallel exchanges tokens among all TP x DP ranks (of one node here), not only the TP group
    ep_bw, ep_latency = link_between(node, min(layout.ep, len(node.accelerators))) if layout.ep > 1 else (bw, latency)
    layers = spec.num_layers / layout.pp
    nbytes = streamed_bytes(spec, layout, micro) + micro * kv_tokens * sh.kv_per_token
    t_mem = speed.layers_time(fit, gpu.bandwidth_gbs, layers, micro, nbytes)
    flops = 2 * spec.active_params() * micro / (layout.tp * layout.pp)
    t_compute = flops / (max(gpu.bf16_tflops, 1.0) * 1e12 * COMPUTE_EFFICIENCY)
    t_comm = 0.0
    if layout.tp > 1:
        msg = micro * spec.hidden_size * 2
        t_comm = 2 * layers * (latency + 2 * msg * (layout.tp - 1) / layout.tp / (bw * 1e9))
    if layout.ep > 1 and spec.moe is not None:
        msg = micro * spec.hidden_size * 2 * spec.moe.top_k
        t_comm += 2 * spec.num_moe_layers / layout.pp * (ep_latency + msg / (ep_bw * 1e9))
    stage = max(t_mem, t_compute) + t_comm
    if layout.pp > 1 and network_gbs and len(node.accelerators) < layout.world:
        stage += micro * spec.hidden_size * 2 / (network_gbs * 1e9) + 20e-6
    busy = min(layout.dp, math.ceil(concurrency / batch))  # DP replicas without a sequence add nothing
    bound = ("GPU memory bandwidth and per-layer launches" if t_mem >= max(t_compute, t_comm) else
             "compute" if t_compute >= t_comm else "GPU links")
    return DecodeTime(fit.step_s + stage * layout.pp, batch, busy, bound)


def prefill_time(spec: ModelSpec, layout: Parallel, gpu: Accelerator, node: Node, concurrency: int,
                 prompt_tokens: int, fit: PrefillFit, passes: Callable[[int, int], list[speed.Pass]]) -> float:
    """Until every prompt of `concurrency` arriving together has its first token: each replica prefills its
    share in the passes its engine cuts (`passes(prompts, tokens)`); TP splits each layer's matrices and
    all-reduces twice per layer; the passes pipeline through PP stages."""
    rows = max(1, math.ceil(concurrency / layout.dp))
    cut = passes(rows, prompt_tokens)
    t = speed.prefill(fit, spec, gpu.bf16_tflops, cut, rows, split=layout.tp)
    if layout.tp > 1:
        bw, latency = link_between(node, layout.tp)
        for p in cut:
            msg = p.tokens * spec.hidden_size * 2
            t += 2 * spec.num_layers * (latency + 2 * msg * (layout.tp - 1) / layout.tp / (bw * 1e9))
    if layout.pp > 1:
        t *= (len(cut) + layout.pp - 1) / (len(cut) * layout.pp)
    return t
