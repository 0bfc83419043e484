"""Limits the planner and the runtime share: what a plan reserves memory for is what the runtime does.

Pure (no torch): the planner imports it, and so do the runtime and the reducer.
"""

from __future__ import annotations

# The decode loop drives transformers' own modules of these architectures (runtime.py); the hybrid needs
# routed experts as well (the MoE ones).
ARCHITECTURES = ("qwen3", "qwen3_moe", "qwen2")

# Prompts go in passes of up to PREFILL_TOKENS prompt tokens, at most PREFILL_CHUNK of each prompt (a longer
# one takes a chunk per pass, attending to its earlier ones; the last prompt that fits is cut where the pass
# ends; one prompt cut or continued per pass). The planner reserves activations for the largest pass:
# min(concurrency x PREFILL_CHUNK, PREFILL_TOKENS) tokens. While rows decode, one pass of at most
# STEP_PREFILL_TOKENS runs between two decode steps, or (KernelConfig.mixed) carries the step's tokens
# (chunked prefill: a burst of prompts or a long one stalls them for one such pass at a time).
# Where the reserve for PREFILL_TOKENS keeps the requested concurrency off one GPU, the plan takes halves of it
# down to STEP_PREFILL_TOKENS (NativeConfig.prefill_tokens): a burst of prompts then takes more passes (16 x
# 2048 tokens in 4 instead of 1: ~10% later first tokens), against rows that would not fit at all.
PREFILL_CHUNK = 2048
PREFILL_TOKENS = 32768
STEP_PREFILL_TOKENS = 8192


# A paged KV cache (kv_cache.py) hands sequences slots in pages of PAGE: a multiple of the decode-attention
# kernel's chunk (kernels/attention.CHUNK), so that each of its programs reads one page. A sequence wastes less
# than a page (vLLM's 16-slot blocks waste less; its kernels read a table entry per 16 slots).
PAGE = 256


# A paged pool admits a sequence while ADMIT_SPARE of its pages stay free after the prompt's (vLLM's watermark,
# 1%): the rows decoding take a page every PAGE tokens, and a burst of prompts that took the last pages would
# have the next steps preempt them again. A sequence alone always goes in.
ADMIT_SPARE = 0.01


def pages_for(tokens: int, page: int = PAGE) -> int:
    return -(-tokens // page)


def pass_budgets() -> list[int]:
    """The prompt tokens a pass may hold, largest first (PREFILL_TOKENS halved down to STEP_PREFILL_TOKENS)."""
    out = [PREFILL_TOKENS]
    while out[-1] // 2 >= STEP_PREFILL_TOKENS:
        out.append(out[-1] // 2)
    return out

# The hybrid ships a layer's experts to the GPU for batches of at least this many tokens (at prefill sizes
# the GPU's FLOPs win over the CPU's); smaller ones have their experts computed by the CPU.
PREFILL_THRESHOLD = 32

# The fused all-reduce + RMSNorm kernels (reducer.Reducer) send or read rows x (GPUs - 1) rows over NVLink:
# pushing (16-bit models) up to PUSH_MAX_REMOTE_ROWS rows sent (16 rows: 5.1 us on 2 H200s and 7.3 on 4,
# against 11.4 and 12.6 for the one-shot kernel and the norm apart), pulling up to FUSE_MAX_REMOTE_ROWS
# rows read (16 rows on 4 GPUs: 14.8 us). Past them the reduction and the norm run apart.
FUSE_MAX_REMOTE_ROWS = 16
PUSH_MAX_REMOTE_ROWS = 48


def fuses_reduce(rows: int, world: int, push: bool = True) -> bool:
    """Whether a decode step's all-reduce of `rows` sequences over `world` GPUs takes the fused kernel
    (pushing, or `push=False` pulling)."""
    return rows * (world - 1) <= (PUSH_MAX_REMOTE_ROWS if push else FUSE_MAX_REMOTE_ROWS)


def runtime_batches(concurrency: int | None, paged: bool = False) -> list[int]:
    """The runtimes an engine builds: batch 1 (streams, single prompts), and one of the plan's concurrency
    for prompt lists; each holds its own KV cache, which the plan counts. A paged cache's runtime (a plan's
    `kv_tokens`) takes single prompts too (its graph of one row), so it is the only one."""
    n = int(concurrency or 1)
    if paged and n > 1:
        return [n]
    return [1, n] if n > 1 else [1]


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
