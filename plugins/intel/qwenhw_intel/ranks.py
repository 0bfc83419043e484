"""Multi-rank engines (DeepSpeed AutoTP, ipex-llm pipeline parallel) driven through the Engine protocol.

qwenhw starts `torchrun --nproc_per_node N -m qwenhw_intel.ranks` in the intel environment. Rank 0 speaks
qwenhw's worker protocol (JSON lines, qwenhw/engine/worker.py) on its stdin/stdout, which torchrun lets the
ranks inherit; it broadcasts every request to the other ranks over a gloo group, so all ranks run the same
generate() in lockstep (tensor-parallel all-reduces need every rank) and only rank 0 answers. Sampled
requests without a seed get one here, so every rank draws the same tokens. A cancelled stream runs to
its max_tokens on the ranks (see _Broadcast.fileno).
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
from pathlib import Path
from typing import Any, Iterator

from qwenhw.engine.base import Engine
from qwenhw.engine.worker import WorkerEngine


def launch_env(plan: Any) -> dict[str, str]:
    """Environment of a rank job: the plan's variables, rendezvous, and DeepSpeed's CPU comm settings."""
    from qwenhw.tiny import default_cache

    ranks = int(plan.config["ranks"])
    env = {k: str(v) for k, v in plan.config.get("env", {}).items()}
    env.setdefault("LOCAL_SIZE", str(ranks))  # DeepSpeed's CPU shm all-reduce; rank 0 segfaults without it
    env.setdefault("TORCH_EXTENSIONS_DIR", str(default_cache() / "torch_extensions"))  # shm op: built once
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env["QWENHW_RANK_JOB"] = "1"  # tells load_in_process to build this rank's share
    env["QWENHW_RANK_BACKEND"] = "ccl" if plan.config.get("device") == "xpu" else "gloo"
    if plan.config.get("device") != "xpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


class RankEngine(WorkerEngine):
    """Parent-side proxy: a WorkerEngine whose worker is rank 0 of a torchrun job."""

    def __init__(self, plan: Any, python: str, timeout: float = 900.0):
        Engine.__init__(self, plan)
        ranks = int(plan.config["ranks"])
        env = {**os.environ, **launch_env(plan), "PYTHONUNBUFFERED": "1"}
        roots = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[1])]
        env["PYTHONPATH"] = os.pathsep.join(roots + [env.get("PYTHONPATH", "")])  # qwenhw + this plugin
        cmd = [python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "qwenhw_intel.ranks"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
                                     env=env, bufsize=1)
        self._io = threading.Lock()
        reply = self._call({"op": "load", "plan": plan.to_dict()})
        self.info = {**reply.get("info", {}), "ranks": ranks}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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
    sampling = msg.get("sampling")
    if sampling is not None and sampling.get("seed") is None and sampling.get("temperature", 1.0) > 0:
        sampling["seed"] = random.randrange(2**31)
        return json.dumps(msg) + "\n"
    return line


def main() -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    backend = os.environ.get("QWENHW_RANK_BACKEND", "gloo")
    if backend == "ccl":
        import oneccl_bindings_for_pytorch  # noqa: F401 - registers the ccl backend (XPU builds only)
    dist.init_process_group(backend)  # env:// rendezvous from torchrun; DeepSpeed reuses this group
    control = dist.new_group(backend="gloo", timeout=timedelta(days=7))  # idle engines wait here
    from qwenhw import plugins
    from qwenhw.engine.worker import serve

    import qwenhw_intel

    if "intel" not in plugins.load().backends:  # plugin not installed in this env: register it directly
        plugins.register_plugin(qwenhw_intel, "qwenhw-intel")
    channel = sys.stdout if rank == 0 else open(os.devnull, "w")
    sys.stdout = sys.stderr  # library prints must not reach the protocol channel
    try:
        serve(_Broadcast(rank, control), channel)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
