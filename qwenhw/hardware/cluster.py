"""A Ray cluster as one hardware profile: a node per alive Ray node, each from qwenhw's own probe run on that
node (a Ray task pinned to it), with what Ray lets tasks use there (its CPU, GPU and memory resources) and
the link to the head measured by fetching an object across it.

Ray is imported only in `probe_here`, in an environment that has it (the vllm one runs qwenhw's multi-node
plans); elsewhere `probe` runs this module in that environment's Python. Planning stays free of Ray.

    python -m qwenhw.hardware.cluster HOST:PORT      # the profile as JSON (what `qwenhw detect --cluster` runs)
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

from ..errors import BadInput
from .profile import HardwareProfile, Node

RAY_PORT = 6379  # Ray's default head port, the one the plans' ray-cluster.sh starts
LINK_BYTES = 64 * 2**20  # the object fetched across each link: large enough to time, small for a CI machine


def address(explicit: str | None = None) -> str:
    """The Ray cluster to use: --ray-address, else RAY_ADDRESS; a clear error when neither is given."""
    found = explicit or os.environ.get("RAY_ADDRESS")
    if not found:
        raise BadInput("No Ray cluster named: pass --ray-address HOST:PORT or set RAY_ADDRESS. To start one, plan "
                       "for the machines (a profile with their nodes, or `qwenhw plan ... --emit DIR`) and run the "
                       "emitted ray-cluster.sh: `bash ray-cluster.sh head` on the head node, `bash ray-cluster.sh "
                       "worker` on each other node.")
    return found


def probe(ray_address: str | None = None, timeout: float = 300.0) -> HardwareProfile:
    """The profile of the Ray cluster at `ray_address` (see `address`)."""
    where = address(ray_address)
    if ray_here():
        return probe_here(where)
    from ..engine.worker import worker_python

    python = worker_python("vllm")
    if python is None:
        raise BadInput("Ray is not installed here and no vllm environment is configured (QWENHW_VLLM_PYTHON), "
                       "where qwenhw runs multi-node plans: install it with `pip install ray` or `bash "
                       "ci/envs/vllm.sh` and export QWENHW_VLLM_PYTHON.")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        out = subprocess.run([python, "-m", "qwenhw.hardware.cluster", where], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BadInput(f"The Ray cluster at {where} did not answer within {timeout:.0f} s.") from None
    if out.returncode:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        raise BadInput(lines[-1].removeprefix("qwenhw: ") if lines else f"probing the Ray cluster at {where} failed")
    return HardwareProfile.from_json(out.stdout, source=f"ray cluster at {where}")


def ray_here() -> bool:
    """Whether Ray is installed in this environment (a folder named ray, such as Ray's own /tmp/ray, is not)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("ray")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def connect(ray_address: str) -> Any:
    """ray, connected to the cluster at `ray_address` (a BadInput naming how to start one otherwise)."""
    import ray

    if ray.is_initialized():
        return ray
    start = ("Start it with the plan's ray-cluster.sh (`bash ray-cluster.sh head` on the head node, `bash "
             "ray-cluster.sh worker` on the others), or pass the right --ray-address.")
    host, _, port = ray_address.rpartition(":")
    if host and port.isdigit() and "://" not in ray_address:  # ray.init waits minutes on a dead address
        import socket

        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise BadInput(f"No Ray cluster answers at {ray_address} ({exc.strerror or exc}). {start}") from None
    try:
        ray.init(address=ray_address, logging_level="ERROR", log_to_driver=False, include_dashboard=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BadInput(f"No Ray cluster answers at {ray_address} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0]}). {start}") from None
    return ray


def alive_nodes(ray: Any) -> list[dict]:
    """Ray's alive nodes, the head first."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: "node:__internal_head__" not in n.get("Resources", {}))


def _probe_node() -> dict:
    from .detect import detect

    return detect().to_dict()


def _fetch(refs: list) -> float:
    import ray

    start = time.perf_counter()
    ray.get(refs[0])
    return time.perf_counter() - start


def probe_here(ray_address: str) -> HardwareProfile:
    ray = connect(ray_address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes(ray)
    if not nodes:
        raise BadInput(f"The Ray cluster at {ray_address} has no alive node.")

    def pinned(fn, node):
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        return ray.remote(fn).options(scheduling_strategy=strategy, num_cpus=0)

    probes = ray.get([pinned(_probe_node, n).remote() for n in nodes], timeout=180)
    blob = ray.put(b"\0" * LINK_BYTES)  # made on the driver's node; each other node fetches it once
    seconds = ray.get([pinned(_fetch, n).remote([blob]) for n in nodes[1:]], timeout=180)
    links = [LINK_BYTES / max(s, 1e-6) / 1e9 for s in seconds]
    out: list[Node] = []
    names: set[str] = set()
    for i, (ray_node, found) in enumerate(zip(nodes, probes)):
        node = HardwareProfile.from_dict(found, source=f"node {ray_node['NodeManagerAddress']}").node
        res = ray_node.get("Resources", {})
        cpus = max(1, int(res.get("CPU", node.cpu.physical_cores)))
        memory = int(res.get("memory", node.cpu.ram_bytes))
        gpus = node.accelerators[: int(res.get("GPU", len(node.accelerators)))]
        name = node.hostname if node.hostname not in names else f"{node.hostname}-{i}"  # raylets sharing a host
        names.add(name)
        cpu = dataclasses.replace(node.cpu, physical_cores=min(cpus, node.cpu.physical_cores), logical_cores=cpus,
                                  ram_bytes=memory, ram_available_bytes=memory)
        out.append(dataclasses.replace(node, hostname=name, cpu=cpu, accelerators=gpus,
                                       address=ray_node["NodeManagerAddress"],
                                       network_gbs=round(min(links) if links else 0.0, 2)))
    return HardwareProfile(name=f"ray cluster at {ray_address}", nodes=tuple(out), local=True)


def main() -> None:
    try:
        print(probe_here(address(sys.argv[1] if len(sys.argv) > 1 else None)).to_json())
    except BadInput as exc:
        print(f"qwenhw: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
