"""The intel backend's torchrun jobs (DeepSpeed AutoTP, ipex-llm pipeline parallel); see qwenhw.engine.ranks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwenhw.engine.ranks import RankEngine as _RankEngine
from qwenhw.engine.ranks import serve_ranks
from qwenhw import settings

def launch_env(plan: Any) -> dict[str, str]:
    """Environment of a rank job: the plan's variables, rendezvous, and DeepSpeed's CPU comm settings."""
    ranks = int(plan.config["ranks"])
    env = {k: str(v) for k, v in plan.config.get("env", {}).items()}
    env.setdefault("LOCAL_SIZE", str(ranks))  # DeepSpeed's CPU shm all-reduce; rank 0 segfaults without it
    env.setdefault("TORCH_EXTENSIONS_DIR", str(settings.cache_root() / "torch_extensions"))  # shm op: built once
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env["QWENHW_RANK_JOB"] = "1"  # tells load_in_process to build this rank's share
    env["QWENHW_RANK_BACKEND"] = "ccl" if plan.config.get("device") == "xpu" else "gloo"
    if plan.config.get("device") != "xpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def RankEngine(plan: Any, python: str) -> _RankEngine:
    roots = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[1])]
    return _RankEngine(plan, python, "qwenhw_intel.ranks", int(plan.config["ranks"]), launch_env(plan), roots)


def main() -> None:
    backend = settings.get("QWENHW_RANK_BACKEND")
    if backend == "ccl":
        import oneccl_bindings_for_pytorch  # noqa: F401 - registers the ccl backend (XPU builds only)
    import qwenhw_intel

    serve_ranks(qwenhw_intel, "qwenhw-intel", "intel", backend)  # DeepSpeed reuses this process group


if __name__ == "__main__":
    main()
