"""qwenhw's intel backend: ipex-llm low-bit and IPEX on Intel GPUs (XPU) and Xeons, DeepSpeed AutoTP across
cards or sockets, and FlashMoE command lines for GGUF MoE models on Arc cards.

ipex-llm (archived 2026-01-28) and IPEX (archived 2026-03-30) are a pinned legacy stack that cannot share an
environment with vLLM or a current torch, so the engine usually runs in a worker process in the environment
built by ci/envs/intel.sh (QWENHW_INTEL_PYTHON). Planning needs none of it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Iterable

import qwenhw
from qwenhw import settings
from qwenhw.backend import Availability, package_versions, source_path

from . import planner

STACK = ("torch", "intel-extension-for-pytorch", "ipex-llm", "deepspeed", "transformers")
LEGACY = ("ipex-llm (archived 2026-01-28) and IPEX (archived 2026-03-30) run here as a pinned legacy environment "
          "(torch 2.8.0, IPEX 2.8.0, ipex-llm 2.3.0b20251110, transformers 4.51.3: ci/envs/intel.sh); the forward "
          "path for Intel GPUs is vLLM's XPU platform")


def env_versions(python: str) -> dict[str, str | None]:
    """Versions installed in another environment, read from its site-packages metadata (nothing imported)."""
    root = Path(python).parent.parent
    paths = [str(p) for p in root.glob("lib/python3*/site-packages")]
    found = {}
    for dist in importlib.metadata.distributions(path=paths):
        found[dist.metadata["Name"].lower().replace("_", "-")] = dist.version
    return {name: found.get(name) for name in STACK}


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def ipex_mismatch(versions: dict[str, str | None]) -> str | None:
    """IPEX exits at import unless torch has its own major.minor: say so before anything imports it.

    >>> ipex_mismatch({"intel-extension-for-pytorch": "2.8.0+cpu", "torch": "2.13.0+cpu"})
    'IPEX 2.8.0+cpu needs torch 2.8.*; torch 2.13.0+cpu is installed, so IPEX exits at import'
    """
    ipex, torch = versions.get("intel-extension-for-pytorch"), versions.get("torch")
    if ipex and torch and _minor(ipex) != _minor(torch):
        return f"IPEX {ipex} needs torch {_minor(ipex)}.*; torch {torch} is installed, so IPEX exits at import"
    return None


def engines_usable(versions: dict[str, str | None]) -> dict[str, str | None]:
    """engine -> None when usable with these versions, else why not."""
    torch, tf = versions.get("torch"), versions.get("transformers")
    base = None if torch and tf else "torch and transformers are needed"
    llm = base or (None if versions.get("ipex-llm") else "ipex-llm is not installed")
    if llm is None and tuple(int(x) for x in tf.split(".")[:2]) >= (4, 57):  # type: ignore[union-attr]
        llm = f"ipex-llm breaks on transformers {tf} (>= 4.57 dropped QuantizedCacheConfig); pin 4.51.3"
    ipex = base or (None if versions.get("intel-extension-for-pytorch") else "IPEX is not installed")
    ipex = ipex or ipex_mismatch(versions)
    ds = base or (None if versions.get("deepspeed") else "deepspeed is not installed")
    return {"ipex-llm": llm, "ipex": ipex, "deepspeed-autotp": ds}


def hardware_note(hardware) -> str:
    """What the Intel engines can use on this hardware (the core probes found the devices and ISA flags)."""
    gpus = hardware.node.gpus("intel")
    cpu = hardware.node.cpu
    parts = [f"{len(gpus)} Intel GPU(s) ({gpus[0].name}): ipex-llm, AutoTP, FlashMoE"] if gpus else []
    isa = "AMX-BF16" if cpu.has("amx_bf16") else "AVX512-BF16" if cpu.has("avx512_bf16") else None
    if isa:
        parts.append(f"CPU {cpu.model} with {isa}: IPEX bf16 fast path")
    elif cpu.has("avx2"):
        parts.append(f"CPU {cpu.model} without AVX512-BF16/AMX: IPEX runs fp32, ipex-llm low-bit on AVX2")
    if cpu.sockets > 1:
        parts.append(f"{cpu.sockets} sockets: DeepSpeed AutoTP with one rank per socket")
    return "; ".join(parts)


def _is_this_env(python: str) -> bool:
    return Path(python).parent.parent.resolve() == Path(sys.prefix).resolve()


class IntelBackend(qwenhw.Backend):
    name = "intel"
    description = "Intel GPUs and Xeons: ipex-llm low-bit, IPEX bf16/AMX, DeepSpeed AutoTP, FlashMoE (GGUF MoE on Arc)"
    vendors = ("intel", "cpu")
    install = (f"bash {source_path('ci/envs/intel.sh')} ~/.venvs/intel && export "
               f"QWENHW_INTEL_PYTHON=~/.venvs/intel/bin/python")
    engine_names = planner.ENGINES

    def supports(self, hardware) -> str | None:
        if hardware.node.gpus("intel"):
            return None
        cpu = hardware.node.cpu
        if cpu.vendor == "intel" or cpu.has("avx2"):
            return None  # IPEX and ipex-llm's CPU kernels need x86 (AVX2; AVX512/AMX for the fast paths)
        return f"needs an Intel GPU or an x86 CPU with AVX2; the hardware has {cpu.model} and no Intel GPU"

    def probe(self, hardware) -> Availability:
        found = super().probe(hardware)
        return dataclasses.replace(found, reason=f"{hardware_note(hardware)}. {found.reason}".strip())

    def software(self) -> Availability:
        python, versions = self._engine_env()
        where = f"worker environment {python}" if python else "this environment"
        usable = engines_usable(versions)
        ok = [e for e, why in usable.items() if why is None]
        # AutoTP alone (DeepSpeed is in many environments) does not make the Intel stack present
        present = bool({"ipex-llm", "ipex"} & set(ok))
        if present:
            parts = [f"{where}: engines {', '.join(ok)} usable"]
        else:  # DeepSpeed alone is not the Intel stack: the backend is not available, say what is there
            parts = [f"{where}: the Intel stack (ipex-llm, IPEX) is not installed"
                     + (f"; only {', '.join(ok)} could run" if ok else "")]
        parts += [f"{e}: {why}" for e, why in usable.items() if why]
        parts.append("flashmoe: command lines only (ipex-llm's llama.cpp portable build)")
        reason = "; ".join(parts) + ". " + LEGACY
        return Availability(present, reason, None if present else self.install,
                            {k: v for k, v in versions.items() if v})

    def _engine_env(self) -> tuple[str | None, dict[str, str | None]]:
        """(worker python or None for this process, versions of the stack where the engine would run)."""
        from qwenhw.engine.worker import worker_python

        python = worker_python("intel")
        if python and _is_this_env(python):
            python = None
        return python, env_versions(python) if python else package_versions(*STACK)

    def plans(self, spec, hardware, request) -> Iterable[qwenhw.Plan]:
        out = planner.plans(spec, hardware, request)
        if not hardware.local:
            return out  # a simulated machine: judged by its hardware, software assumed installable
        # on this machine an engine whose package is missing (or IPEX on the wrong torch) cannot win
        usable = engines_usable(self._engine_env()[1])
        return [p if not usable.get(p.engine) else p.replace(
            fits=False, estimate=qwenhw.Estimate(),
            reasons=(f"{p.engine} cannot run here: {usable[p.engine]} ({self.install})",) + p.reasons) for p in out]

    def artifacts(self, plan) -> dict[str, str]:
        from .artifacts import artifacts

        return artifacts(plan)

    def load(self, plan) -> qwenhw.Engine:
        from qwenhw.engine.worker import WorkerEngine

        if plan.engine == "flashmoe":
            raise RuntimeError("FlashMoE runs as a command line, not inside qwenhw: run the plan's flashmoe.sh "
                               "artifact (`qwenhw plan ... --json`) with ipex-llm's llama.cpp portable build")
        python, versions = self._engine_env()
        why = engines_usable(versions)[plan.engine]
        if why:
            raise RuntimeError(f"the intel backend cannot run {plan.engine} "
                               f"({'in ' + python if python else 'here'}): {why}. Build the pinned environment: "
                               f"{self.install}")
        if plan.engine == "deepspeed-autotp" or int(plan.config.get("ranks", 1)) > 1:  # a torchrun job
            from .ranks import RankEngine

            return RankEngine(plan, python or sys.executable)
        if python:
            return WorkerEngine(plan, python, env={k: str(v) for k, v in plan.config.get("env", {}).items()})
        return self.load_in_process(plan)

    def load_in_process(self, plan) -> qwenhw.Engine:
        from . import engines

        if settings.get("QWENHW_RANK_JOB"):  # inside a torchrun job started by ranks.RankEngine
            return engines.load_rank(plan, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        return engines.load(plan)


@qwenhw.hookimpl
def register_backends(register):
    register(IntelBackend())
