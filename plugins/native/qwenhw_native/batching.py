"""Continuous batching over a Runtime (Runtime.stream_batch): requests in line, a row for each as rows free up and
(a paged KV cache) as the pool has its prompt's pages; one bounded prompt pass and one decode step per turn, the
decode steps asynchronous (the next launched before the tokens of the one before are handed out); pages for the
answers as they grow, the newest sequence preempted where none is left; clients that leave, dropped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .sampling import SampleParams, sample_rows

if TYPE_CHECKING:
    from .runtime import Runtime

@dataclass
class Filling:
    """A prompt going into its row of the cache: the tokens of it already in."""

    row: int
    ids: list[int]
    done: int = 0


# what stream_batch yields: (sequence, token, whether it is the sequence's last)
Piece = tuple[int, int, bool]

# a decode step in flight: its decoding rows, their sequences' numbers, the token of every row it computed (by
# row), and the event after which those are on the host (None on the CPU, where they already are)
_Step = tuple[list[int], list[int], torch.Tensor, Any]


@dataclass
class Sequence:
    """A request, waiting or in a row of the batch: its number in the pieces, its prompt, the tokens sampled
    (a preempted sequence goes in again as prompt + these) and the most it may take."""

    id: int
    ids: list[int]
    limit: int
    out: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.out)


class ContinuousBatch:
    """One stream_batch call's state: the line of waiting sequences, the sequence in each row, the prompts going
    in, each row's next input token (on the device) and the decode step in flight."""

    def __init__(self, rt: "Runtime", prompts: list[list[int]], max_new: list[int], params: SampleParams,
                 eos: set[int], alive: Callable[[int], bool] | None,
                 join: Callable[[int], list[tuple[list[int], int]]] | None):
        self.rt, self.params, self.eos, self.alive, self.join = rt, params, eos, alive, join
        self.gen = None
        if params.seed is not None:
            self.gen = torch.Generator(device=rt.device).manual_seed(params.seed)
        self.waiting: list[Sequence] = []
        self.seqs: list[Sequence | None] = [None] * rt.batch
        self.filling: list[Filling] = []
        self.numbered = 0
        self.tokens = torch.zeros(rt.batch, dtype=torch.long, device=rt.device)
        self.pending: _Step | None = None  # a decode step in flight (asynchronous steps)
        rt.reset()
        self.queue(zip(prompts, max_new))

    def queue(self, pairs: Any) -> None:
        """Requests in line, numbered on; each may take what its row's cache holds after its prompt."""
        for ids, most in pairs:
            self.waiting.append(Sequence(self.numbered, ids, min(most, self.rt.max_len - len(ids))))
            self.numbered += 1

    def leave(self, r: int) -> None:
        self.seqs[r] = None
        self.rt.release(r)
        self.filling[:] = [f for f in self.filling if f.row != r]

    def emit(self, rows: list[int], logits: torch.Tensor) -> Iterator[Piece]:
        sampled = sample_rows(logits, self.params, self.gen)
        for r, token in zip(rows, sampled.tolist()):
            s = self.seqs[r]
            if s is None or not self.rt.active[r]:  # a row of a decode step that does not decode
                continue
            yield from self.take(r, s, token)
        if rows == list(range(len(rows))):  # a decode step's
            self.tokens[:len(rows)] = sampled
        else:  # prompts that went in
            self.tokens[torch.tensor(rows, device=self.rt.device)] = sampled

    def take(self, r: int, s: Sequence, token: int) -> Iterator[Piece]:
        if self.alive is not None and not self.alive(s.id):
            self.leave(r)
            return
        s.out.append(token)
        last = token in self.eos or s.count >= s.limit
        if last:
            self.leave(r)
        yield s.id, token, last

    def ending(self, step: _Step | None) -> list[int]:
        """The rows whose token in `step` is their sequence's last by count."""
        if step is None:
            return []
        return [r for r, sid in zip(*step[:2]) if (s := self.seqs[r]) is not None and s.id == sid
                and s.count + 1 >= s.limit]

    def launch(self, before: _Step | None) -> _Step | None:
        """The next decode step, sampled on the device into `tokens`, its tokens copied to the host as it ends;
        the step before it still in flight (`before`): a row whose token there is its last by count decodes no
        further (its cache may hold no more)."""
        rt = self.rt
        for r in self.ending(before):
            rt.active[r] = False
        if not any(rt.active):
            return None
        rows = [r for r, on in enumerate(rt.active) if on]
        ids = [self.seqs[r].id for r in rows]
        logits = rt.decode(self.tokens)
        sampled = sample_rows(logits, self.params, self.gen)
        self.tokens[:len(sampled)] = sampled
        if not sampled.is_cuda:
            return rows, ids, sampled, None
        # every computed row's token (picking the rows on the device would copy their numbers there from
        # pageable memory: a stream sync, this step's launch waiting for it to end)
        host = sampled.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return rows, ids, host, done

    def settle(self, step: _Step | None) -> Iterator[Piece]:
        """A decode step's tokens once it is done, to the sequences its rows held when it launched (a row whose
        sequence ended meanwhile, at its EOS, computed a token that goes nowhere)."""
        if step is None:
            return
        rows, ids, host, done = step
        if done is not None:
            done.synchronize()
        picked = host.tolist()  # one per computed row
        for r, sid in zip(rows, ids):
            token = picked[r]
            s = self.seqs[r]
            if s is not None and s.id == sid:
                yield from self.take(r, s, token)

    def settle_pending(self) -> Iterator[Piece]:
        yield from self.settle(self.pending)
        self.pending = None

    def room(self) -> Iterator[Piece]:
        """Every row that decodes next holds the page of the slot it writes: oldest sequences first, the newest
        giving theirs back where the pool has none (after the step in flight has handed out its tokens, which
        they compute again)."""
        rt = self.rt
        stopping = set(self.ending(self.pending))
        for r in sorted((r for r, on in enumerate(rt.active) if on), key=lambda r: self.seqs[r].id):
            while rt.active[r] and r not in stopping and not rt.grow(r):
                if self.pending is not None:
                    yield from self.settle_pending()
                    continue
                victim = max((q for q, s in enumerate(self.seqs) if s is not None and rt.cache.held[q]),
                             key=lambda q: self.seqs[q].id)
                s = self.seqs[victim]
                self.leave(victim)
                self.waiting.insert(0, s)
                rt.preemptions += 1

    def admit(self) -> None:
        """Waiting sequences into the free rows, in order, while rows are free and (a paged cache) the head's
        prompt's pages are: a later, shorter request does not pass it."""
        rt = self.rt
        free = [r for r, s in enumerate(self.seqs) if s is None]
        if free and not self.waiting and self.join is not None:
            self.queue(self.join(len(free)))
        while free and self.waiting:
            s = self.waiting[0]
            if self.alive is not None and not self.alive(s.id):  # its client left while it waited
                self.waiting.pop(0)
                continue
            ids = s.ids + s.out  # a preempted sequence's tokens so far go in again with its prompt
            if len(ids) < rt.max_len and not rt.admits(len(ids) + 1):
                break
            self.waiting.pop(0)
            r = free.pop(0)
            self.seqs[r] = s
            self.filling.append(Filling(r, ids))
            rt._check(self.filling)
            rt.admit(r, len(ids) + 1)

    def run(self) -> Iterator[Piece]:
        rt = self.rt
        while True:
            if (self.waiting or self.join is not None) and self.ending(self.pending):  # their rows take prompts
                yield from self.settle_pending()                                       # in this pass, not one
            if rt.cache.paged:                                                         # step later
                yield from self.room()
            self.admit()
            if not self.filling and not any(rt.active) and self.pending is None:
                return
            decoded = False
            if self.filling:
                yield from self.settle_pending()  # who decodes must be known before a pass that carries them
                rows, logits, decoded = rt.fill_and_decode(self.filling, self.tokens)
                if rows:
                    yield from self.emit(rows, logits)
            for r, s in enumerate(self.seqs):  # clients that left while the step's tokens went out
                if s is not None and self.alive is not None and not self.alive(s.id):
                    self.leave(r)
            if any(rt.active) and not decoded and rt.kernels.async_steps:
                # the next step goes to the GPU before this one's tokens are handed out: the host's work
                # (sampling's sync, text, the server) overlaps the next step's kernels
                before, self.pending = self.pending, None
                self.pending = self.launch(before)
                yield from self.settle(before)
            elif any(rt.active) and not decoded:
                logits = rt.decode(self.tokens)
                yield from self.emit(list(range(len(logits))), logits)
            else:
                yield from self.settle_pending()
