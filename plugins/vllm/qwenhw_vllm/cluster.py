"""A vllm plan over several nodes of a Ray cluster: the cluster checked against the plan before anything
loads, the other nodes' ranks started through Ray, the nodes watched while the engine runs.

On GPUs vLLM's Ray executor places its workers itself (RAY_ADDRESS points it at the cluster). vLLM's CPU
platform has no Ray executor (its `ray_device_key` is empty: "current platform cpu does not support ray"),
so there its multiprocess executor spans the nodes (`--nnodes`): this process is rank 0, and on every
other node a Ray actor runs the plan's own vllm-serve.sh with that node's NODE_RANK (headless).
Ray is imported here only, in the environment that runs the engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

from qwenhw.errors import BadInput
from qwenhw.hardware.cluster import address as cluster_address
from qwenhw.hardware.cluster import alive_nodes, connect

GiB = 2**30
WATCH_S = 1.0  # how often the nodes are checked while the engine runs
RANK_PREFIX = "qwenhw-rank-"  # the rank actors' names (namespace "qwenhw"): what close() leaves none of


class NodeLost(RuntimeError):
    """A node the plan runs on left the cluster (or its rank stopped)."""


def check(plan: Any, nodes: list[dict], where: str) -> None:
    """The nodes, GPUs or CPUs and memory the plan assumes, or a BadInput naming what is missing."""
    want = len(plan.config.get("nodes") or [])
    if len(nodes) < want:
        have = ", ".join(f"{n['NodeManagerAddress']}" for n in nodes) or "none"
        raise BadInput(f"The plan runs on {want} nodes but the Ray cluster at {where} has {len(nodes)} alive "
                       f"({have}): start the missing ones with `bash ray-cluster.sh worker` (from `qwenhw plan ... "
                       f"--emit DIR`) on each, or plan for this cluster with --hardware cluster.")
    gpus = plan.config.get("gpus_per_node") or 0
    cpus = plan.config.get("cpus_per_node") or 0
    ram = (plan.config.get("ram_per_node_gib") or 0) * GiB
    for i, node in enumerate(nodes[:want]):
        res = node.get("Resources", {})
        name = f"node {i} ({node['NodeManagerAddress']})"
        if gpus and res.get("GPU", 0) < gpus:
            raise BadInput(f"{name} offers {res.get('GPU', 0):g} GPUs to Ray; the plan needs {gpus} on every node "
                           f"(`ray start ... --num-gpus={gpus}`), or plan for this cluster with --hardware cluster.")
        if cpus and res.get("CPU", 0) < cpus:
            raise BadInput(f"{name} offers {res.get('CPU', 0):g} CPUs to Ray; the plan assumes {cpus} (`ray start "
                           f"... --num-cpus={cpus}`), or plan for this cluster with --hardware cluster.")
        if ram and res.get("memory", ram) < ram:
            raise BadInput(f"{name} offers {res['memory'] / GiB:.1f} GiB of memory to Ray; the plan needs "
                           f"{ram / GiB:.1f} GiB there. Free memory on it, or plan for this cluster with "
                           f"--hardware cluster.")


class Cluster:
    """The Ray cluster a plan runs on: its nodes in the plan's order (the head first) and the ranks started
    on them."""

    def __init__(self, plan: Any, ray_address: str | None = None):
        self.address = cluster_address(ray_address or plan.config.get("ray_address"))
        self.ray = connect(self.address)
        self.nodes = alive_nodes(self.ray)
        check(plan, self.nodes, self.address)
        self.nodes = self.nodes[: len(plan.config.get("nodes") or [])]
        self.names = list(plan.config.get("nodes") or [])
        self.ranks: list[Any] = []
        self.lost: str | None = None
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    # --- ranks on the other nodes -------------------------------------------------------------------
    def start_ranks(self, serve_script: str, env: dict[str, str]) -> None:
        """Run `serve_script` (the plan's vllm-serve.sh) on every node but the head, as NODE_RANK 1..N-1."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        rank_actor = self.ray.remote(num_cpus=0)(Rank)
        for rank, node in enumerate(self.nodes[1:], start=1):
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            node_env = {**env, "NODE_RANK": str(rank), "VLLM_HOST_IP": node["NodeManagerAddress"],
                        "VLLM": f"{sys.executable} -m qwenhw_vllm.serve"}
            actor = rank_actor.options(scheduling_strategy=strategy, name=f"{RANK_PREFIX}{rank}-{uuid.uuid4().hex[:8]}",
                                       namespace="qwenhw").remote(serve_script, node_env)
            self.ranks.append(actor)
        self.ray.get([actor.started.remote() for actor in self.ranks], timeout=120)

    # --- watching ---------------------------------------------------------------------------------------
    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call `on_lost(why)` once if a node leaves the cluster or a rank's process stops."""

        def loop() -> None:
            ids = {n["NodeID"]: i for i, n in enumerate(self.nodes)}
            while not self._stop.wait(WATCH_S):
                why = None
                try:
                    alive = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
                    gone = [i for nid, i in ids.items() if nid not in alive]
                    if gone:
                        why = f"node {self.label(gone[0])} left the Ray cluster at {self.address}"
                    else:
                        codes = self.ray.get([r.poll.remote() for r in self.ranks], timeout=10)
                        stopped = [k + 1 for k, code in enumerate(codes) if code is not None]
                        if stopped:
                            why = (f"the vLLM rank on node {self.label(stopped[0])} stopped (exit "
                                   f"{codes[stopped[0] - 1]})")
                except Exception as exc:  # the actor's node went with it, or the cluster is gone
                    why = f"the Ray cluster at {self.address} stopped answering ({type(exc).__name__}: {exc})"
                if why:
                    self.lost = why
                    on_lost(why)
                    return

        self._watch = threading.Thread(target=loop, name="qwenhw-cluster-watch", daemon=True)
        self._watch.start()

    def label(self, i: int) -> str:
        name = self.names[i] if i < len(self.names) else f"#{i}"
        return f"{name} ({self.nodes[i]['NodeManagerAddress']})"

    def state(self) -> dict[str, Any]:
        """For /health: every node of the plan, alive or not, and what was lost."""
        try:
            alive = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        except Exception:
            alive = set()
        return {"ray_address": self.address, "lost": self.lost,
                "nodes": [{"name": self.names[i] if i < len(self.names) else f"#{i}",
                           "address": n["NodeManagerAddress"], "alive": n["NodeID"] in alive}
                          for i, n in enumerate(self.nodes)]}

    def close(self) -> None:
        """Stop the ranks (their processes too) and leave the cluster as it was."""
        self._stop.set()
        for actor in self.ranks:
            try:
                self.ray.get(actor.stop.remote(), timeout=30)
            except Exception:
                pass
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        self.ranks.clear()
        if self.ray.is_initialized():
            self.ray.shutdown()


class Rank:
    """A Ray actor on one node running the plan's vllm-serve.sh as that node's rank."""

    def __init__(self, serve_script: str, env: dict[str, str]):
        fd, path = tempfile.mkstemp(prefix="qwenhw-vllm-serve-", suffix=".sh")
        with os.fdopen(fd, "w") as f:
            f.write(serve_script)
        self.log = open(path + ".log", "w")
        self.proc = subprocess.Popen(["bash", path], env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def started(self) -> int:
        time.sleep(0.5)
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int | None:
        import signal

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.proc.poll()
