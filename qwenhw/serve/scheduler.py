"""One thread owns the engine; the server's requests are handed to it and read back pieces of text.

Why one thread: the tokenizer is not safe to use from two threads (HF fast tokenizers raise "Already
borrowed"), and an engine decodes one batch at a time anyway. The thread prepares each request (chat
template, token counts, the context check) and then decodes the waiting sequences that may share a batch
together: up to `engine.max_batch` of them with equal `engine.batch_key`. An engine that decodes one
sequence at a time gets them one after another, in arrival order. On an engine that batches continuously
(`engine.continuous`), requests that arrive while a batch runs join it as its rows free up, as long as the
oldest waiting one shares its key (so a request of another sampling waits for the batch to drain, never
longer); on others a batch runs to its end and requests that arrive meanwhile form the next one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable

from ..engine.base import Engine, Piece, Sampling
from .protocol import APIError

log = logging.getLogger("qwenhw.serve")
Prepare = Callable[[Engine], list[tuple[str, Sampling]]]


class ClientGone(Exception):
    """The request left before its answer was complete (the client disconnected)."""


class Job:
    """One HTTP request's sequences. `prepare(engine)`, run on the scheduler's thread, returns a (prompt,
    sampling) per sequence or raises APIError; the request's handler, on the server's event loop, then reads
    Pieces (row = the sequence's index). Use it as a context manager: leaving it (the client went away, an
    error) drops what is left of it, and the engine leaves its rows out from its next step on."""

    def __init__(self, prepare: Prepare, stream: bool, done: Callable[["Job"], None],
                 loop: asyncio.AbstractEventLoop):
        self.prepare = prepare
        self.stream = stream
        self.rows: list[tuple[str, Sampling]] = []
        self.left = False
        self.first_piece: float | None = None  # monotonic time of the first piece (time to first token)
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._done = done

    async def ready(self) -> None:
        """Wait until the scheduler has prepared this job; raise what preparing it raised."""
        kind, value = await self._events.get()
        if kind == "error":
            raise value

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces of every row as they come, until each row's last one (`finish` set)."""
        open_rows = len(self.rows)
        while open_rows:
            kind, value = await self._events.get()
            if kind == "error":
                raise value
            yield value
            open_rows -= value.finish is not None

    def put(self, kind: str, value: Any) -> None:
        """From the scheduler's thread: hand an event to the request's event loop."""
        if kind == "piece" and self.first_piece is None:
            self.first_piece = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server stopped, nobody reads this any more
            pass

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.left:
            self.left = True
            self._done(self)


# requests waiting or decoding at most (the rest get a 503): a waiting request holds only its prompt's ids,
# and a load benchmark sends a burst of hundreds at once (vLLM queues them all)
MAX_QUEUE = 1024


class Scheduler:
    """Jobs in, batches out. `max_queue` bounds the jobs waiting or running (the rest get a 503)."""

    def __init__(self, server: Any, max_queue: int = MAX_QUEUE, window: float = 0.01, max_wait: float = 0.05):
        self.server = server  # its .engine may be attached after the scheduler starts
        self.max_queue = max_queue
        # requests sent together arrive spread over a few ms (and a worker engine takes a round trip to
        # prepare each): a batch starts once none arrived for `window` s, or after `max_wait`, or when full
        self.window, self.max_wait = window, max_wait
        self.batch_sizes: Counter = Counter()  # sequences per batch decoded, for benchmarks and logs
        self.on_batch: Callable[[int], None] | None = None  # told each batch's size (the server's metrics)
        self.busy = threading.Lock()  # held while the engine works (tests hold it to make the engine busy)
        self._cond = threading.Condition()
        self._new: list[Job] = []
        self._rows: list[tuple[Job, int]] = []  # prepared sequences waiting for a batch, in arrival order
        self.active = 0
        self._running: list[tuple[Job, int]] = []  # the rows of the batch decoding now
        self._ended: set[int] = set()  # indexes into _running of the rows whose last piece went out
        self._stopped = False
        threading.Thread(target=self._run, name="qwenhw-scheduler", daemon=True).start()

    def stop(self) -> None:
        """End the thread once the batch it runs is done (the server is closing)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def submit(self, prepare: Prepare, stream: bool) -> Job:
        """Queue a request (from the server's event loop)."""
        with self._cond:
            if self.active >= self.max_queue:
                raise APIError(503, f"The server is busy ({self.active} requests queued); retry later.",
                               code="queue_full")
            job = Job(prepare, stream, self._finished, asyncio.get_running_loop())
            self.active += 1
            self._new.append(job)
            self._cond.notify()
        return job

    @property
    def running(self) -> int:
        """Sequences decoding now (the batch's occupancy)."""
        return sum(1 for k, (job, _) in enumerate(list(self._running)) if k not in self._ended and not job.left)

    @property
    def waiting(self) -> int:
        """Sequences prepared and waiting for a row, and requests not yet prepared."""
        return len(self._rows) + len(self._new)

    def _finished(self, job: Job) -> None:
        with self._cond:
            self.active -= 1

    # --- the engine's thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._new and not self._rows and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
            engine = self.server.engine
            with self.busy:
                try:
                    self._gather(engine)
                    group = self._take(engine) if engine is not None else []
                    if group:
                        self._decode(engine, group)
                except Exception as exc:  # a fault of ours: fail what waits rather than leave it hanging
                    log.exception("scheduler failed")
                    self._fail_waiting(exc)

    def _fail_waiting(self, exc: Exception) -> None:
        with self._cond:
            jobs = {job for job, _ in self._rows} | set(self._new)
            self._rows, self._new = [], []
        for job in jobs:
            job.put("error", exc)

    def _gather(self, engine: Engine | None) -> None:
        """Prepare the new requests; on an engine that batches, go on while more keep arriving."""
        deadline = time.monotonic() + self.max_wait
        while True:
            self._prepare(engine)
            batch = getattr(engine, "max_batch", 1)
            if batch <= 1 or len(self._rows) >= batch or time.monotonic() >= deadline:
                return
            if not self._new:
                time.sleep(self.window)
                if not self._new:
                    return

    def _prepare(self, engine: Engine | None) -> None:
        with self._cond:
            new, self._new = self._new, []
        for job in new:
            try:
                if engine is None or engine.closed:
                    raise APIError(503, "The model is not loaded.", code="model_not_ready")
                job.rows = job.prepare(engine)
            except Exception as exc:  # APIError for the client; anything else is a 500 there
                job.put("error", exc)
                continue
            job.put("ready", None)
            with self._cond:
                self._rows += [(job, i) for i in range(len(job.rows))]

    def _take(self, engine: Engine) -> list[tuple[Job, int]]:
        """The oldest waiting sequence and those that may share its batch."""
        with self._cond:
            rows = [r for r in self._rows if not r[0].left]
            if not rows:
                self._rows = []
                return []
            key = engine.batch_key(rows[0][0].rows[rows[0][1]][1])
            group, rest = rows[:1], []
            for job, i in rows[1:]:
                fits = len(group) < engine.max_batch and engine.batch_key(job.rows[i][1]) == key
                (group if fits else rest).append((job, i))
            self._rows = rest
            return group

    def _joining(self, engine: Engine, key: Any, free: int) -> list[tuple[Job, int]]:
        """Up to `free` sequences that join the running batch: the oldest waiting ones while they share its
        key (one that does not waits at the head until the batch drains)."""
        self._prepare(engine)
        with self._cond:
            self._rows = [r for r in self._rows if not r[0].left]
            take = 0
            while take < min(free, len(self._rows)):
                job, i = self._rows[take]
                if engine.batch_key(job.rows[i][1]) != key:
                    break
                take += 1
            new, self._rows = self._rows[:take], self._rows[take:]
        return new

    def _decode(self, engine: Engine, group: list[tuple[Job, int]]) -> None:
        prompts = [job.rows[i][0] for job, i in group]
        samplings = [job.rows[i][1] for job, i in group]
        stream = any(job.stream for job, _ in group)
        key = engine.batch_key(samplings[0])
        self._running, self._ended = group, set()
        self.batch_sizes[len(group)] += 1
        if self.on_batch is not None:
            self.on_batch(len(group))

        def join(free: int) -> list[tuple[str, Sampling]]:  # between the engine's steps, on this thread
            new = self._joining(engine, key, free)
            if new:
                group.extend(new)
                if self.on_batch is not None:
                    self.on_batch(self.running)
            return [job.rows[i] for job, i in new]

        try:
            for piece in engine.stream_batch(prompts, samplings, lambda row: not group[row][0].left, stream,
                                             join if engine.continuous else None):
                job, i = group[piece.row]
                job.put("piece", Piece(i, piece.text, piece.finish, piece.tokens))
                if piece.finish is not None:
                    self._ended.add(piece.row)
        except Exception as exc:  # an engine fault: every job of the batch reports it; the server goes on
            log.exception("generation failed")
            for job in {job for job, _ in group}:
                job.put("error", exc)
        finally:
            self._running, self._ended = [], set()
