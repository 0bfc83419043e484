"""Speed mechanisms GPU engines share; each engine carries its own fitted constants as data. Pure.

A decode step of `rows` sequences:
    step_s + layers x layer_s + (weight bytes read + KV bytes read) / (datasheet bandwidth x bandwidth)
    [+ layers x row_layer_s for every row past `rows_fused`, where an engine's fused kernels stop, up to
       `rows_wide`, past which its routed experts take the kernels of wide steps: layers x wide_row_layer_s a row]
A prefill (time until every prompt of a batch has its first token) runs the prompts' tokens in passes (an
engine decides how it cuts them: `chunked_passes`, `row_passes`); each pass costs
    layers x pass_layer_s + tokens x token_s + tokens x layer FLOPs / (peak x flops) + attention FLOPs / (peak x attention)
plus call_s once and prompt_s per prompt. The fits (vLLM's, qwenhw's) say which measurement each constant comes from, so a figure
the planner prints can name its source, and a test can build a variant instead of patching a module.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.spec import ModelSpec


@dataclass(frozen=True)
class DecodeFit:
    step_s: float  # per step outside the layers: scheduler, sampler, host round trip
    layer_s: float  # per layer: the launches and latency of its kernels in the captured step
    bandwidth: float  # fraction of the datasheet memory bandwidth that weights and KV stream at
    row_layer_s: float = 0.0  # per layer and per row past `rows_fused`
    rows_fused: int = 0  # rows the engine's fused decode kernels take (beyond: other kernels)
    wide_row_layer_s: float = 0.0  # per layer and per row past `rows_wide` (instead of row_layer_s)
    rows_wide: int = 0  # rows past which the routed experts take the kernels of wide steps (0: never)
    source: str = ""


@dataclass(frozen=True)
class PrefillFit:
    call_s: float  # per batch of prompts: host work around the passes
    pass_layer_s: float  # per forward pass and layer: launches, host syncs (none in a captured graph)
    token_s: float  # per prompt token outside the layers (host-side input handling)
    flops: float  # fraction of the bf16 peak the layers' matrix products reach on prompt tokens
    prompt_s: float = 0.0  # per prompt: its request's own bookkeeping
    graph_tokens: int = 0  # passes of at most this many tokens replay a captured graph (no launch cost)
    attention: float = 0.5  # fraction of the peak for attention FLOPs (not separable in rows up to 8k tokens)
    source: str = ""


@dataclass(frozen=True)
class Pass:
    tokens: int  # tokens the pass computes
    pairs: float  # query-key pairs its causal attention scores (per head and layer)


def layer_flops(spec: ModelSpec) -> float:
    """Matrix FLOPs per token of one average layer (experts counted top_k times; no embeddings)."""
    body = spec.active_params() - spec.embedding_params()
    return 2.0 * body / max(spec.num_layers, 1)


def layers_time(fit: DecodeFit, bandwidth_gbs: float, layers: float, rows: int, nbytes: float) -> float:
    """`layers` layers of a decode step of `rows` sequences that read `nbytes` from GPU memory (step_s apart)."""
    t = layers * fit.layer_s + nbytes / (bandwidth_gbs * 1e9 * fit.bandwidth)
    if fit.row_layer_s and rows > fit.rows_fused:
        slow = min(rows, fit.rows_wide) if fit.rows_wide else rows
        t += layers * fit.row_layer_s * max(slow - fit.rows_fused, 0)
    if fit.rows_wide and rows > fit.rows_wide:
        t += layers * fit.wide_row_layer_s * (rows - fit.rows_wide)
    return t


def decode_step(fit: DecodeFit, bandwidth_gbs: float, layers: float, rows: int, nbytes: float) -> float:
    """One decode step of `rows` sequences over `layers` layers that read `nbytes` from GPU memory."""
    return fit.step_s + layers_time(fit, bandwidth_gbs, layers, rows, nbytes)


def prefill(fit: PrefillFit, spec: ModelSpec, tflops: float, passes: list[Pass], prompts: int = 1,
            layers: float | None = None, split: int = 1) -> float:
    """Seconds until each of `prompts` prompts, cut into `passes`, has its first token; `split`: GPUs sharing
    each layer's matrices (tensor parallel)."""
    layers = spec.num_layers if layers is None else layers
    peak = max(tflops, 1.0) * 1e12
    per_layer = layer_flops(spec) / split
    attn_layers = spec.num_full_attention_layers * layers / max(spec.num_layers, 1)
    attn = 4.0 * spec.num_heads * spec.head_dim / split  # QK^T and PV, per query-key pair and layer
    t = fit.call_s + prompts * fit.prompt_s
    for p in passes:
        if p.tokens > fit.graph_tokens:
            t += layers * fit.pass_layer_s
        t += p.tokens * fit.token_s
        t += p.tokens * per_layer * layers / (peak * fit.flops) + p.pairs * attn * attn_layers / (peak * fit.attention)
    return t


def _causal(start: int, n: int) -> float:
    """Query-key pairs of `n` new tokens after `start` cached ones."""
    return n * start + n * (n + 1) / 2


def chunked_passes(prompts: int, tokens: int, budget: int) -> list[Pass]:
    """vLLM's chunked prefill: steps of up to `budget` tokens, filled from the prompts in order (a prompt
    may be cut between steps)."""
    out: list[Pass] = []
    left, done, row = prompts * tokens, 0, 0
    while left > 0:
        room, n, pairs = budget, 0, 0.0
        while room > 0 and row < prompts:
            take = min(room, tokens - done)
            pairs += _causal(done, take)
            n, room, done = n + take, room - take, done + take
            if done == tokens:
                row, done = row + 1, 0
        out.append(Pass(n, pairs))
        left -= n
    return out


def row_passes(prompts: int, tokens: int, chunk: int) -> list[Pass]:
    """qwenhw's runtime: prompts up to `chunk` tokens in one padded pass together; longer ones one
    sequence and one chunk at a time."""
    if tokens <= chunk:
        return [Pass(prompts * tokens, prompts * _causal(0, tokens))]
    out = []
    for _ in range(prompts):
        for lo in range(0, tokens, chunk):
            n = min(chunk, tokens - lo)
            out.append(Pass(n, _causal(lo, n)))
    return out


def budget_passes(prompts: int, tokens: int, chunk: int, budget: int) -> list[Pass]:
    """qwenhw's native runtime (its Runtime._pieces): passes of up to `budget` prompt tokens, at most `chunk`
    of each prompt, the prompts in order; one prompt at most cut short per pass (a longer one's chunk, or the
    last that fits), whose rest goes first in the next."""
    out: list[Pass] = []
    part, fresh = 0, prompts  # tokens in of the prompt part-way in (0: none); prompts not begun
    while part or fresh:
        room, n, pairs, cut = budget, 0, 0.0, False
        if part:
            take = min(tokens - part, chunk, room)
            pairs, n, room, cut = _causal(part, take), take, room - take, part + take < tokens
            part = (part + take) % tokens
        while fresh and room > 0:
            take = min(tokens, chunk, room)
            if take < tokens and cut:
                break
            pairs, n, room, fresh = pairs + _causal(0, take), n + take, room - take, fresh - 1
            if take < tokens:
                part, cut = take, True
        out.append(Pass(n, pairs))
    return out


def expected_blocks(tokens_per_expert: float, block: int) -> float:
    """Blocks of `block` rows a grouped expert GEMM runs per touched expert (its tokens vary around the mean:
    on average half a block more than the mean needs), at least one."""
    return max(1.0, tokens_per_expert / block + 0.5) if tokens_per_expert > block / 2 else 1.0


# Prompts through transformers' own modules (grouped expert GEMMs, SDPA), one padded pass up to 2048 tokens,
# longer ones a sequence and a chunk at a time, as qwenhw's native engine runs them (bench/side_by_side.py,
# one H200, 2026-12-04, docs/results/h200_side_by_side): 0.90 ms per layer and pass (the grouped GEMM's host
# sync among it), 5.0 us per token and 1.2 ms per prompt outside the layers, the matrix products at 0.26 of
# the bf16 peak. Rows within 16% (512-8192 tokens, alone and 16 at once). The engines that run the same
# modules another way (accelerate's hooks, ZeRO-3's gathered layers) price their prompts with it too.
TRANSFORMERS_PREFILL = PrefillFit(call_s=0.0, pass_layer_s=0.9035e-3, token_s=5.02e-6, flops=0.260, prompt_s=1.178e-3,
                                  source="qwenhw time to first token, 512-8192-token prompts (one H200, 2026-12-04, "
                                         "docs/results/h200_side_by_side)")

