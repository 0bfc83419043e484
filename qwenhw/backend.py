"""The contract every backend plugin implements.

Class attributes state facts; methods with safe defaults are optional, the ones that raise
NotImplementedError are required. Heavy imports (torch, vllm, ...) belong inside `load` and the engine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Iterable

if TYPE_CHECKING:
    from .engine.base import Engine
    from .hardware.profile import HardwareProfile
    from .models.spec import ModelSpec
    from .planning.plan import Plan, Request


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why not."""

    ok: bool
    reason: str = ""
    install: str | None = None  # the command that would make it available
    versions: dict[str, str] = field(default_factory=dict)


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed versions without importing anything (None when absent)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_path(relative: str) -> str:
    """`relative` (a script or plugin folder of the qwenhw source tree) as an absolute path where this qwenhw
    runs from its source tree, so an install hint works from any directory; else as given."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    target = root / relative
    return str(target) if target.exists() else relative


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Backend:
    """Base class for backends. Subclass it, set the class attributes, implement `plans` and `load`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    vendors: ClassVar[tuple[str, ...]] = ()  # accelerators served: "nvidia", "intel", ...; "cpu" for host-only
    install: ClassVar[str] = ""  # pip command for the engine's software
    engine_names: ClassVar[tuple[str, ...]] = ()  # the engines it plans: what --engine may name (empty: unchecked)
    load_formats: ClassVar[tuple[str, ...]] = ("auto",)  # "dummy" too where it can make random weights
    # engines it took over from another backend: {(old backend, old engine): its engine}; plans saved and
    # requests made under the old names still work (qwenhw.planning.renames)
    renames: ClassVar[dict[tuple[str, str], str]] = {}
    distribution: str = ""  # set by the registry: which distribution registered it

    # --- availability --------------------------------------------------------------------------
    def software(self) -> Availability:
        """Is the engine's software installed in this environment? Cheap: no heavy imports."""
        return Availability(True)

    def supports(self, hardware: "HardwareProfile") -> str | None:
        """Why this hardware cannot be served at all (None when it can)."""
        if "cpu" in self.vendors or not self.vendors:
            return None
        if hardware.vendors() & set(self.vendors):
            return None
        have = ", ".join(sorted(hardware.vendors())) or "no GPU"
        return f"needs a {' or '.join(self.vendors)} GPU; the hardware has {have}"

    def probe(self, hardware: "HardwareProfile") -> Availability:
        """Available or not, with the reason: hardware first, then (on this machine) the software."""
        why = self.supports(hardware)
        if why:
            return Availability(False, why)
        if hardware.local:
            return self.software()
        return Availability(True, "judged by the profile's hardware; software assumed installable")

    # --- planning -----------------------------------------------------------------------------
    def plans(self, spec: "ModelSpec", hardware: "HardwareProfile", request: "Request") -> Iterable["Plan"]:
        """Candidate plans, fitting or not, each with its memory split, estimate and reasons."""
        raise NotImplementedError

    def artifacts(self, plan: "Plan") -> dict[str, str]:
        """Launch files and commands for a chosen plan: {file name: text}."""
        return {}

    # --- execution ----------------------------------------------------------------------------
    def load(self, plan: "Plan") -> "Engine":
        """An Engine for the plan: in this process, or through a worker process (qwenhw.engine.worker)."""
        raise NotImplementedError

    def load_in_process(self, plan: "Plan") -> "Engine":
        """Build the engine in this process; a worker process in the engine's own environment calls this."""
        return self.load(plan)

    def server(self, plan: "Plan", host: str, port: int, api_key: str | None,
               served_model_name: str) -> "tuple[list[str], dict[str, str]] | None":
        """The engine's own OpenAI-compatible server for the plan, which `qwenhw serve` runs in its place:
        (argv, environment to add), or None (the default) for qwenhw's server over `load(plan)`."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} from {self.distribution or '?'}>"
