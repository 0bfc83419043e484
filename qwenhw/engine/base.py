"""One protocol for every backend: generate, stream, chat (thinking on/off), close.

A backend engine implements `_complete` (and `_stream` if it can stream natively) over prompt strings and a
`render_chat` that applies Qwen3's chat template. Chat, modes, sampling defaults and the reasoning split
live here once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .thinking import SAMPLING, StreamSplitter, resolve_mode, split_reasoning


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # go on past end-of-turn tokens up to max_tokens (vLLM's; for benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "stop" | "length"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Piece:
    """Text generated for one prompt (`row`) of `Engine.stream_batch`. A row's last piece has `finish`
    ("stop" | "length") and the row's completion tokens."""

    row: int
    text: str
    finish: str | None = None
    tokens: int = 0


@dataclass(frozen=True)
class ChatResult:
    content: str
    reasoning: str
    text: str  # raw generated text
    thinking: bool  # whether this turn was in thinking mode
    prompt: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    token_ids: tuple[int, ...] = field(default=(), repr=False)


# Continuous batching: asked between decode steps with the number of free rows, returns the (prompt,
# sampling) pairs that take them (Engine.stream_batch)
Join = Callable[[int], list[tuple[str, Sampling]]]


class Engine:
    """Base engine. Thread-safe: one generation at a time (requests queue, never interleave)."""

    def __init__(self, plan: Any = None):
        self.plan = plan
        self._lock = threading.Lock()
        self.closed = False
        self.info: dict[str, Any] = {}  # what the loaded engine reports of itself (kernels, load times, ...)

    # --- what a backend implements ----------------------------------------------------------------
    def _complete(self, prompts: list[str], sampling: Sampling) -> list[Completion]:
        raise NotImplementedError

    def _stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        """Yield text deltas. Default: one chunk (backends override to stream token by token)."""
        yield self._complete([prompt], sampling)[0].text

    def render_chat(self, messages: list[dict], enable_thinking: bool | None) -> str:
        """Apply the model's chat template (`enable_thinking` left out when None)."""
        raise NotImplementedError

    @property
    def model_thinking(self) -> str:
        spec = getattr(self.plan, "spec", None) or {}
        return spec.get("thinking", "hybrid") if isinstance(spec, dict) else "hybrid"

    # --- the protocol -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """Complete raw prompts. One prompt string or a list; always returns a list."""
        self._check_open()
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = Sampling(max_tokens, temperature, top_p, top_k, tuple(stop or ()), seed)
        with self._lock:
            return self._complete(batch, sampling)

    def stream(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        self._check_open()
        sampling = Sampling(max_tokens, temperature, top_p, top_k, tuple(stop or ()), seed)
        with self._lock:
            yield from self._stream(prompt, sampling)

    @property
    def max_batch(self) -> int:
        """Sequences this engine decodes together: a server batches concurrent requests up to this many."""
        return 1

    def batch_key(self, sampling: Sampling) -> Any:
        """Requests whose keys are equal may share a batch: the same sampling, and no seed (a seeded request
        draws alone, so it gives what it gives alone)."""
        if sampling.greedy:
            return "greedy", sampling.ignore_eos
        if sampling.seed is not None:
            return object()
        return sampling.temperature, sampling.top_p, sampling.top_k, sampling.ignore_eos

    @property
    def continuous(self) -> bool:
        """Whether stream_batch takes `join`: rows that join a running batch as others finish."""
        return False

    def stream_batch(self, prompts: Sequence[str], samplings: Sequence[Sampling],
                     alive: Callable[[int], bool] | None = None, stream: bool = True,
                     join: Join | None = None) -> Iterator[Piece]:
        """Generate for several prompts, together where the engine can (`max_batch`), as pieces of text
        tagged with their prompt's row; each row ends with one piece that has `finish`. A row whose
        `alive(row)` turns false is dropped (its client left). stream=False: whole texts are enough, which
        lets an engine without batched streaming give exact token counts. `join` (an engine that is
        `continuous`; others never call it): asked between steps with the number of free rows, it returns
        prompts (of this batch's `batch_key`) that join at once, their rows numbered on after the ones before."""
        self._check_open()
        rest = {"join": join} if join is not None and self.continuous else {}
        with self._lock:
            yield from self._stream_batch(list(prompts), list(samplings), alive or (lambda row: True), stream,
                                          **rest)

    def _stream_batch(self, prompts: list[str], samplings: list[Sampling], alive: Callable[[int], bool],
                      stream: bool) -> Iterator[Piece]:
        """Default: one prompt after another. Streamed rows count their tokens by tokenizing the text (exact
        for ordinary text); hitting max_tokens means "length"."""
        for row, (prompt, sampling) in enumerate(zip(prompts, samplings)):
            if not alive(row):
                continue
            if not stream:
                out = self._complete([prompt], sampling)[0]
                yield Piece(row, out.text, out.finish_reason, out.completion_tokens)
                continue
            parts: list[str] = []
            deltas = self._stream(prompt, sampling)
            try:
                for text in deltas:
                    parts.append(text)
                    yield Piece(row, text)
                    if not alive(row):
                        break
            finally:
                deltas.close()  # stops the generation of a row nobody reads
            if alive(row):
                text = "".join(parts)
                n = min(self.count_tokens(text) if text else 0, sampling.max_tokens)
                yield Piece(row, "", "length" if n >= sampling.max_tokens else "stop", n)

    def chat_prompt(self, messages: list[dict], thinking: bool | None = None) -> tuple[str, bool]:
        """The rendered prompt and whether the turn thinks."""
        thinks, flag = resolve_mode(thinking, messages, self.model_thinking)
        return self.render_chat(messages, flag), thinks

    def chat_sampling(self, thinks: bool, max_tokens: int, **overrides: Any) -> Sampling:
        """Qwen's sampling defaults for the turn's mode, with the caller's non-None overrides."""
        values = dict(SAMPLING[thinks])
        values.update({k: v for k, v in overrides.items() if v is not None})
        stop = tuple(values.pop("stop", None) or ())
        return Sampling(max_tokens=max_tokens, stop=stop, **values)

    def _prepare_chat(self, messages, thinking, max_tokens, temperature, top_p, top_k, stop, seed):
        """The rendered prompt, whether the turn thinks, and its sampling (Qwen's defaults for that mode)."""
        self._check_open()
        prompt, thinks = self.chat_prompt(messages, thinking)
        sampling = self.chat_sampling(thinks, max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                       stop=stop, seed=seed)
        return prompt, thinks, sampling

    def chat(
        self,
        messages: list[dict],
        thinking: bool | None = None,
        max_tokens: int = 1024,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> ChatResult:
        """One assistant turn. `thinking` None follows /think and /no_think and the model's default.

        Sampling defaults follow Qwen's advice for the turn's mode; pass temperature=0 for greedy.
        """
        prompt, thinks, sampling = self._prepare_chat(messages, thinking, max_tokens, temperature, top_p, top_k,
                                                      stop, seed)
        with self._lock:
            out = self._complete([prompt], sampling)[0]
        parts = split_reasoning(out.text)
        return ChatResult(
            content=parts.content,
            reasoning=parts.reasoning,
            text=out.text,
            thinking=thinks,
            prompt=prompt,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            finish_reason=out.finish_reason,
            token_ids=out.token_ids,
        )

    def chat_stream(
        self,
        messages: list[dict],
        thinking: bool | None = None,
        max_tokens: int = 1024,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[tuple[str, str]]:
        """Yield ("reasoning" | "content", text) pieces as they are generated."""
        prompt, thinks, sampling = self._prepare_chat(messages, thinking, max_tokens, temperature, top_p, top_k,
                                                      stop, seed)
        # Thinking-2507 templates open <think> in the prompt: the stream starts inside the reasoning
        splitter = StreamSplitter(in_reasoning=prompt.rstrip().endswith("<think>"))
        with self._lock:
            for delta in self._stream(prompt, sampling):
                yield from splitter.feed(delta)
        yield from splitter.flush()

    # --- lifecycle --------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What /health reports: "ok", and what an engine adds (a cluster's nodes, ...)."""
        return {"status": "closed" if self.closed else "ok"}

    def kv_cache(self) -> dict[str, float] | None:
        """The KV cache now, for /metrics: {"usage": the share sequences hold, "preemptions": sequences that gave
        theirs back for others so far, and with prefix caching "prefix_queries" / "prefix_hits": prompt tokens
        looked up / found}; None where the engine does not say."""
        return None

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this engine is closed; load the model again with qwenhw.load()")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # engines hold GPU memory and worker processes: release them
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass
