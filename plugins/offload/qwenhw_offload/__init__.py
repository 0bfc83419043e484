"""qwenhw's offload backend: torch + transformers + accelerate (+ DeepSpeed ZeRO-3), runs anywhere.

Registers through the `qwenhw` entry point exactly as a third-party plugin would.
"""

from __future__ import annotations

from typing import Iterable

import qwenhw
from qwenhw.backend import Availability, package_versions, source_path

from . import planner
from .engines import Engine


class OffloadBackend(qwenhw.Backend):
    name = "offload"
    description = "torch + transformers + accelerate: CPU-only, GPU + host RAM + disk, DeepSpeed ZeRO-3"
    vendors = ("cpu", "nvidia", "intel")
    install = f"pip install '{source_path('plugins/offload')}[engine]'"
    engine_names = tuple(e.value for e in Engine)
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
        from .load import load

        return load(plan)


@qwenhw.hookimpl
def register_backends(register):
    register(OffloadBackend())
