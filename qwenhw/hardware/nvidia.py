"""NVIDIA GPUs through NVML (nvidia-ml-py): names, memory, compute capability, NVLink/PCIe links.

NVML is a small C library that answers in milliseconds and needs no CUDA context, so detection never imports
torch. Indices follow NVML order (PCI bus order; set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA agrees) filtered
by CUDA_VISIBLE_DEVICES. `probe()` returns Accelerators followed by Links, and never raises.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass

from . import specs
from .profile import Accelerator, Link, ProbeResult

NAME = "nvidia"


def probe(allow_torch_import: bool = False) -> tuple[list[Accelerator | Link], ProbeResult]:
    try:
        import pynvml as nv

        nv.nvmlInit()
    except Exception as exc:  # no driver, no library, no GPU
        return torch_fallback(f"NVML unavailable ({_err(exc)})", allow_torch_import)
    try:
        return _probe_nvml(nv)
    except Exception as exc:
        return [], ProbeResult(NAME, False, f"NVML query failed: {_err(exc)}")
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def visible_indices(cvd: str | None, uuids: list[str]) -> tuple[list[int], str]:
    """NVML indices CUDA would expose, in CUDA order, plus a note on ignored entries.

    Like CUDA: unset means all, empty means none, entries are indices or (prefixes of) GPU-UUIDs, and
    the first entry that names no GPU ends the list.
    """
    if cvd is None:
        return list(range(len(uuids))), ""
    if not cvd.strip():
        return [], "; CUDA_VISIBLE_DEVICES is empty: no GPU visible"
    out: list[int] = []
    for token in (t.strip() for t in cvd.split(",")):
        idx = _match_device(token, uuids)
        if idx is None:
            return out, f"; CUDA_VISIBLE_DEVICES entry {token!r} names no GPU, it and later entries ignored"
        if idx not in out:
            out.append(idx)
    return out, ""


def _match_device(token: str, uuids: list[str]) -> int | None:
    if token.isdigit():
        return int(token) if int(token) < len(uuids) else None
    t = token.lower()
    if not t.startswith("gpu-"):  # MIG-... instances are not modelled
        return None
    hits = [i for i, u in enumerate(uuids) if u.lower().startswith(t)]
    return hits[0] if len(hits) == 1 else None


def _probe_nvml(nv) -> tuple[list[Accelerator | Link], ProbeResult]:
    count = nv.nvmlDeviceGetCount()
    handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    uuids = [_s(nv.nvmlDeviceGetUUID(h)) for h in handles]
    order, note = visible_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
    devices = [_device(nv, handles[i], pos) for pos, i in enumerate(order)]
    # Bus id of every GPU (hidden ones too) -> visible position or None, so that an NVLink to a hidden GPU
    # is not mistaken for a link to an NVSwitch.
    bus_to_pos = {_bus(nv, h): None for h in handles}
    bus_to_pos.update({d.pci_bus_id: d.index for d in devices})
    links = _links(nv, [handles[i] for i in order], devices, bus_to_pos)
    guessed = sorted({d.name for d in devices if not specs.nvidia(d.name).known})
    if guessed:
        note += f"; no datasheet numbers for {', '.join(guessed)}: bandwidth/TFLOP/s are rough guesses"
    detail = f"{len(devices)} of {count} NVIDIA GPU(s) visible via NVML" + note
    return [*devices, *links], ProbeResult(NAME, True, detail)


def _device(nv, h, pos: int) -> Accelerator:
    name = _s(nv.nvmlDeviceGetName(h))
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
    spec = specs.nvidia(name)
    return Accelerator(
        index=pos,
        vendor="nvidia",
        name=name,
        memory_bytes=int(mem.total),
        free_bytes=int(mem.free),
        bandwidth_gbs=spec.bandwidth_gbs,
        bf16_tflops=spec.bf16_tflops,
        compute_capability=f"{major}.{minor}",
        fp8=(major, minor) >= (8, 9),  # Ada and Hopper onwards
        pci_bus_id=_bus(nv, h),
        uuid=_s(nv.nvmlDeviceGetUUID(h)),
    )


# --- links ----------------------------------------------------------------------------------------------
@dataclass
class _Ports:
    peers: Counter  # visible position -> number of direct NVLinks
    switch: int  # NVLinks that end at an NVSwitch (HGX boards: every GPU reaches every other through them)


def _links(nv, handles, devices, bus_to_pos) -> list[Link]:
    if len(devices) < 2:
        return []
    ports = [_nvlink_ports(nv, h, bus_to_pos) for h in handles]
    out = []
    for a in range(len(devices)):
        for b in range(a + 1, len(devices)):
            out.append(_pair_link(nv, handles, devices, ports, a, b))
    return out


def _nvlink_ports(nv, h, bus_to_pos) -> _Ports | None:
    """Count active NVLinks by remote end; None if the GPU has no active NVLink (or NVML cannot tell)."""
    peers: Counter = Counter()
    switch = 0
    for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                continue
            remote = _norm_bus(_s(nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId))
        except Exception:  # link index past this GPU's links, or NVLink not supported
            continue
        if remote not in bus_to_pos:
            switch += 1
        elif bus_to_pos[remote] is not None:
            peers[bus_to_pos[remote]] += 1
    return _Ports(peers, switch) if peers or switch else None


def _pair_link(nv, handles, devices, ports, a: int, b: int) -> Link:
    per_link = _nvlink_gbs_per_link(devices[a].compute_capability)
    pa, pb = ports[a], ports[b]
    if pa and pb:
        n = pa.peers.get(b, 0) + (min(pa.switch, pb.switch) if pa.switch and pb.switch else 0)
        if n:
            return Link(a, b, "nvlink", n * per_link)
    spec_a, spec_b = specs.nvidia(devices[a].name), specs.nvidia(devices[b].name)
    if _p2p_over_nvlink(nv, handles[a], handles[b]):  # link counts unavailable: use the datasheet total
        return Link(a, b, "nvlink", min(spec_a.nvlink_gbs, spec_b.nvlink_gbs) or per_link)
    pcie = min(spec_a.pcie_gbs, spec_b.pcie_gbs)
    if _crosses_sockets(nv, handles[a], handles[b]):
        pcie /= 2  # traffic goes through host memory and the CPU interconnect
    return Link(a, b, "pcie", pcie)


def _nvlink_gbs_per_link(cc: str | None) -> float:
    """One direction per link: NVLink 2-4 carry 25 GB/s (V100 6 links = 150, A100 12 = 300, H100 18 = 450),
    NVLink 5 (Blackwell) 50."""
    major = int(cc.split(".")[0]) if cc else 0
    return 50.0 if major >= 10 else 25.0 if major >= 7 else 20.0


def _p2p_over_nvlink(nv, ha, hb) -> bool:
    try:
        status = nv.nvmlDeviceGetP2PStatus(ha, hb, nv.NVML_P2P_CAPS_INDEX_NVLINK)
        return status == nv.NVML_P2P_STATUS_OK
    except Exception:
        return False


def _crosses_sockets(nv, ha, hb) -> bool:
    try:
        return nv.nvmlDeviceGetTopologyCommonAncestor(ha, hb) >= nv.NVML_TOPOLOGY_SYSTEM
    except Exception:
        return False


# --- torch fallback -------------------------------------------------------------------------------------
def torch_fallback(reason: str, allow_import: bool = False) -> tuple[list[Accelerator | Link], ProbeResult]:
    """torch.cuda when NVML is missing, but only if torch is already imported (or the caller allows the
    import): importing torch takes seconds and planning must stay light."""
    torch = sys.modules.get("torch")
    if torch is None and allow_import:
        try:
            import torch
        except Exception as exc:
            return [], ProbeResult(NAME, False, f"{reason}; torch not importable ({_err(exc)})")
    if torch is None:
        return [], ProbeResult(NAME, False, f"{reason}; torch.cuda fallback skipped (torch not imported)")
    try:
        if getattr(torch.version, "hip", None) or not torch.cuda.is_available():
            return [], ProbeResult(NAME, False, f"{reason}; torch.cuda sees no NVIDIA GPU")
        devices = [_torch_device(torch, i) for i in range(torch.cuda.device_count())]
    except Exception as exc:
        return [], ProbeResult(NAME, False, f"{reason}; torch.cuda failed ({_err(exc)})")
    return list(devices), ProbeResult(NAME, True, f"{reason}; {len(devices)} GPU(s) via torch.cuda, links unknown")


def _torch_device(torch, i: int) -> Accelerator:
    p = torch.cuda.get_device_properties(i)
    spec = specs.nvidia(p.name)
    return Accelerator(
        index=i,
        vendor="nvidia",
        name=p.name,
        memory_bytes=int(p.total_memory),
        bandwidth_gbs=spec.bandwidth_gbs,
        bf16_tflops=spec.bf16_tflops,
        compute_capability=f"{p.major}.{p.minor}",
        fp8=(p.major, p.minor) >= (8, 9),
    )


# --- small helpers --------------------------------------------------------------------------------------
def _s(value) -> str:
    """Older nvidia-ml-py returns bytes, newer str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _bus(nv, h) -> str:
    return _norm_bus(_s(nv.nvmlDeviceGetPciInfo(h).busId))


def _norm_bus(bus: str) -> str:
    """NVML says "00000000:18:00.0" (and legacy "0000:18:00.0"); keep sysfs style "0000:18:00.0"."""
    parts = bus.strip().lower().split(":")
    if len(parts) == 3:
        try:
            return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}"
        except ValueError:
            pass
    return bus.strip().lower()


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
