"""Combine the probes into a HardwareProfile of this machine. Never raises, never imports torch.

A GPU probe is a callable returning (items, ProbeResult): items are Accelerators and, optionally, Links
between them. Plugins (e.g. AMD via amdsmi) pass theirs as `extra_probes`; one that raises is recorded
with its error and the others go on.
"""

from __future__ import annotations

import socket
from typing import Callable, Iterable

from . import cpu as cpu_probe
from . import intel, nvidia, specs
from .profile import Accelerator, Cpu, Disk, HardwareProfile, Link, Node, ProbeResult

GpuProbe = Callable[[], "tuple[list[Accelerator | Link], ProbeResult]"]


def detect(extra_probes: Iterable[GpuProbe] = ()) -> HardwareProfile:
    results: list[ProbeResult] = []
    cpu, r = _run("cpu", cpu_probe.probe, (Cpu(), None))
    results.append(r)
    disk, r = _run("disk", cpu_probe.probe_disk, (Disk(), None))
    results.append(r)

    accelerators: list[Accelerator] = []
    links: list[Link] = []
    for name, fn in [("nvidia", nvidia.probe), ("intel", intel.probe), *((_name(p), p) for p in extra_probes)]:
        items, r = _run(name, fn, ([], None))
        results.append(r)
        for item in items or ():
            if isinstance(item, Accelerator):
                accelerators.append(item)
            elif isinstance(item, Link):
                links.append(item)

    host = _hostname()
    node = Node(hostname=host, cpu=cpu, accelerators=tuple(accelerators), links=tuple(links), disk=disk,
                host_to_device_gbs=_host_to_device(accelerators))
    return HardwareProfile(name=host, nodes=(node,), probes=tuple(results), local=True)


def _run(name: str, fn: Callable, default: tuple):
    """Call a probe; a raise or a malformed answer becomes a failed ProbeResult instead of an error."""
    try:
        value, result = fn()
    except Exception as exc:
        return default[0], ProbeResult(name, False, f"probe raised {type(exc).__name__}: {exc}")
    if not isinstance(result, ProbeResult):
        return default[0], ProbeResult(name, False, f"probe returned {type(result).__name__}, not a ProbeResult")
    return value, result


def _host_to_device(accelerators: list[Accelerator]) -> float:
    """The slowest card's host link (datasheet), since tensor-parallel offload waits for it."""
    rates = [s.pcie_gbs for a in accelerators if (s := specs.lookup(a.vendor, a.name))]
    return min(rates) if rates else Node().host_to_device_gbs


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _hostname() -> str:
    try:
        return socket.gethostname() or "localhost"
    except OSError:
        return "localhost"
