"""Continuous batching over a Runtime (Runtime.stream_batch): requests in line, a row for each as rows free up and
(a paged KV cache) as the pool has its prompt's pages; one bounded prompt pass and one decode step per turn (or a
pass that carries the step), asynchronous: a turn's pass and step go to the GPU before the tokens of the turn
before are handed out; pages for the answers as they grow, the newest sequence preempted where none is left;
clients that leave, dropped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .graphs import to_device
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

# a pass or decode step in flight: the rows it sampled a token for, their sequences' numbers, where each row's
# token is among the ones it computed, those tokens and the event after which they are on the host (None on the
# CPU, where they already are)
_Step = tuple[list[int], list[int], list[int], torch.Tensor, Any]


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
        self.pending: list[_Step] = []  # the turn in flight (asynchronous steps): its pass, its step
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

    def take(self, r: int, s: Sequence, token: int) -> Iterator[Piece]:
        if self.alive is not None and not self.alive(s.id):
            self.leave(r)
            return
        s.out.append(token)
        last = token in self.eos or s.count >= s.limit
        if last:
            self.leave(r)
        yield s.id, token, last

    def ending(self, steps: list[_Step]) -> list[int]:
        """The rows whose tokens in `steps` take their sequence to its limit by count."""
        coming: Counter = Counter()
        for rows, ids, *_ in steps:
            coming.update(r for r, sid in zip(rows, ids) if (s := self.seqs[r]) is not None and s.id == sid)
        return [r for r, n in coming.items() if self.seqs[r].count + n >= self.seqs[r].limit]

    def launch(self, before: list[_Step]) -> list[_Step]:
        """The next turn to the GPU, its tokens sampled on the device into `tokens` and copied to the host as it
        ends: a prompt pass (which may carry the decode step) and the decode step. The turn before is still in
        flight (`before`): a row whose token there is its last by count decodes no further (its cache may hold
        no more), nor does one whose first token in this pass is."""
        rt = self.rt
        for r in self.ending(before):
            rt.active[r] = False
        turn, decoded = self.fill()
        if turn:
            for r in self.ending(before + turn):
                rt.active[r] = False
        if any(rt.active) and not decoded:
            turn.append(self.decode())
        return turn

    def fill(self) -> tuple[list[_Step], bool]:
        """The prompt pass of the prompts going in, if any (carrying the decode step where passes mix): what is
        in flight for the rows that sampled, and whether the rows decoded."""
        if not self.filling:
            return [], False
        rows, logits, decoded = self.rt.fill_and_decode(self.filling, self.tokens)
        if not rows:
            return [], decoded
        return [self.sampled(rows, list(range(len(rows))), logits, to_device(rows, self.rt.device))], decoded

    def decode(self) -> _Step:
        """A decode step of the decoding rows (each computed row's token at its row)."""
        rows = [r for r, on in enumerate(self.rt.active) if on]
        return self.sampled(rows, rows, self.rt.decode(self.tokens))

    def sampled(self, rows: list[int], at: list[int], logits: torch.Tensor,
                where: torch.Tensor | None = None) -> _Step:
        """`logits`' tokens into `tokens` (at rows `where` of it; None: a decode step's, every computed row's) and
        on their way to the host: what is in flight for `rows`, whose tokens are the computed ones `at`. Every
        computed row's token goes to the host (picking the rows on the device would copy their numbers there
        from pageable memory: a stream sync, the next launch waiting for this one to end)."""
        sampled = sample_rows(logits, self.params, self.gen)
        if where is None:
            self.tokens[:len(sampled)] = sampled
        else:
            self.tokens[where] = sampled
        ids = [self.seqs[r].id for r in rows]
        if not sampled.is_cuda:
            return rows, ids, at, sampled, None
        host = sampled.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return rows, ids, at, host, done

    def settle(self, steps: list[_Step]) -> Iterator[Piece]:
        """The tokens of passes and steps once they are done, to the sequences their rows held when they
        launched (a row whose sequence ended meanwhile, at its EOS, computed a token that goes nowhere)."""
        for rows, ids, at, host, done in steps:
            if done is not None:
                done.synchronize()
            picked = host.tolist()
            for r, sid, j in zip(rows, ids, at):
                s = self.seqs[r]
                if s is not None and s.id == sid:
                    yield from self.take(r, s, picked[j])

    def settle_pending(self) -> Iterator[Piece]:
        pending, self.pending = self.pending, []
        yield from self.settle(pending)

    def room(self) -> Iterator[Piece]:
        """Every row that decodes next holds the page of the slot it writes: oldest sequences first, the newest
        giving theirs back where the pool has none (after the step in flight has handed out its tokens, which
        they compute again)."""
        rt = self.rt
        stopping = set(self.ending(self.pending))
        for r in sorted((r for r, on in enumerate(rt.active) if on), key=lambda r: self.seqs[r].id):
            while rt.active[r] and r not in stopping and not rt.grow(r):
                if self.pending:
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
            if len(ids) < rt.max_len and not rt.admits(len(ids) + 1, ids):
                break
            self.waiting.pop(0)
            r = free.pop(0)
            self.seqs[r] = s
            self.filling.append(Filling(r, ids))
            rt._check(self.filling)
            self.filling[-1].done = rt.admit(r, len(ids) + 1, ids)  # from the first token no cached page holds

    def run(self) -> Iterator[Piece]:
        rt = self.rt
        while True:
            if (self.waiting or self.join is not None) and self.ending(self.pending):  # their rows take prompts
                yield from self.settle_pending()                                       # in this pass, not one
            if rt.cache.paged:                                                         # turn later
                yield from self.room()
            self.admit()
            if not self.filling and not any(rt.active) and not self.pending:
                return
            if rt.kernels.async_steps:
                # the next turn goes to the GPU before this one's tokens are handed out: the host's work
                # (sampling's sync, text, the server) overlaps the next turn's kernels
                before, self.pending = self.pending, []
                self.pending = self.launch(before)
                yield from self.settle(before)
            else:
                yield from self.turn()
            for r, s in enumerate(self.seqs):  # clients that left while the turn's tokens went out
                if s is not None and self.alive is not None and not self.alive(s.id):
                    self.leave(r)

    def turn(self) -> Iterator[Piece]:
        """One turn, its tokens handed out as its pass and its step end (asynchronous steps off)."""
        passed, decoded = self.fill()
        yield from self.settle(passed)
        if any(self.rt.active) and not decoded:
            yield from self.settle([self.decode()])
