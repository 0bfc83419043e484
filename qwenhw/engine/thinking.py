"""Qwen3 thinking mode: which mode a chat turn is in, its sampling defaults, and the reasoning split.

Qwen3's chat template takes `enable_thinking`; with thinking enabled the model also obeys `/think` and
`/no_think` in the latest user turn. Qwen's recommended sampling differs per mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Qwen3 model cards: thinking T=0.6 top_p=0.95 top_k=20; non-thinking T=0.7 top_p=0.8 top_k=20.
SAMPLING = {
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20},
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20},
}

_SWITCH = re.compile(r"(?<![\w/])/(no_think|think)\b")


def soft_switch(messages: list[dict]) -> bool | None:
    """The last /think or /no_think in the latest user message, if any."""
    for message in reversed(messages):
        if message.get("role") == "user":
            found = _SWITCH.findall(str(message.get("content", "")))
            return None if not found else found[-1] == "think"
    return None


def resolve_mode(thinking: bool | None, messages: list[dict], model_thinking: str = "hybrid") -> tuple[bool, bool | None]:
    """(does this turn think, the enable_thinking value to pass to the template or None to leave it out).

    >>> resolve_mode(None, [{"role": "user", "content": "hi /no_think"}])
    (False, None)
    >>> resolve_mode(False, [{"role": "user", "content": "hi /think"}])
    (False, False)
    """
    if model_thinking == "none":
        return False, None
    if model_thinking == "thinking":
        return True, None
    if thinking is not None:
        # enable_thinking=False makes the template close the think block itself: switches are ignored
        return (thinking and soft_switch(messages) is not False), thinking
    switch = soft_switch(messages)
    return (True if switch is None else switch), None


@dataclass(frozen=True)
class Split:
    reasoning: str
    content: str


def split_reasoning(text: str) -> Split:
    """Separate `<think>...</think>` from the answer, as vLLM's Qwen3 reasoning parser does.

    >>> split_reasoning("<think>\\nadd them\\n</think>\\n\\n4")
    Split(reasoning='add them', content='4')
    >>> split_reasoning("still thinking")  # no tags at all: all answer
    Split(reasoning='', content='still thinking')
    >>> split_reasoning("<think>cut off")  # truncated inside the think block
    Split(reasoning='cut off', content='')
    """
    if THINK_CLOSE in text:
        head, _, tail = text.partition(THINK_CLOSE)
        reasoning = head.split(THINK_OPEN, 1)[-1]  # Thinking-2507 templates put <think> in the prompt
        return Split(reasoning.strip(), tail.strip())
    if text.lstrip().startswith(THINK_OPEN):
        return Split(text.lstrip()[len(THINK_OPEN):].strip(), "")
    return Split("", text.strip())


class StreamSplitter:
    """Routes streamed text to 'reasoning' or 'content' as think tags pass by (tags may be split)."""

    def __init__(self, in_reasoning: bool = False):
        self.in_reasoning = in_reasoning
        self.pending = ""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.pending += delta
        out: list[tuple[str, str]] = []
        while self.pending:
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            idx = self.pending.find(tag)
            if idx >= 0:
                if idx:
                    out.append(("reasoning" if self.in_reasoning else "content", self.pending[:idx]))
                self.pending = self.pending[idx + len(tag):]
                self.in_reasoning = not self.in_reasoning
                continue
            keep = _partial_suffix(self.pending, tag)  # might be the start of a tag: wait for more
            emit = self.pending[: len(self.pending) - keep]
            if emit:
                out.append(("reasoning" if self.in_reasoning else "content", emit))
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self.pending = self.pending, ""
        return [("reasoning" if self.in_reasoning else "content", rest)] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
