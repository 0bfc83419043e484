"""Find and load plugins once; keep every plugin's failure to itself.

Entry-point group ``qwenhw``. ``QWENHW_LOAD_PLUGINS`` limits which distributions load (comma-separated
names; set but empty = none). ``QWENHW_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from . import hookspecs, settings
from .errors import BadInput

log = logging.getLogger(__name__)
GROUP = "qwenhw"


@dataclass
class PluginFault:
    """A plugin that failed to import, register, probe or plan, and what it raised."""

    plugin: str
    stage: str
    error: str


@dataclass
class Registry:
    pm: pluggy.PluginManager
    backends: dict[str, Any] = field(default_factory=dict)  # name -> Backend
    owners: dict[str, str] = field(default_factory=dict)  # backend name -> distribution
    probes: dict[str, Callable] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    faults: list[PluginFault] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution version


_registry: Registry | None = None


def _allowlist() -> set[str] | None:
    raw = settings.get("QWENHW_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _load_entry_points(pm: pluggy.PluginManager, faults: list[PluginFault], versions: dict[str, str]) -> None:
    allow = _allowlist()
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist else ep.name
        if allow is not None and dist not in allow and ep.name not in allow:
            continue
        if pm.has_plugin(dist):
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take qwenhw down
            faults.append(PluginFault(dist, "import", f"{type(exc).__name__}: {exc}"))
            continue
        pm.register(module, name=dist)
        versions[dist] = ep.dist.version if ep.dist else "?"


def _call_each(reg: Registry, hook_name: str, register: Callable) -> None:
    """Call every implementation on its own, so one plugin raising skips only that plugin.

    Each call goes through pluggy (a hook caller restricted to that plugin), so QWENHW_TRACE_PLUGINS and any
    hook-call monitoring see it.
    """
    hook = getattr(reg.pm.hook, hook_name)
    plugins = reg.pm.get_plugins()
    for impl in hook.get_hookimpls():
        only = reg.pm.subset_hook_caller(hook_name, [p for p in plugins if p is not impl.plugin])
        try:
            only(register=lambda *a, _p=impl.plugin_name, **k: register(_p, *a, **k))
        except BadInput:
            raise
        except Exception as exc:
            reg.faults.append(PluginFault(impl.plugin_name, hook_name, f"{type(exc).__name__}: {exc}"))


def load(force: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is not None and not force:
        return _registry
    pm = pluggy.PluginManager("qwenhw")
    pm.add_hookspecs(hookspecs)
    if settings.get("QWENHW_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    faults: list[PluginFault] = []
    versions: dict[str, str] = {}
    _load_entry_points(pm, faults, versions)
    _registry = _register_all(Registry(pm=pm, faults=faults, versions=versions))
    return _registry


def register_plugin(module: Any, name: str) -> Registry:
    """Register an in-process plugin (tests, notebooks) and rebuild the registry from the same manager."""
    reg = load()
    reg.pm.register(module, name=name)
    return _rebuild(reg)


def unregister_plugin(name: str) -> Registry:
    reg = load()
    plugin = reg.pm.get_plugin(name)
    if plugin is not None:
        reg.pm.unregister(plugin)
    return _rebuild(reg)


def reset() -> None:
    """Forget the registry; the next `load()` scans entry points again."""
    global _registry
    _registry = None


def _rebuild(old: Registry) -> Registry:
    global _registry
    faults = [f for f in old.faults if f.stage == "import"]
    _registry = _register_all(Registry(pm=old.pm, faults=faults, versions=old.versions))
    return _registry


def _register_all(reg: Registry) -> Registry:
    reg.pm.check_pending()  # a misspelt hook implementation is an error, not silence

    def add_backend(plugin: str, backend: Any) -> None:
        name = getattr(backend, "name", None)
        if not name:
            reg.faults.append(PluginFault(plugin, "register_backends", f"{backend!r} has no name"))
            return
        if name in reg.backends and reg.owners[name] != plugin:
            raise BadInput(
                f"Two plugins register a backend named {name!r}: {reg.owners[name]} and {plugin}. Uninstall one "
                f"of them (`pip uninstall {plugin}`), or limit what loads with QWENHW_LOAD_PLUGINS="
                f"{reg.owners[name]}."
            )
        backend.distribution = plugin
        reg.backends[name] = backend
        reg.owners[name] = plugin
        reg.versions.setdefault(plugin, _dist_version(plugin))

    def add_probe(plugin: str, name: str, probe: Callable) -> None:
        reg.probes[f"{plugin}:{name}"] = probe

    def add_model(plugin: str, spec: Any) -> None:
        reg.models[spec.name] = spec.with_(source=f"plugin:{plugin}")

    _call_each(reg, "register_backends", add_backend)
    _call_each(reg, "register_hardware_probes", add_probe)
    _call_each(reg, "register_models", add_model)
    return reg


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "in-process"
