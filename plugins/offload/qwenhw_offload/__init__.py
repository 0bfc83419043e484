"""qwenhw's offload backend: torch + transformers + accelerate (+ DeepSpeed ZeRO-3), runs anywhere.

Registers through the `qwenhw` entry point exactly as a third-party plugin would.
"""

from __future__ import annotations

from typing import Iterable

import qwenhw
from qwenhw.backend import Availability, package_versions, source_path

from . import planner


class OffloadBackend(qwenhw.Backend):
    name = "offload"
    description = "torch + transformers + accelerate: CPU-only, GPU + host RAM + disk, MoE hybrid, DeepSpeed ZeRO-3"
    vendors = ("cpu", "nvidia", "intel")
    install = f"pip install '{source_path('plugins/offload')}[engine]'"
    engine_names = ("transformers", "transformers-fast", "hybrid-moe", "transformers-tp", "transformers-dp",
                    "deepspeed-zero3")
    load_formats = ("auto", "dummy")

    def software(self) -> Availability:
        versions = package_versions("torch", "transformers", "accelerate", "deepspeed")
        missing = [n for n in ("torch", "transformers", "accelerate") if versions[n] is None]
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed", self.install,
                                {k: v for k, v in versions.items() if v})
        return Availability(True, "torch " + versions["torch"], None, {k: v for k, v in versions.items() if v})

    def plans(self, spec, hardware, request) -> Iterable[qwenhw.Plan]:
        return planner.plans(spec, hardware, request)

    def artifacts(self, plan) -> dict[str, str]:
        from .artifacts import artifacts

        return artifacts(plan)

    def load(self, plan) -> qwenhw.Engine:
        from .engines import RANK_ENGINES

        if plan.engine in RANK_ENGINES:  # one process per GPU: a torchrun job qwenhw starts and drives
            import sys
            from pathlib import Path

            from qwenhw.engine.preflight import checkpoint_dir
            from qwenhw.engine.ranks import RankEngine

            checkpoint_dir(plan)  # missing weights: say so here, not in every rank
            roots = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[1])]
            env = {k: str(v) for k, v in plan.config.get("env", {}).items()}
            return RankEngine(plan, sys.executable, "qwenhw_offload.ranks", int(plan.config["world"]), env, roots)
        return self.load_in_process(plan)

    def load_in_process(self, plan) -> qwenhw.Engine:
        from .engines import load

        return load(plan)


@qwenhw.hookimpl
def register_backends(register):
    register(OffloadBackend())
