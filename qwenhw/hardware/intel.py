"""Intel discrete GPUs (Arc, Flex, Data Center GPU Max).

torch.xpu is asked only when torch is already imported (the engine did it); detection itself never imports
torch. Otherwise the PCI ids under /sys/class/drm name the card and the spec table gives memory and speed.
The sysfs path shows a Max 1550 as one 128 GiB device (Level Zero COMPOSITE view); with
ZE_FLAT_DEVICE_HIERARCHY=FLAT (default on recent drivers) frameworks see each 64 GiB stack as a device.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from . import specs
from .profile import Accelerator, ProbeResult

NAME = "intel"
_BUS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def probe(sys_root: str | os.PathLike = "/sys") -> tuple[list[Accelerator], ProbeResult]:
    try:
        torch = sys.modules.get("torch")
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            return _from_xpu(xpu)
        return _from_sysfs(Path(sys_root))
    except Exception as exc:
        return [], ProbeResult(NAME, False, f"{type(exc).__name__}: {exc}")


def _from_xpu(xpu) -> tuple[list[Accelerator], ProbeResult]:
    """torch.xpu already applies ZE_AFFINITY_MASK and knows the real memory size."""
    out = []
    for i in range(xpu.device_count()):
        p = xpu.get_device_properties(i)
        spec = specs.intel_by_name(p.name)
        out.append(Accelerator(index=i, vendor="intel", name=p.name, memory_bytes=int(p.total_memory),
                               bandwidth_gbs=spec.bandwidth_gbs, bf16_tflops=spec.bf16_tflops))
    return out, ProbeResult(NAME, True, f"{len(out)} Intel GPU(s) via torch.xpu")


def _from_sysfs(sys_root: Path) -> tuple[list[Accelerator], ProbeResult]:
    drm = sys_root / "class" / "drm"
    if not drm.is_dir():
        return [], ProbeResult(NAME, True, f"no {drm}: no Intel GPU")
    cards, skipped = [], []
    for card in sorted(drm.glob("card[0-9]*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        if "-" in card.name:  # connectors such as card0-DP-1
            continue
        dev = card / "device"
        if _read(dev / "vendor") != "0x8086" or not _read(dev / "class").startswith("0x03"):
            continue
        device_id = int(_read(dev / "device") or "0", 16)
        spec = specs.intel_by_id(device_id)
        if spec is None:
            skipped.append(f"{device_id:#06x}")
        else:
            cards.append((spec, _bus_id(dev)))
    devices, note = _apply_mask(cards, os.environ.get("ZE_AFFINITY_MASK"))
    detail = f"{len(devices)} Intel GPU(s) from PCI ids in {drm}" + note
    if skipped:
        detail += f"; ignored Intel display device(s) {', '.join(skipped)} (integrated or not in the table)"
    return devices, ProbeResult(NAME, True, detail)


def _apply_mask(cards: list, mask: str | None) -> tuple[list[Accelerator], str]:
    """ZE_AFFINITY_MASK: "0,2" picks cards, "0.1" one stack of card 0; unset or empty keeps all."""
    if not mask or not mask.strip():
        picks = [(i, None) for i in range(len(cards))]
    else:
        picks = [p for p in (_parse_mask_entry(e) for e in mask.split(",")) if p and p[0] < len(cards)]
    out = []
    for card, stack in picks:
        spec, bus = cards[card]
        if stack is not None and stack >= spec.stacks:
            continue  # Level Zero ignores entries that name nothing
        acc = _accelerator(spec, bus, len(out))
        if stack is not None and spec.stacks > 1:  # one stack: its share of memory, bandwidth and compute
            k = spec.stacks
            acc = replace(acc, memory_bytes=acc.memory_bytes // k, bandwidth_gbs=acc.bandwidth_gbs / k,
                          bf16_tflops=acc.bf16_tflops / k, name=f"{acc.name} (stack {stack})")
        out.append(acc)
    note = f"; ZE_AFFINITY_MASK={mask!r} keeps {len(out)} of {len(cards)}" if mask and mask.strip() else ""
    return out, note


def _parse_mask_entry(entry: str) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*", entry)
    if not m:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) is not None else None)


def _accelerator(spec: specs.GpuSpec, bus: str | None, index: int) -> Accelerator:
    return Accelerator(index=index, vendor="intel", name=spec.name, memory_bytes=spec.memory_bytes,
                       bandwidth_gbs=spec.bandwidth_gbs, bf16_tflops=spec.bf16_tflops, pci_bus_id=bus)


def _bus_id(dev: Path) -> str | None:
    """The device entry is a symlink into /sys/devices/.../0000:03:00.0."""
    name = Path(os.path.realpath(dev)).name.lower()
    return name if _BUS_RE.match(name) else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""
