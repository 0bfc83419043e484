"""CPU, RAM and disk of this machine.

Linux files are read directly (/proc/cpuinfo, /proc/meminfo, /sys/devices/system/node): that takes about a
millisecond, where py-cpuinfo needs ~1 s, so py-cpuinfo and psutil are only fallbacks for other systems.
Memory bandwidth and bf16 rate are rough estimates from core count and ISA flags (see the functions).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..settings import hub_cache_dir
from .profile import Cpu, Disk, ProbeResult

# ISA features the planner and backends care about, under their Linux /proc/cpuinfo names.
_KEEP = {
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",  # arm64 "Features"
}
# Other spellings (py-cpuinfo on some systems, macOS sysctl) -> Linux names.
_ALIASES = {
    "avx512bf16": "avx512_bf16", "avx512vnni": "avx512_vnni", "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni", "amxbf16": "amx_bf16", "amxint8": "amx_int8", "amxtile": "amx_tile",
    "amxfp16": "amx_fp16", "sse4.2": "sse4_2", "neon": "asimd",
}
_VENDORS = {"genuineintel": "intel", "authenticamd": "amd", "hygongenuine": "amd"}


def normalise_flags(raw) -> tuple[str, ...]:
    names = {_ALIASES.get(f.lower(), f.lower()) for f in raw}
    return tuple(sorted(names & _KEEP))


def estimate_memory_bandwidth(sockets: int, physical_cores: int) -> float:
    """GB/s one process streams from RAM. Streaming needs many cores: ~8 GB/s per core, and one socket's
    memory channels top out near 250 GB/s in practice (8-12 channel DDR5 at ~70% of datasheet)."""
    sockets = max(sockets, 1)
    per_socket = max(physical_cores, 1) / sockets
    return round(sockets * min(8.0 * per_socket, 250.0), 1)


def estimate_bf16_tflops(flags, physical_cores: int) -> float:
    """Sustained-ish dense bf16 matmul TFLOP/s: AMX ~0.5 per core (half its ~1 peak), avx512_bf16 ~0.1,
    plain AVX-512 ~0.06 and AVX2 ~0.03 (fp32 FMA after conversion)."""
    per_core = (0.5 if "amx_bf16" in flags else 0.1 if "avx512_bf16" in flags else
                0.06 if "avx512f" in flags else 0.03 if "avx2" in flags else 0.01)
    return round(per_core * max(physical_cores, 1), 2)


# --- CPU ------------------------------------------------------------------------------------------------
def probe(proc_root: str | os.PathLike = "/proc", sys_root: str | os.PathLike = "/sys") -> tuple[Cpu, ProbeResult]:
    try:
        info, source = _parse_cpuinfo(Path(proc_root) / "cpuinfo"), "/proc/cpuinfo"
        if not info.get("logical"):
            info, source = _py_cpuinfo(), "py-cpuinfo"
        ram, avail = _ram(Path(proc_root), Path(sys_root))
        flags = normalise_flags(info.get("flags", ()))
        physical = info.get("physical") or _psutil_physical() or info["logical"]
        sockets = info.get("sockets") or 1
        cpu = Cpu(
            model=info.get("model") or "unknown",
            vendor=info.get("vendor") or "unknown",
            sockets=sockets,
            physical_cores=physical,
            logical_cores=info["logical"],
            numa_nodes=_numa_nodes(Path(sys_root)),
            flags=flags,
            ram_bytes=ram,
            ram_available_bytes=avail,
            memory_bandwidth_gbs=estimate_memory_bandwidth(sockets, physical),
            bf16_tflops=estimate_bf16_tflops(flags, physical),
        )
        return cpu, ProbeResult("cpu", True, f"{physical} cores, {len(flags)} ISA flags from {source}")
    except Exception as exc:
        return Cpu(), ProbeResult("cpu", False, f"{type(exc).__name__}: {exc}")


def _parse_cpuinfo(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError:
        return {}
    logical, sockets, cores = 0, set(), set()
    info: dict = {}
    phys = None
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        key = key.lower()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            phys = value
            sockets.add(value)
        elif key == "core id":
            cores.add((phys, value))
        elif key == "model name" and "model" not in info:
            info["model"] = value
        elif key == "vendor_id" and "vendor" not in info:
            info["vendor"] = _VENDORS.get(value.lower(), value.lower())
        elif key == "cpu implementer" and "vendor" not in info:
            info["vendor"] = "arm"
        elif key in ("flags", "features") and "flags" not in info:
            info["flags"] = value.split()
    info.update(logical=logical, sockets=len(sockets), physical=len(cores))
    if info.get("vendor") == "arm" and "model" not in info:
        info["model"] = "arm64"
    return info


def _py_cpuinfo() -> dict:
    """Non-Linux fallback; slow (~1 s), so never on the Linux path."""
    import cpuinfo

    d = cpuinfo.get_cpu_info()
    vendor = str(d.get("vendor_id_raw", "")).lower()
    return {"model": d.get("brand_raw"), "vendor": _VENDORS.get(vendor, vendor or None),
            "flags": d.get("flags", []), "logical": d.get("count") or os.cpu_count() or 1}


def _psutil_physical() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:
        return None


def _numa_nodes(sys_root: Path) -> int:
    return len(list((sys_root / "devices" / "system" / "node").glob("node[0-9]*"))) or 1


# --- RAM ------------------------------------------------------------------------------------------------
def _ram(proc_root: Path, sys_root: Path) -> tuple[int, int | None]:
    total, avail = _meminfo(proc_root / "meminfo")
    if not total:
        import psutil

        vm = psutil.virtual_memory()
        total, avail = int(vm.total), int(vm.available)
    limit = _cgroup_limit(sys_root)
    if limit and limit < total:  # a container sees the host's RAM in meminfo but may only use its limit
        total, avail = limit, min(avail, limit) if avail is not None else None
    return total, avail


def _meminfo(path: Path) -> tuple[int, int | None]:
    try:
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    except OSError:
        return 0, None

    def kib(key):
        return int(fields[key].split()[0]) * 1024 if key in fields else None

    return kib("MemTotal") or 0, kib("MemAvailable")


def _cgroup_limit(sys_root: Path) -> int | None:
    for f in ("fs/cgroup/memory.max", "fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            text = (sys_root / f).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


# --- disk -----------------------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """Where Hugging Face downloads go (huggingface_hub's own rules), so free space means room for weights."""
    return hub_cache_dir()


def probe_disk(path: str | os.PathLike | None = None) -> tuple[Disk, ProbeResult]:
    """Free space at `path` (default: the HF cache); read speed is not measured (Disk's NVMe default)."""
    try:
        target = Path(path) if path else default_model_dir()
    except Exception:  # no home directory
        target = Path(tempfile.gettempdir())
    try:
        existing = target
        while not existing.exists() and existing != existing.parent:  # cache dir may not exist yet
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        return Disk(path=str(target), free_bytes=int(free)), ProbeResult("disk", True, f"free space at {existing}")
    except Exception as exc:
        return Disk(path=str(target)), ProbeResult("disk", False, f"{type(exc).__name__}: {exc}")
