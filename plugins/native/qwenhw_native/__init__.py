"""qwenhw's native backend: its own engine over transformers' modules, on NVIDIA GPUs.

A static KV cache and CUDA graphs of fused Triton decode kernels on one GPU; tensor-parallel and replicated
rank jobs over GPUs of one node; the MoE hybrid with routed experts in host RAM computed by the CPU.
Registers through the `qwenhw` entry point exactly as a third-party plugin would.
"""

from __future__ import annotations

from typing import Iterable

import qwenhw
from qwenhw.backend import Availability, package_versions, source_path

from . import planner
from .engines import RANK_ENGINES, RENAMES, Engine


class NativeBackend(qwenhw.Backend):
    name = "native"
    description = ("qwenhw's own engine: CUDA graphs + Triton decode kernels on one GPU, tensor parallel and "
                   "replicas over a node's GPUs, the MoE hybrid with experts in host RAM")
    vendors = ("cpu", "nvidia")  # the CPU only when an engine is forced (tests check the runtime there)
    install = f"pip install '{source_path('plugins/native')}[engine]'"
    engine_names = tuple(e.value for e in Engine)
    load_formats = ("auto", "dummy")
    renames = {old: new.value for old, new in RENAMES.items()}

    def software(self) -> Availability:
        versions = package_versions("torch", "transformers", "triton")
        missing = [n for n in ("torch", "transformers") if versions[n] is None]
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed", self.install,
                                {k: v for k, v in versions.items() if v})
        how = "" if versions["triton"] else " (no Triton: decode steps run on torch's kernels)"
        return Availability(True, "torch " + versions["torch"] + how, None, {k: v for k, v in versions.items() if v})

    def plans(self, spec, hardware, request) -> Iterable[qwenhw.Plan]:
        return planner.plans(spec, hardware, request)

    def artifacts(self, plan) -> dict[str, str]:
        from .artifacts import artifacts

        return artifacts(plan)

    def load(self, plan) -> qwenhw.Engine:
        if Engine(plan.engine) in RANK_ENGINES:  # one process per GPU: a torchrun job qwenhw starts and drives
            import sys
            from pathlib import Path

            from qwenhw.engine.preflight import checkpoint_dir
            from qwenhw.engine.ranks import RankEngine

            checkpoint_dir(plan)  # missing weights: say so here, not in every rank
            roots = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[1])]
            env = {k: str(v) for k, v in plan.config.get("env", {}).items()}
            return RankEngine(plan, sys.executable, "qwenhw_native.ranks", int(plan.config["world"]), env, roots)
        return self.load_in_process(plan)

    def load_in_process(self, plan) -> qwenhw.Engine:
        from .load import load

        return load(plan)


@qwenhw.hookimpl
def register_backends(register):
    register(NativeBackend())
