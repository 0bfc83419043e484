"""What a machine (or several) offers: frozen data, JSON round-trip, no probing here.

Probes in this package fill these classes; bundled profiles and user files load into them; the planner
reads them. Sizes are bytes, bandwidths GB/s (10^9 bytes per second), compute TFLOP/s.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadInput

SCHEMA_VERSION = 1
GiB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    """One GPU (or other accelerator) as the planner sees it."""

    index: int  # position after CUDA_VISIBLE_DEVICES / ZE_AFFINITY_MASK
    vendor: str  # "nvidia" | "intel" | "amd" | plugin-defined
    name: str
    memory_bytes: int
    free_bytes: int | None = None
    bandwidth_gbs: float = 0.0  # device memory bandwidth
    bf16_tflops: float = 0.0  # dense bf16 matrix rate
    compute_capability: str | None = None  # NVIDIA "9.0"
    fp8: bool = False  # native fp8 matmuls (Ada/Hopper and later, Intel Max/B-series no)
    pci_bus_id: str | None = None
    uuid: str | None = None

    @property
    def device_id(self) -> str:
        prefix = {"nvidia": "cuda", "intel": "xpu", "amd": "rocm"}.get(self.vendor, self.vendor)
        return f"{prefix}:{self.index}"


@dataclass(frozen=True)
class Link:
    """A link between two accelerators of one node; `kind` is nvlink, pcie, xelink, ..."""

    a: int
    b: int
    kind: str
    bandwidth_gbs: float  # one direction


@dataclass(frozen=True)
class Cpu:
    model: str = "unknown"
    vendor: str = "unknown"  # "intel" | "amd" | "arm" | ...
    sockets: int = 1
    physical_cores: int = 1
    logical_cores: int = 1
    numa_nodes: int = 1
    flags: tuple[str, ...] = ()  # normalised ISA flags: avx2, avx512f, avx512_bf16, amx_bf16, amx_int8, ...
    ram_bytes: int = 0
    ram_available_bytes: int | None = None
    memory_bandwidth_gbs: float = 0.0  # what one process streams from RAM (measured or datasheet x 0.7)
    bf16_tflops: float = 0.0

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def native_bf16(self) -> bool:
        return self.has("amx_bf16") or self.has("avx512_bf16")


@dataclass(frozen=True)
class Disk:
    path: str = "/tmp"
    free_bytes: int = 0
    read_gbs: float = 2.0  # NVMe-class sequential read


@dataclass(frozen=True)
class Node:
    hostname: str = "localhost"
    cpu: Cpu = field(default_factory=Cpu)
    accelerators: tuple[Accelerator, ...] = ()
    links: tuple[Link, ...] = ()
    disk: Disk = field(default_factory=Disk)
    host_to_device_gbs: float = 25.0  # pinned host->device copy (PCIe 4 x16 ~25, PCIe 5 ~55)
    network_gbs: float = 0.0  # to other nodes (InfiniBand 400G ~ 50 GB/s); 0 for a single node
    address: str | None = None  # where other nodes reach it (a Ray cluster's node IP), when known

    def link(self, a: int, b: int) -> Link | None:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        return None

    def gpus(self, vendor: str | None = None) -> tuple[Accelerator, ...]:
        return tuple(d for d in self.accelerators if vendor is None or d.vendor == vendor)


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found or why it found nothing; detection never raises."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class HardwareProfile:
    name: str = "this machine"
    nodes: tuple[Node, ...] = (Node(),)
    probes: tuple[ProbeResult, ...] = ()
    local: bool = False  # True when detected on the machine that plans (installed software matters)
    schema: int = SCHEMA_VERSION

    @property
    def node(self) -> Node:
        return self.nodes[0]

    @property
    def accelerators(self) -> tuple[Accelerator, ...]:
        return tuple(a for n in self.nodes for a in n.accelerators)

    def vendors(self) -> set[str]:
        return {a.vendor for a in self.accelerators}

    def summary(self) -> str:
        parts = []
        for n in self.nodes:
            gpus: dict[str, int] = {}
            for a in n.accelerators:
                key = f"{a.name} {a.memory_bytes / GiB:.0f} GiB"
                gpus[key] = gpus.get(key, 0) + 1
            gpu_text = ", ".join(f"{c}x {k}" for k, c in gpus.items()) or "no GPU"
            parts.append(
                f"{gpu_text}; {n.cpu.physical_cores} cores {n.cpu.model}, {n.cpu.ram_bytes / GiB:.0f} GiB RAM"
            )
        prefix = f"{len(self.nodes)} nodes: " if len(self.nodes) > 1 else ""
        return prefix + " | ".join(parts)

    # --- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> "HardwareProfile":
        try:
            _check(cls, data, "", required=("nodes",))
            schema = int(data.get("schema", SCHEMA_VERSION))
            if schema > SCHEMA_VERSION:
                raise BadInput(
                    f"{source} uses hardware-profile schema {schema}, but this qwenhw reads schema "
                    f"{SCHEMA_VERSION} and older. Upgrade qwenhw or re-create the file with `qwenhw detect --json`."
                )
            if not isinstance(data["nodes"], (list, tuple)) or not data["nodes"]:
                raise ValueError("'nodes' must be a non-empty list of nodes")
            nodes = tuple(_node_from_dict(n, f"nodes[{i}]") for i, n in enumerate(data["nodes"]))
            probes = tuple(ProbeResult(**_check(ProbeResult, p, f"probes[{i}]"))
                           for i, p in enumerate(data.get("probes", [])))
            return cls(
                name=str(data.get("name", source)),
                nodes=nodes,
                probes=probes,
                local=bool(data.get("local", False)),
                schema=SCHEMA_VERSION,
            )
        except BadInput:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise BadInput(
                f"{source} is not a valid hardware profile: {exc}. A profile is the JSON that `qwenhw detect "
                f"--json` prints ({{'name', 'nodes': [{{'cpu': {{...}}, 'accelerators': [{{'index', 'vendor', "
                f"'name', 'memory_bytes', ...}}]}}]}}): start from that output or a bundled profile (`qwenhw "
                f"detect --list`)."
            ) from None

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> "HardwareProfile":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(
                f"{source} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                f"Fix the file or regenerate it with `qwenhw detect --json > {source}`."
            ) from None
        if not isinstance(data, dict):
            raise BadInput(f"{source} must hold a JSON object (a hardware profile), not {type(data).__name__}.")
        return cls.from_dict(data, source)


# Fields that must hold at least 1 (counts) or more than 0 (sizes without which a device is not one)
_AT_LEAST_ONE = {"sockets", "physical_cores", "logical_cores", "numa_nodes"}
_POSITIVE = {"memory_bytes"}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check(klass, data: Any, where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`data` as the fields of `klass` (a frozen dataclass of this module), or ValueError saying which field
    is wrong, how, and the closest field names for unknown ones."""
    import difflib
    import math

    what = where or "the profile"
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(data).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(klass)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=2)
            raise ValueError(f"{what} has an unknown field {key!r}" + (f" (did you mean {' or '.join(near)}?)" if near
                                                                      else f"; {klass.__name__} fields: {', '.join(fields)}"))
    for key in required:
        if key not in data:
            raise ValueError(f"{what} lacks {key!r}")
    for key, value in data.items():
        kind = str(fields[key]).replace(" ", "")
        optional = kind.endswith("|None")
        base = kind.removesuffix("|None")
        path = f"{where}.{key}" if where else key
        if value is None and optional:
            continue
        if base in _TYPES:
            ok = isinstance(value, _TYPES[base]) and not (base != "bool" and isinstance(value, bool))
            if not ok:
                raise ValueError(f"{path} is {value!r} ({type(value).__name__}); it must be {_NOUN[base]}")
            if base in ("int", "float"):
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"{path} is {value!r}; it must be a finite number of at least 0")
                if key in _AT_LEAST_ONE and value < 1 or key in _POSITIVE and value <= 0:
                    raise ValueError(f"{path} is {value!r}; it must be at least 1")
        elif base.startswith("tuple[str"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{path} must be a list of strings")
    return data


_NOUN = {"int": "a whole number (bytes, counts)", "float": "a number", "str": "a string", "bool": "true or false"}


def _node_from_dict(d: dict[str, Any], where: str = "nodes[0]") -> Node:
    d = dict(_check(Node, d, where))
    cpu = dict(_check(Cpu, d.pop("cpu", {}), f"{where}.cpu"))
    if "flags" in cpu:
        cpu["flags"] = tuple(cpu["flags"])
    accs = tuple(Accelerator(**_check(Accelerator, a, f"{where}.accelerators[{i}]",
                                      required=("index", "vendor", "name", "memory_bytes")))
                 for i, a in enumerate(d.pop("accelerators", [])))
    links = tuple(Link(**_check(Link, x, f"{where}.links[{i}]", required=("a", "b", "kind", "bandwidth_gbs")))
                  for i, x in enumerate(d.pop("links", [])))
    disk = Disk(**_check(Disk, d.pop("disk", {}), f"{where}.disk"))
    return Node(cpu=Cpu(**cpu), accelerators=accs, links=links, disk=disk, **d)
