"""Generated tokens as text: stop strings, and incremental decoding for streams (shared by the engines)."""

from __future__ import annotations

from typing import Any

from .base import Completion, Piece, Sampling


def decode(tokenizer: Any, ids: list[int]) -> str:
    """Completion tokens as text: special tokens stay out, streamed or whole (as vLLM's and OpenAI's servers)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string, and whether there was one."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def completion(tokenizer: Any, tokens: list[int], prompt_tokens: int, ends: set[int],
               stop: tuple[str, ...]) -> Completion:
    """A whole completion from its generated tokens: trailing end tokens (EOS, end of turn, padding) dropped,
    the text cut before the first stop string; "stop" if either ended it, else "length"."""
    tokens = list(tokens)
    finish = "length"
    while tokens and tokens[-1] in ends:
        tokens.pop()
        finish = "stop"
    text, stopped = cut_at_stop(decode(tokenizer, tokens), stop)
    return Completion(text, tuple(tokens), prompt_tokens, "stop" if stopped else finish)


class TextStream:
    """One sequence's tokens as text deltas: whole characters only, cut before the first stop string.

    Each token decodes a window of a few tokens, not the whole sequence (the prefix / read offsets of the
    incremental detokenizers in transformers' streamers and vLLM), and stop strings are looked for where the
    new text could complete one, so a long stream costs O(1) per token, not O(length). The last
    (longest stop - 1) characters are held back while a stop string could still be completing, so its
    beginning never goes out. `lazy` (nobody reads the deltas, no stop strings to look for): decode once,
    in rest(). Text as `decode` gives it."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], lazy: bool = False):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.lazy = lazy and not self.stop
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # tokens[prefix:read] decode to text already out; tokens[read:] are new
        self.text = ""  # the text so far, cut at the first stop string once one is found
        self.sent = 0  # characters of `text` handed out
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    def _add(self, new: str) -> None:
        """Append decoded text; cut it at a stop string that ends in it."""
        start = max(0, len(self.text) - self.hold)  # where a stop string ending in `new` can begin
        self.text += new
        if self.stop:
            cut, self.stopped = cut_at_stop(self.text[start:], self.stop)
            self.text = self.text[:start] + cut

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def _window(self, final: bool) -> str | None:
        """The text the tokens past `read` add; None while they end inside a character (unless `final`)."""
        done = self._decode(self.tokens[self.prefix:self.read])
        full = self._decode(self.tokens[self.prefix:])
        if not final and (len(full) <= len(done) or full.endswith("\ufffd")):  # half a character: wait
            return None
        self.prefix, self.read = self.read, len(self.tokens)
        return full[len(done):]

    def feed(self, token: int) -> str:
        self.tokens.append(token)
        if self.lazy or self.stopped:
            return ""
        new = self._window(final=False)
        if new is None:
            return ""
        self._add(new)
        return self._take(len(self.text) if self.stopped else len(self.text) - self.hold)

    def rest(self) -> str:
        """At the end of the sequence: the text held back (a lazy stream's whole text; the end of a character
        still incomplete decodes as the whole sequence's decode would, with a replacement mark)."""
        if self.lazy:
            self.lazy = False
            self._add(self._decode(self.tokens))
        elif not self.stopped and self.read < len(self.tokens):
            self._add(self._window(final=True))
        return self._take(len(self.text))


class RowTexts:
    """The rows of a batch being decoded, token by token, as `Piece`s: an end-of-turn token ends a row
    ("stop"; neither text nor counted), so do its stop strings ("stop") and its max_tokens or the engine's
    `last` ("length"). Rows are numbered from `first` in the pieces."""

    def __init__(self, tokenizer: Any, samplings: list[Sampling], eos: set[int], first: int, stream: bool):
        self.tokenizer, self.stream = tokenizer, stream
        self.texts: list[TextStream] = []
        self.limits: list[int] = []
        self.counts: list[int] = []
        self.ended: list[bool] = []
        self.eos, self.first = eos, first
        self.extend(samplings)

    def extend(self, samplings: list[Sampling]) -> None:
        """More rows, numbered on after the others (rows that joined a running batch)."""
        self.texts += [TextStream(self.tokenizer, s.stop, lazy=not self.stream) for s in samplings]
        self.limits += [s.max_tokens for s in samplings]
        self.counts += [0] * len(samplings)
        self.ended += [False] * len(samplings)

    def add(self, i: int, token: int, last: bool = False) -> Piece | None:
        """Row i's next token: its piece (None while a delta is held back, or after the row ended)."""
        if self.ended[i]:
            return None
        text = self.texts[i]
        if token in self.eos:
            self.ended[i] = True
            return Piece(self.first + i, text.rest(), "stop", self.counts[i])
        self.counts[i] += 1
        delta = text.feed(token)
        if text.stopped or last or self.counts[i] >= self.limits[i]:
            self.ended[i] = True
            return Piece(self.first + i, delta + text.rest(), "stop" if text.stopped else "length", self.counts[i])
        return Piece(self.first + i, delta) if delta else None

    def drop(self, i: int) -> None:
        """Row i's client left: nothing more for it."""
        self.ended[i] = True

    def unended(self) -> list[Piece]:
        """The rows still open when the engine stopped on its own (a length limit): their last pieces."""
        out = []
        for i, ended in enumerate(self.ended):
            if not ended:
                self.ended[i] = True
                out.append(Piece(self.first + i, self.texts[i].rest(), "length", self.counts[i]))
        return out
