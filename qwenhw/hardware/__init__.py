"""Hardware: probe this machine, or load a bundled / user profile, into a HardwareProfile."""

from .bundled import bundled_names, load_bundled, resolve_hardware
from .detect import detect
from .profile import Accelerator, Cpu, Disk, HardwareProfile, Link, Node, ProbeResult

__all__ = [
    "Accelerator", "Cpu", "Disk", "HardwareProfile", "Link", "Node", "ProbeResult",
    "bundled_names", "detect", "load_bundled", "resolve_hardware",
]
