"""Datasheet numbers for GPUs that probes cannot measure: memory bandwidth, dense bf16 rate, link speeds.

Drivers report names and memory, not speeds, so probes look the name (or Intel PCI id) up here. Rates are
dense (no sparsity) bf16 tensor-core/XMX peaks with fp32 accumulate; bandwidths are GB/s, one direction.
Unknown GPUs get a modest fallback so the planner still works, and the probe says the numbers are guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    name: str  # display name (for Intel sysfs, where the driver gives only an id)
    bandwidth_gbs: float
    bf16_tflops: float
    nvlink_gbs: float = 0.0  # NVLink total over all links, one direction (0: none)
    pcie_gbs: float = 25.0  # host link, one direction: PCIe 4 x16 ~25, PCIe 5 x16 ~55, x8 half that
    memory_bytes: int = 0  # only needed where the probe cannot read it (Intel sysfs)
    stacks: int = 1  # Intel Max: tiles a ZE_AFFINITY_MASK "card.stack" entry can select
    known: bool = True

    def __post_init__(self):  # the table is written with ints; profiles hold floats
        for f in ("bandwidth_gbs", "bf16_tflops", "nvlink_gbs", "pcie_gbs"):
            object.__setattr__(self, f, float(getattr(self, f)))


# First match wins, so specific patterns come before general ones. Patterns are searched in the
# lower-cased NVML name, e.g. "nvidia h100 80gb hbm3", "nvidia a100-sxm4-40gb", "nvidia geforce rtx 4090".
_NVIDIA: list[tuple[str, GpuSpec]] = [
    (r"b200", GpuSpec("B200", 8000, 2250, nvlink_gbs=900, pcie_gbs=55)),
    (r"h200", GpuSpec("H200", 4800, 989, nvlink_gbs=450, pcie_gbs=55)),
    (r"h100.*nvl", GpuSpec("H100 NVL", 3900, 835, nvlink_gbs=300, pcie_gbs=55)),
    (r"h100.*pcie", GpuSpec("H100 PCIe", 2000, 756, nvlink_gbs=300, pcie_gbs=55)),
    (r"h100", GpuSpec("H100 SXM", 3350, 989, nvlink_gbs=450, pcie_gbs=55)),  # "H100 80GB HBM3"
    (r"h800", GpuSpec("H800", 3350, 989, nvlink_gbs=200, pcie_gbs=55)),
    (r"\bh20\b", GpuSpec("H20", 4000, 148, nvlink_gbs=450, pcie_gbs=55)),
    (r"a100.*(80gb.*pcie|pcie.*80gb)", GpuSpec("A100 80GB PCIe", 1935, 312, nvlink_gbs=300)),
    (r"a100.*80gb", GpuSpec("A100 80GB SXM", 2039, 312, nvlink_gbs=300)),
    (r"a100", GpuSpec("A100 40GB", 1555, 312, nvlink_gbs=300)),
    (r"\ba30\b", GpuSpec("A30", 933, 165, nvlink_gbs=100)),
    (r"\ba10g\b", GpuSpec("A10G", 600, 70)),
    (r"\ba10\b", GpuSpec("A10", 600, 125)),
    (r"\bl40s\b", GpuSpec("L40S", 864, 362)),
    (r"\bl40\b", GpuSpec("L40", 864, 181)),
    (r"\bl4\b", GpuSpec("L4", 300, 121)),
    (r"rtx 6000 ada", GpuSpec("RTX 6000 Ada", 960, 364)),
    (r"rtx a6000", GpuSpec("RTX A6000", 768, 155, nvlink_gbs=56)),
    (r"rtx 5090", GpuSpec("RTX 5090", 1792, 209, pcie_gbs=55)),
    (r"rtx 4090", GpuSpec("RTX 4090", 1008, 165)),
    (r"rtx 4080", GpuSpec("RTX 4080", 717, 97)),
    (r"rtx 3090", GpuSpec("RTX 3090", 936, 71, nvlink_gbs=56)),
    # No bf16 units before Ampere: these are fp16 rates (the planner should choose fp16 there).
    (r"v100", GpuSpec("V100", 900, 125, nvlink_gbs=150, pcie_gbs=12)),
    (r"\bt4\b", GpuSpec("T4", 320, 65, pcie_gbs=12)),
]
_NVIDIA_FALLBACK = GpuSpec("unknown NVIDIA GPU", 500, 50, known=False)

# Intel: the sysfs path knows only the PCI device id; torch.xpu gives names like "Intel(R) Arc(TM) A770 Graphics".
_INTEL: list[tuple[tuple[int, ...], str, GpuSpec]] = [
    # 0x56a0 is also the 8 GB A770; 16 GB is the common one. Memory = what torch.xpu reports.
    ((0x56A0,), "a770", GpuSpec("Intel(R) Arc(TM) A770 Graphics", 560, 138, memory_bytes=16225243136)),
    ((0x56A1,), "a750", GpuSpec("Intel(R) Arc(TM) A750 Graphics", 512, 118, memory_bytes=8 * GiB)),
    ((0x56A2,), "a580", GpuSpec("Intel(R) Arc(TM) A580 Graphics", 512, 84, memory_bytes=8 * GiB)),
    ((0x56A5,), "a380", GpuSpec("Intel(R) Arc(TM) A380 Graphics", 186, 33, pcie_gbs=12, memory_bytes=6 * GiB)),
    ((0xE20B,), "b580", GpuSpec("Intel(R) Arc(TM) B580 Graphics", 456, 117, pcie_gbs=12, memory_bytes=12 * GiB)),
    ((0xE20C,), "b570", GpuSpec("Intel(R) Arc(TM) B570 Graphics", 380, 99, pcie_gbs=12, memory_bytes=10 * GiB)),
    ((0x56C0,), "flex 170", GpuSpec("Intel(R) Data Center GPU Flex 170", 576, 128, memory_bytes=16 * GiB)),
    # Flex 140 = two GPUs on one card; each PCI function is one 6 GB GPU on x8.
    ((0x56C1,), "flex 140", GpuSpec("Intel(R) Data Center GPU Flex 140", 186, 26, pcie_gbs=12, memory_bytes=6 * GiB)),
    ((0x0BD5,), "max 1550", GpuSpec("Intel(R) Data Center GPU Max 1550", 3276, 839, pcie_gbs=55,
                                     memory_bytes=128 * GiB, stacks=2)),
    ((0x0BDA,), "max 1100", GpuSpec("Intel(R) Data Center GPU Max 1100", 1229, 352, pcie_gbs=55,
                                     memory_bytes=48 * GiB)),
]
_INTEL_FALLBACK = GpuSpec("unknown Intel GPU", 200, 20, known=False)


def nvidia(name: str) -> GpuSpec:
    low = name.lower()
    for pattern, spec in _NVIDIA:
        if re.search(pattern, low):
            return spec
    return _NVIDIA_FALLBACK


def intel_by_id(device_id: int) -> GpuSpec | None:
    """None for ids not in the table: integrated graphics share vendor 0x8086 and must not count as GPUs."""
    for ids, _, spec in _INTEL:
        if device_id in ids:
            return spec
    return None


def intel_by_name(name: str) -> GpuSpec:
    low = name.lower()
    for _, pattern, spec in _INTEL:
        if pattern in low:
            return spec
    return _INTEL_FALLBACK


def lookup(vendor: str, name: str) -> GpuSpec | None:
    """Spec for any accelerator the tables cover (None for other vendors)."""
    if vendor == "nvidia":
        return nvidia(name)
    if vendor == "intel":
        return intel_by_name(name)
    return None
