"""The workload a plan is judged by, and the estimate it gets for it. Pure.

A request says how long prompts and answers are and how many sequences run together; every engine's speed
model gives two times for it (one decode step at that concurrency, and the time until every prompt has
its first token), and `estimate` turns them into what a user feels: time to first token, time per output
token, request latency and throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .plan import Estimate, Plan, Request

# What a request leaves open. Chat-sized prompts and answers (the serving benchmark's 1024 / 256).
DEFAULT_PROMPT_TOKENS = 1024
DEFAULT_OUTPUT_TOKENS = 256
# Tokens per sequence every backend plans for when the request names no context (each may hold less
# where the KV cache would not fit, and says so); never below MIN_CONTEXT unless the model is shorter.
DEFAULT_CONTEXT = 32768
MIN_CONTEXT = 4096
GOALS = ("latency", "throughput")
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights made from config.json, as vLLM's load_format
DUMMY_WARNING = ("random weights (--load-format dummy): every answer is noise; for benchmarks, never for "
                 "real use")
# Qwen's tokenizer (transformers' fast tokenizer), per prompt token, paid by every engine behind
# Engine.generate: the median of Engine.generate minus the engine's own call over the 24 TTFT rows of
# bench/side_by_side.py (both engines, 512-8192 tokens, one H200 host, docs/results/h200_side_by_side).
TOKENIZE_S = 4.5e-6


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    output_tokens: int
    concurrency: int
    goal: str  # "latency": a request's whole time; "throughput": output tokens per second

    @property
    def kv_tokens(self) -> float:
        """Tokens a sequence's cache holds on average while it decodes."""
        return self.prompt_tokens + self.output_tokens / 2


def workload(req: Request) -> Workload:
    """The request's workload; lengths it leaves open are the chat defaults, shortened to fit a context it
    names (an answer of at most a quarter of it, the prompt the rest)."""
    goal = req.goal or ("latency" if req.concurrency == 1 else "throughput")
    answer = req.output_tokens or DEFAULT_OUTPUT_TOKENS
    if req.context and not req.output_tokens:
        answer = max(1, min(answer, req.context // 4, req.context - (req.prompt_tokens or 0)))
    prompt = req.prompt_tokens or DEFAULT_PROMPT_TOKENS
    if req.context and not req.prompt_tokens:
        prompt = max(1, min(prompt, req.context - answer))
    return Workload(prompt, answer, req.concurrency, goal)


def default_context(max_position: int, w: Workload) -> int:
    """The context a plan is sized for when the request names none."""
    return min(max_position, max(DEFAULT_CONTEXT, w.prompt_tokens + w.output_tokens))


def context_floor(max_position: int, w: Workload) -> int:
    """The shortest context a backend may shrink an open request's to (to keep its weights on the GPU):
    MIN_CONTEXT, and never less than a prompt and its answer."""
    return min(max_position, max(MIN_CONTEXT, w.prompt_tokens + w.output_tokens))


def shortest(make: Callable[[int], Plan], context: int, floor: int, spills: Callable[[Plan], bool]) -> Plan:
    """`make(context)`, or, when that plan spills (does not fit, or puts weights where they are slow) and the
    request left the context open (`floor` < `context`), `make` at the longest context down to `floor`
    that does not, saying what the longer one would have cost."""
    plan = make(context)
    if floor >= context or not spills(plan):
        return plan
    lo, hi, best = -(-floor // 1024), context // 1024 - 1, None
    while lo <= hi:  # fewer tokens per sequence only ever need less memory: bisect
        mid = (lo + hi) // 2
        trial = make(max(floor, mid * 1024))
        if spills(trial):
            hi = mid - 1
        else:
            best, lo = trial, mid + 1
    if best is None:  # no context avoids it: the shortest moves the fewest weights, or shows the least it needs
        least = make(floor)
        note = ("no context keeps this plan's weights where they run fast, and the shortest moves the fewest"
                if least.fits else f"it does not fit even with a {floor}-token context")
        return least.replace(reasons=least.reasons + (f"context {floor} (not {context}): {note}; pass --context "
                                                      f"{context} to insist",))
    cost = (f"; at {context} tokens {plan.offload.cpu_gib + plan.offload.disk_gib:.1f} GiB of weights would be "
            f"offloaded" if plan.fits else f"; {context} tokens do not fit")
    return best.replace(reasons=best.reasons + (
        f"context {best.context} (not {context}): the longest at which this plan keeps its weights where they "
        f"run fast{cost}; pass --context {context} to insist",))


def estimate(step_s: float, ttft_s: float, w: Workload, bound: str, basis: tuple[str, ...] = (),
             rows: int | None = None, busy: int = 1, tokenize: bool = True, continuous: bool = False) -> Estimate:
    """What a user sees of an engine that decodes one step of `rows` sequences (default: all of them) in
    `step_s`, with `busy` such groups side by side (data parallel), and gives every prompt of its group its
    first token after `ttft_s` (plus the tokenizer's time for them, unless `tokenize` is false).

    Time per output token is what a serving client measures (vLLM's benchmark: a request's time from its first
    token to its last over the tokens after the first), for the median request. An engine that batches
    `continuous`ly puts prompts in between decode steps, so a request that has its first token waits through the
    passes of the prompts that go in after it: the median one through half of the others'. A static batch
    decodes once every prompt is in: its time per output token is the step."""
    rows = rows or w.concurrency
    ttft = ttft_s + (TOKENIZE_S * w.prompt_tokens * rows if tokenize else 0.0)
    decoding = max(0, w.output_tokens - 1)
    latency = ttft + decoding * step_s
    others = ttft * (rows - 1) / rows / 2 if continuous and decoding else 0.0
    return Estimate(
        decode_tok_s=1.0 / step_s,
        throughput_tok_s=rows * busy / step_s,
        prefill_tok_s=w.prompt_tokens * rows / ttft if ttft > 0 else 0.0,
        bound=bound,
        ttft_s=ttft,
        tpot_s=step_s + others / max(1, decoding),
        latency_s=latency,
        total_tok_s=w.output_tokens * rows * busy / latency,
        basis=tuple(basis),
    )


def in_waves(at: Callable[[int], Estimate], rows: int, w: Workload) -> Estimate:
    """The estimate for `w.concurrency` sequences through an engine whose KV cache holds `rows` of them at once
    (the others wait for its pages): `at(n)` is its estimate for n sequences at once. Output tokens per second
    over all of them count the waves one after another (the last one of what is left); the rest is the first
    wave's."""
    first = at(rows)
    if rows >= w.concurrency:
        return first
    full, rest = divmod(w.concurrency, rows)
    span = full * first.latency_s + (at(rest).latency_s if rest else 0.0)
    return replace(first, total_tok_s=w.output_tokens * w.concurrency / span)


def from_rates(e: Estimate, w: Workload) -> Estimate:
    """An estimate that gives only rates (a third-party backend's): its workload figures from them."""
    if e.tpot_s or e.decode_tok_s <= 0:
        return e
    step = 1.0 / e.decode_tok_s
    rows = max(1, round(e.throughput_tok_s * step)) if e.throughput_tok_s else 1
    ttft = w.prompt_tokens * rows / e.prefill_tok_s if e.prefill_tok_s > 0 else 0.0
    basis = e.basis or ("the backend's own decode and prefill rates",)
    return estimate(step, ttft, w, e.bound, basis, rows=rows, tokenize=False)


def trade_off(best: Estimate, other: Estimate, best_name: str, other_name: str, w: Workload) -> str:
    """How `other` compares with the chosen plan for this workload, in numbers."""
    lead = (f"with {w.prompt_tokens}-token prompts and {w.output_tokens}-token answers at concurrency "
            f"{w.concurrency},")
    parts = []
    if other.ttft_s and best.ttft_s:
        if other.ttft_s < best.ttft_s * 0.95:
            parts.append(f"{other_name} reaches the first token {best.ttft_s / other.ttft_s:.1f}x sooner "
                         f"({other.ttft_s * 1e3:.0f} vs {best.ttft_s * 1e3:.0f} ms)")
        elif other.ttft_s > best.ttft_s * 1.05:
            parts.append(f"{best_name} reaches the first token {other.ttft_s / best.ttft_s:.1f}x sooner "
                         f"({best.ttft_s * 1e3:.0f} vs {other.ttft_s * 1e3:.0f} ms)")
    if other.decode_tok_s and best.decode_tok_s:  # the decode steps (time per token also holds prompt passes)
        mine, theirs = 1 / best.decode_tok_s, 1 / other.decode_tok_s
        if theirs < mine * 0.98:
            parts.append(f"{other_name} decodes {mine / theirs:.2f}x faster "
                         f"({theirs * 1e3:.1f} vs {mine * 1e3:.1f} ms per step)")
        elif theirs > mine * 1.02:
            parts.append(f"{best_name} decodes {theirs / mine:.2f}x faster "
                         f"({mine * 1e3:.1f} vs {theirs * 1e3:.1f} ms per step)")
    return "; ".join(parts + [lead + " " + verdict(best, other, best_name, w)])


def verdict(best: Estimate, other: Estimate, best_name: str, w: Workload) -> str:
    """The goal's figure of the chosen plan against another's."""
    if w.goal == "throughput" and other.total_tok_s >= best.total_tok_s * 0.995 or (
            w.goal == "latency" and other.latency_s <= best.latency_s * 1.005):
        same = (f"{best.total_tok_s:.0f} against {other.total_tok_s:.0f} output tok/s" if w.goal == "throughput"
                else f"{best.latency_s:.2f} s per request either way")
        return f"as fast: {same}, so the plan on fewer GPUs or with less offloaded is taken"
    if w.goal == "throughput":
        return f"{best_name} gives {best.total_tok_s:.0f} output tok/s against {other.total_tok_s:.0f}"
    return (f"{best_name} finishes a request in {best.latency_s:.2f} s against {other.latency_s:.2f} s "
            f"({other.latency_s - best.latency_s:.2f} s sooner)")
