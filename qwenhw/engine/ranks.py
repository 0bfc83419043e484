"""Multi-rank engines: a torchrun job driven through the Engine protocol.

A backend whose plan needs one process per GPU (or per CPU socket) starts
`torchrun --nproc_per_node N -m <its rank module>`; that module calls `serve_ranks`. Rank 0 speaks qwenhw's
worker protocol (JSON lines, qwenhw/engine/worker.py) on its stdin/stdout, which torchrun lets the ranks
inherit; it broadcasts every request to the other ranks over a gloo group, so all ranks run the same
generation in lockstep (tensor-parallel all-reduces need every rank) and only rank 0 answers. Sampled
requests without a seed get one here, so every rank draws the same tokens. A cancelled stream runs to its
max_tokens on the ranks (see _Broadcast.fileno). Inside the job QWENHW_RANK_JOB=1 tells the backend's
`load_in_process` to build this rank's share.
"""

from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from typing import Any, Iterator

from .base import Engine, Piece
from .worker import WorkerEngine


class RankEngine(WorkerEngine):
    """Parent-side proxy: a WorkerEngine whose worker is rank 0 of a torchrun job."""

    def __init__(self, plan: Any, python: str, module: str, ranks: int, env: dict[str, str],
                 paths: list[str] = ()):
        Engine.__init__(self, plan)
        env = {**os.environ, **env, "QWENHW_RANK_JOB": "1", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(list(paths) + [env.get("PYTHONPATH", "")])
        cmd = [python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
                                     env=env, bufsize=1)
        self._io = threading.Lock()
        reply = self._call({"op": "load", "plan": plan.to_dict()})
        self.info = {**reply.get("info", {}), "ranks": ranks}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("" = every interface: one that other nodes connect to)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Broadcast:
    """The request stream as every rank sees it: rank 0 reads stdin, the others receive its lines."""

    def __init__(self, rank: int, group: Any):
        self.rank, self.group = rank, group

    def fileno(self) -> int:
        # serve() polls stdin for "cancel" between stream deltas; a rank that stopped alone would leave the
        # others waiting in an all-reduce, so a stream always runs to its end here and "cancel" arrives
        # afterwards as a no-op request (the parent drops the remaining deltas).
        raise io.UnsupportedOperation("rank jobs do not cancel mid-stream")

    def __iter__(self) -> Iterator[str]:
        import torch.distributed as dist

        while True:
            box = [_seeded(sys.stdin.readline()) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0, group=self.group)
            if not box[0]:  # the parent closed the pipe (or died): every rank stops
                return
            yield box[0]


def _seeded(line: str) -> str:
    if not line:
        return ""
    msg = json.loads(line)
    samplings = [msg["sampling"]] if msg.get("sampling") is not None else msg.get("samplings") or []
    unseeded = [s for s in samplings if s.get("seed") is None and s.get("temperature", 1.0) > 0]
    if unseeded:
        seed = random.randrange(2**31)  # one for the whole batch: its rows draw from one generator
        for s in unseeded:
            s["seed"] = seed
        return json.dumps(msg) + "\n"
    return line


def serve_ranks(plugin_module: Any, plugin_name: str, backend: str, dist_backend: str = "gloo") -> None:
    """The body of a rank module: join the job, register the plugin, serve the worker protocol."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group(dist_backend)  # env:// rendezvous from torchrun
    control = dist.new_group(backend="gloo", timeout=timedelta(days=7))  # idle engines wait here
    from .. import plugins
    from .worker import serve

    if backend not in plugins.load().backends:  # plugin not installed in this env: register it directly
        plugins.register_plugin(plugin_module, plugin_name)
    channel = sys.stdout if rank == 0 else open(os.devnull, "w")
    sys.stdout = sys.stderr  # library prints must not reach the protocol channel
    try:
        serve(_Broadcast(rank, control), channel)
    finally:
        dist.destroy_process_group()


class Replicas(Engine):
    """One rank's view of a data-parallel rank job: replica r of R decodes prompts r, r+R, r+2R, ...

    Every rank sees every request (see _Broadcast). A batch is split over the replicas and the lead rank of
    each (its first; the others of a tensor-parallel replica hold the same result) contributes its share to
    an all-gather over `group`, so rank 0 answers with all of them, in order; a streamed batch is split the
    same way, each lead sending its pieces to rank 0 as they come. A single sequence is replica 0's, while
    the others wait for the next request.
    """

    def __init__(self, inner: Engine, replica: int, replicas: int, lead: bool, group: Any):
        super().__init__(inner.plan)
        self.inner, self.replica, self.replicas, self.lead, self.group = inner, replica, replicas, lead, group

    def _complete(self, prompts: list[str], sampling: Any) -> list[Any]:
        import torch.distributed as dist

        mine = list(range(self.replica, len(prompts), self.replicas))
        done = self.inner._complete([prompts[i] for i in mine], sampling) if mine else []
        parts: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, (mine, done) if self.lead else ([], []), group=self.group)
        out: list[Any] = [None] * len(prompts)
        for indices, completions in parts:
            for i, c in zip(indices, completions):
                out[i] = c
        return out

    def _stream(self, prompt: str, sampling: Any) -> Iterator[str]:
        if self.replica == 0:
            yield from self.inner._stream(prompt, sampling)

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch * self.replicas

    def _stream_batch(self, prompts: list[str], samplings: list[Any], alive: Any, stream: bool) -> Iterator[Piece]:
        """A batch is split over the replicas, each replica decoding its share together. Whole texts meet in
        one all-gather at the end; streamed pieces go from each replica's lead to rank 0 as they come
        (`_forward`, `_merged`). A single stream is replica 0's alone."""
        import torch.distributed as dist

        if len(prompts) == 1:
            if self.replica == 0:
                yield from self.inner._stream_batch(prompts, samplings, alive, stream)
            return
        mine = list(range(self.replica, len(prompts), self.replicas))
        own = self.inner._stream_batch([prompts[i] for i in mine], [samplings[i] for i in mine],
                                       lambda row: True, stream) if mine else iter(())
        if stream:
            if self.replica != 0:
                self._forward(own, mine)
            elif self.lead:
                yield from self._merged(own, mine)
            else:
                for _ in own:  # a tensor-parallel member of replica 0: decode in lockstep, answer nothing
                    pass
            return
        texts: dict[int, str] = {i: "" for i in mine}
        ends: dict[int, tuple[str, int]] = {}
        for piece in own:
            texts[mine[piece.row]] += piece.text
            if piece.finish:
                ends[mine[piece.row]] = (piece.finish, piece.tokens)
        parts: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, (texts, ends) if self.lead else ({}, {}), group=self.group)
        for i in range(len(prompts)):
            for done_texts, done_ends in parts:
                if i in done_ends:
                    yield Piece(i, done_texts[i], *done_ends[i])
                    break

    def _forward(self, pieces: Iterator[Piece], rows: list[int]) -> None:
        """A replica other than 0 decodes its rows; its lead sends each piece to rank 0, then None."""
        import torch.distributed as dist

        for piece in pieces:
            if self.lead:
                dist.send_object_list([(rows[piece.row], piece.text, piece.finish, piece.tokens)], dst=0,
                                      group=self.group)
        if self.lead:
            dist.send_object_list([None], dst=0, group=self.group)

    def _merged(self, pieces: Iterator[Piece], rows: list[int]) -> Iterator[Piece]:
        """Rank 0: its own rows' pieces, and the other replicas' as they arrive (one receiving thread per
        replica lead), until every replica has sent its last."""
        import queue

        import torch.distributed as dist

        arrived: queue.Queue = queue.Queue()
        tp = dist.get_world_size(self.group) // self.replicas

        def receive(src: int) -> None:
            while True:
                box: list[Any] = [None]
                dist.recv_object_list(box, src=src, group=self.group)
                arrived.put(box[0])
                if box[0] is None:
                    return

        threads = [threading.Thread(target=receive, args=(r * tp,), daemon=True) for r in range(1, self.replicas)]
        for t in threads:
            t.start()
        waiting = len(threads)

        def take(block: bool) -> list[Piece]:
            """What has arrived (block: wait for at least one piece, unless every replica is done)."""
            nonlocal waiting
            out: list[Piece] = []
            while waiting:
                try:
                    got = arrived.get(block=block and not out)
                except queue.Empty:
                    break
                if got is None:
                    waiting -= 1
                else:
                    out.append(Piece(*got))
            return out

        try:
            for piece in pieces:
                yield Piece(rows[piece.row], piece.text, piece.finish, piece.tokens)
                yield from take(block=False)
            while waiting:
                yield from take(block=True)
        finally:  # the other replicas send up to their None whatever happens here: no thread outlives this batch
            for t in threads:
                t.join()

    def render_chat(self, messages: list[dict], enable_thinking: bool | None) -> str:
        return self.inner.render_chat(messages, enable_thinking)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def close(self) -> None:
        self.inner.close()
        super().close()
