"""A two-node plan on a Ray cluster, for real, on this machine: two Ray nodes on loopback started by the
plan's own ray-cluster.sh as emitted, `qwenhw detect --cluster` probing each on itself, a PP=2 vLLM plan for
what is there run by `qwenhw.load` (vLLM's CPU platform has no Ray executor, so rank 0 runs here and the
other node's rank is the plan's vllm-serve.sh, started on that node by a Ray actor), greedy tokens equal to
one node's, the cluster checked against the plan before loading, a rank that dies mid-request named in the
error, and everything released on close.

Needs the vllm environment with Ray (ci/envs/vllm.sh; QWENHW_VLLM_PYTHON), as CI has it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qwenhw
from qwenhw.engine.ranks import free_port
from qwenhw.engine.worker import worker_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PYTHON = worker_python("vllm")
if PYTHON is None or subprocess.run([PYTHON, "-c", "import ray, vllm"], capture_output=True).returncode:
    pytest.skip("needs the vllm environment with Ray (bash ci/envs/vllm.sh; QWENHW_VLLM_PYTHON)",
                allow_module_level=True)

BIN = str(Path(PYTHON).parent)  # ray's CLI
PROMPT = "In 1492,"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def two_nodes(cpus: int = 1) -> dict:
    """The profile a user would write (or `qwenhw detect --cluster` would give) for two CPU nodes here."""
    base = qwenhw.api.hardware_profile("cpu-only").to_dict()
    node = base["nodes"][0]
    node["cpu"].update(physical_cores=cpus, logical_cores=cpus, ram_bytes=8 * 2**30, ram_available_bytes=8 * 2**30)
    nodes = [{**node, "hostname": f"node{i}", "address": "127.0.0.1"} for i in range(2)]
    return {**base, "name": "two-nodes", "nodes": nodes, "local": False}


def run(cmd: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], **(env or {})})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_moe):
    """Two Ray nodes on loopback, started by running the plan's ray-cluster.sh as emitted, once per role."""
    root = tmp_path_factory.mktemp("cluster")
    (root / "two.json").write_text(json.dumps(two_nodes()))
    emitted = root / "launch"
    out = run([sys.executable, "-m", "qwenhw.cli", "plan", str(tiny_moe), "--hardware", str(root / "two.json"),
               "--backend", "vllm", "--context", "2048", "--emit", str(emitted)])
    assert out.returncode == 0, out.stderr
    port = str(free_port())
    env = {"RAY_PORT": port, "RAY_USAGE_STATS_ENABLED": "0"}
    for role in ("head", "worker"):
        started = run(["bash", str(emitted / "ray-cluster.sh"), role], env=env)
        assert started.returncode == 0, (role, started.stdout, started.stderr)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while "2 nodes" not in run([sys.executable, "-m", "qwenhw.cli", "detect", "--cluster", "--ray-address",
                                address]).stdout and time.time() < deadline:
        time.sleep(2)
    yield {"address": address, "emitted": emitted, "root": root}
    run(["ray", "stop", "--force"])


def test_the_emitted_artifacts_are_what_run(cluster):
    serve = (cluster["emitted"] / "vllm-serve.sh").read_text()
    assert "--pipeline-parallel-size 2" in serve and "--nnodes 2" in serve and "--headless" in serve
    ray = (cluster["emitted"] / "ray-cluster.sh").read_text()
    assert "--num-cpus=1" in ray and 'bash ray-cluster.sh head|worker' in ray


def test_detect_cluster_probes_every_node_on_itself(cluster):
    out = run([sys.executable, "-m", "qwenhw.cli", "detect", "--cluster", "--json", "--ray-address", cluster["address"]])
    assert out.returncode == 0, out.stderr
    profile = json.loads(out.stdout)
    assert len(profile["nodes"]) == 2 and profile["local"] is True
    assert all(n["cpu"]["logical_cores"] == 1 and n["address"] for n in profile["nodes"])  # Ray's --num-cpus=1
    assert len({n["hostname"] for n in profile["nodes"]}) == 2  # two raylets on one host, named apart
    assert profile["nodes"][1]["network_gbs"] > 0  # the link measured by fetching an object across it


def test_the_cluster_is_checked_against_the_plan_before_loading(cluster, tiny_moe):
    bigger = two_nodes(cpus=4)
    plan = qwenhw.plan(str(tiny_moe), hardware=qwenhw.HardwareProfile.from_dict(bigger), backend="vllm",
                       context=2048, ray_address=cluster["address"])
    with pytest.raises(qwenhw.BadInput, match=r"offers 1 CPUs to Ray; the plan assumes 4"):
        qwenhw.load(plan)
    nowhere = plan.replace(config={**plan.config, "ray_address": f"127.0.0.1:{free_port()}"})
    with pytest.raises(qwenhw.BadInput, match="ray-cluster.sh head"):
        qwenhw.load(nowhere)


def test_two_nodes_decode_as_one_and_a_lost_rank_is_named(cluster, tiny_moe):
    one = qwenhw.plan(str(tiny_moe), backend="vllm", context=2048)
    assert one.parallel.pp == 1
    with qwenhw.load(one) as engine:
        alone = list(engine.generate(PROMPT, max_tokens=8, temperature=0)[0].token_ids)

    plan = qwenhw.plan(str(tiny_moe), hardware="cluster", ray_address=cluster["address"], backend="vllm",
                       context=2048)
    assert (plan.engine, plan.parallel.pp, plan.config["engine_args"]["nnodes"]) == ("vllm-cpu", 2, 2)
    engine = qwenhw.load(plan)
    try:
        assert list(engine.generate(PROMPT, max_tokens=8, temperature=0)[0].token_ids) == alone
        health = engine.health()
        assert health["status"] == "ok" and [n["alive"] for n in health["cluster"]["nodes"]] == [True, True]

        result: dict = {}

        def long_request():
            try:
                engine.generate(PROMPT, max_tokens=1500, temperature=0)
            except Exception as exc:  # what the node's loss must turn into
                result["error"] = exc

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(2)
        ranks = run(["pgrep", "-f", "qwenhw-vllm-serve-"]).stdout.split()
        assert ranks, "the other node's rank runs the plan's vllm-serve.sh"
        for pid in ranks:
            os.killpg(int(pid), signal.SIGKILL)
        thread.join(timeout=60)
        assert not thread.is_alive(), "a lost node must end the request, not hang it"
        assert "stopped" in str(result.get("error")) and plan.config["nodes"][1] in str(result["error"])
        assert engine.health()["status"] == "degraded"
    finally:
        engine.close()
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(a['name'].startswith('qwenhw-rank-') for a in ray.util.list_named_actors(all_namespaces=True)))")
    counted = run([PYTHON, "-c", code, cluster["address"]])
    assert counted.stdout.strip().splitlines()[-1:] == ["0"], counted.stderr
    assert not run(["pgrep", "-f", "qwenhw-vllm-serve-"]).stdout.split()
