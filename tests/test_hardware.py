"""Hardware probes against faked NVML / procfs / sysfs, bundled profiles, and detect() on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

import qwenhw.hardware as hw
from qwenhw.errors import BadInput
from qwenhw.hardware import cpu, intel, nvidia, specs
from qwenhw.hardware.profile import Accelerator, HardwareProfile, Link, ProbeResult

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2
GiB = 1024**3


# --- fake NVML ------------------------------------------------------------------------------------------
def fake_pynvml(gpus, nvlinks=None, init_error=None, p2p_nvlink=False, topology=10):
    """A pynvml stand-in. gpus: dicts(name, mib, cc, bus, uuid); nvlinks: gpu -> remote bus id per link."""
    nvlinks = nvlinks or {}
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def nvlink_state(h, link):
        if link >= len(nvlinks.get(h, ())):
            raise NVMLError("Invalid Argument")
        return 1

    def init():
        if init_error:
            raise NVMLError(init_error)

    m.__dict__.update(
        NVMLError=NVMLError, NVML_NVLINK_MAX_LINKS=18, NVML_FEATURE_ENABLED=1, NVML_P2P_CAPS_INDEX_NVLINK=2,
        NVML_P2P_STATUS_OK=0, NVML_TOPOLOGY_SYSTEM=50,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: gpus[h]["name"].encode(),  # old nvidia-ml-py returns bytes
        nvmlDeviceGetUUID=lambda h: gpus[h]["uuid"],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=gpus[h]["mib"] * MiB, free=(gpus[h]["mib"] - 500) * MiB),
        nvmlDeviceGetCudaComputeCapability=lambda h: gpus[h]["cc"],
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(busId=gpus[h]["bus"]),
        nvmlDeviceGetNvLinkState=nvlink_state,
        nvmlDeviceGetNvLinkRemotePciInfo=lambda h, link: SimpleNamespace(busId=nvlinks[h][link]),
        nvmlDeviceGetP2PStatus=lambda a, b, i: 0 if p2p_nvlink else 1,
        nvmlDeviceGetTopologyCommonAncestor=lambda a, b: topology,
    )
    return m


def gpu(i, name="NVIDIA H100 80GB HBM3", mib=81559, cc=(9, 0)):
    return {"name": name, "mib": mib, "cc": cc, "bus": f"00000000:{0x18 + i:02X}:00.0", "uuid": f"GPU-{i}{i}{i}a-uuid"}


def hgx(n):
    """n H100s, each with 18 NVLinks to NVSwitches (NVML gives the switch end no real bus id)."""
    return [gpu(i) for i in range(n)], {i: ["FFFFFFFF:FF:FF.0"] * 18 for i in range(n)}  # as real HGX NVML reports


@pytest.fixture
def use_nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(*args, **kwargs):
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(*args, **kwargs))

    return install


def split(items):
    return [x for x in items if isinstance(x, Accelerator)], [x for x in items if isinstance(x, Link)]


def test_nvml_hgx_devices_and_nvswitch_links(use_nvml):
    use_nvml(*hgx(4))
    items, result = nvidia.probe()
    devs, links = split(items)
    assert result.ok and "4 of 4" in result.detail
    assert [d.name for d in devs] == ["NVIDIA H100 80GB HBM3"] * 4
    d = devs[0]
    assert (d.memory_bytes, d.free_bytes) == (81559 * MiB, 81059 * MiB)
    assert (d.compute_capability, d.fp8, d.bandwidth_gbs, d.bf16_tflops) == ("9.0", True, 3350.0, 989.0)
    assert (d.pci_bus_id, d.uuid, d.device_id) == ("0000:18:00.0", "GPU-000a-uuid", "cuda:0")
    assert len(links) == 6 and {(x.kind, x.bandwidth_gbs) for x in links} == {("nvlink", 450.0)}


def test_nvml_direct_nvlink_to_hidden_gpu_is_not_a_switch(use_nvml, monkeypatch):
    gpus = [gpu(i, "NVIDIA A100-SXM4-40GB", 40960, (8, 0)) for i in range(3)]
    bus = [g["bus"] for g in gpus]
    nvlinks = {0: [bus[1]] * 6 + [bus[2]] * 6, 1: [bus[0]] * 6 + [bus[2]] * 6, 2: [bus[0]] * 6 + [bus[1]] * 6}
    use_nvml(gpus, nvlinks)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    devs, links = split(nvidia.probe()[0])
    assert [d.fp8 for d in devs] == [False, False]
    assert links == [Link(0, 1, "nvlink", 150.0)]  # 6 links x 25 GB/s, nothing added for links to GPU 2


@pytest.mark.parametrize(
    "cvd, expect",
    [("GPU-222a,0", [2, 0]), ("gpu-111", [1]), ("1,7,0", [1]), ("3, 3", [3]), ("", []), ("MIG-abc", [])],
)
def test_cuda_visible_devices(use_nvml, monkeypatch, cvd, expect):
    use_nvml(*hgx(4))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    items, result = nvidia.probe()
    devs, links = split(items)
    assert result.ok
    assert [d.uuid for d in devs] == [f"GPU-{i}{i}{i}a-uuid" for i in expect]
    assert [d.index for d in devs] == list(range(len(expect)))  # renumbered like CUDA does
    assert len(links) == len(expect) * (len(expect) - 1) // 2
    if cvd == "":
        assert "empty" in result.detail


def test_pcie_fallback_and_cross_socket(use_nvml):
    use_nvml([gpu(0, "NVIDIA L4", 23034, (8, 9)), gpu(1, "NVIDIA L4", 23034, (8, 9))], topology=50)
    devs, links = split(nvidia.probe()[0])
    assert devs[0].fp8 and devs[0].bandwidth_gbs == 300.0
    assert links == [Link(0, 1, "pcie", 12.5)]


def test_p2p_nvlink_fallback_uses_datasheet(use_nvml):
    use_nvml([gpu(0, "NVIDIA H20", 97871), gpu(1, "NVIDIA H20", 97871)], p2p_nvlink=True)
    assert split(nvidia.probe()[0])[1] == [Link(0, 1, "nvlink", 450.0)]


def test_unknown_gpu_gets_fallback_and_note(use_nvml):
    use_nvml([gpu(0, "NVIDIA Future 9000", 100000, (12, 0))])
    (d,), result = nvidia.probe()
    assert d.bandwidth_gbs > 0 and d.bf16_tflops > 0 and "rough guesses" in result.detail


def test_nvml_init_failure_is_recorded(use_nvml, monkeypatch):
    use_nvml([], init_error="Driver Not Loaded")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    items, result = nvidia.probe()
    assert items == [] and not result.ok
    assert "Driver Not Loaded" in result.detail and "torch not imported" in result.detail
    assert "torch" not in sys.modules


def test_nvml_missing_uses_imported_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    props = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24564 * MiB, major=8, minor=9)
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda, version=SimpleNamespace(hip=None)))
    (d,), result = nvidia.probe()
    assert result.ok and "torch.cuda" in result.detail
    assert (d.name, d.compute_capability, d.bf16_tflops) == ("NVIDIA GeForce RTX 4090", "8.9", 165.0)


def test_nvml_query_error_never_raises(use_nvml, monkeypatch):
    use_nvml(*hgx(2))
    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetMemoryInfo", lambda h: 1 / 0)
    items, result = nvidia.probe()
    assert items == [] and not result.ok and "ZeroDivisionError" in result.detail


# --- CPU ------------------------------------------------------------------------------------------------
SPR_FLAGS = "fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 hypervisor"


def fake_proc_sys(tmp_path, sockets=2, cores=2, threads=2, flags=SPR_FLAGS, numa=2, cgroup="max"):
    proc, sysfs = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    blocks, n = [], 0
    for s in range(sockets):
        for c in range(cores):
            for _ in range(threads):
                blocks.append(
                    f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                    f"physical id\t: {s}\ncore id\t\t: {c}\nflags\t\t: {flags}\n"
                )
                n += 1
    (proc / "cpuinfo").write_text("\n".join(blocks))
    (proc / "meminfo").write_text("MemTotal:       16384000 kB\nMemFree:  1000 kB\nMemAvailable:   8192000 kB\n")
    for i in range(numa):
        (sysfs / "devices/system/node" / f"node{i}").mkdir(parents=True)
    (sysfs / "devices/system/node").mkdir(parents=True, exist_ok=True)
    (sysfs / "devices/system/node/possible").write_text("0-1\n")  # not a node: must not count
    (sysfs / "fs/cgroup").mkdir(parents=True)
    (sysfs / "fs/cgroup/memory.max").write_text(f"{cgroup}\n")
    return proc, sysfs


def test_cpu_from_fake_proc(tmp_path):
    proc, sysfs = fake_proc_sys(tmp_path)
    c, result = cpu.probe(proc, sysfs)
    assert result.ok, result.detail
    assert (c.model, c.vendor, c.sockets, c.physical_cores, c.logical_cores, c.numa_nodes) == (
        "Intel(R) Xeon(R) Platinum 8480+", "intel", 2, 4, 8, 2)
    assert c.flags == ("amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_vnni",
                       "avx512bw", "avx512f", "fma", "sse4_2")
    assert c.native_bf16 and c.has("amx_int8")
    assert (c.ram_bytes, c.ram_available_bytes) == (16384000 * 1024, 8192000 * 1024)
    assert c.memory_bandwidth_gbs == 32.0 and c.bf16_tflops == 2.0  # 4 cores x 8 GB/s; 4 x 0.5 AMX


def test_cpu_cgroup_limit_and_avx2_only(tmp_path):
    proc, sysfs = fake_proc_sys(tmp_path, sockets=1, cores=8, threads=1, flags="avx avx2 fma avx_vnni", numa=0,
                                cgroup=str(4 * GiB))
    c, _ = cpu.probe(proc, sysfs)
    assert (c.sockets, c.physical_cores, c.numa_nodes) == (1, 8, 1)
    assert not c.native_bf16 and c.flags == ("avx", "avx2", "avx_vnni", "fma")
    assert c.ram_bytes == 4 * GiB and c.ram_available_bytes == 4 * GiB


def test_flag_aliases_and_estimates():
    assert cpu.normalise_flags(["AVX512BF16", "amxtile", "neon", "junk"]) == ("amx_tile", "asimd", "avx512_bf16")
    assert cpu.estimate_memory_bandwidth(2, 112) == 500.0  # capped at 250 per socket
    assert cpu.estimate_bf16_tflops(("avx512_bf16",), 16) == 1.6


def test_disk_probe(tmp_path):
    d, result = cpu.probe_disk(tmp_path / "not" / "yet")
    assert result.ok and d.free_bytes > 0 and d.path.endswith("yet")


# --- Intel ----------------------------------------------------------------------------------------------
def fake_drm(tmp_path, cards):
    """cards: (pci device id, bus id) per drm card, plus connector/render entries that must be ignored."""
    root = tmp_path / "sys"
    drm = root / "class/drm"
    drm.mkdir(parents=True)
    for i, (dev_id, bus) in enumerate(cards):
        dev = root / "devices/pci0000:00" / bus
        dev.mkdir(parents=True)
        (dev / "vendor").write_text("0x8086\n")
        (dev / "device").write_text(f"{dev_id:#06x}\n")
        (dev / "class").write_text("0x030000\n")
        (drm / f"card{i}").mkdir()
        (drm / f"card{i}" / "device").symlink_to(dev)
    (drm / "card0-DP-1").mkdir()
    (drm / "renderD128").mkdir()
    return root


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delenv("ZE_AFFINITY_MASK", raising=False)


def test_intel_arc_from_sysfs(tmp_path, no_torch):
    root = fake_drm(tmp_path, [(0xA780, "0000:00:02.0"), (0x56A0, "0000:03:00.0"), (0x56A0, "0000:04:00.0")])
    devs, result = intel.probe(root)
    assert result.ok and "0xa780" in result.detail  # integrated graphics skipped, and said so
    assert [(d.index, d.name, d.pci_bus_id, d.device_id) for d in devs] == [
        (0, "Intel(R) Arc(TM) A770 Graphics", "0000:03:00.0", "xpu:0"),
        (1, "Intel(R) Arc(TM) A770 Graphics", "0000:04:00.0", "xpu:1"),
    ]
    assert devs[0].memory_bytes == 16225243136 and devs[0].bandwidth_gbs == 560.0


def test_intel_affinity_mask(tmp_path, no_torch, monkeypatch):
    root = fake_drm(tmp_path, [(0x56A0, "0000:03:00.0"), (0x56A0, "0000:04:00.0")])
    monkeypatch.setenv("ZE_AFFINITY_MASK", "1")
    devs, result = intel.probe(root)
    assert [(d.index, d.pci_bus_id) for d in devs] == [(0, "0000:04:00.0")] and "keeps 1 of 2" in result.detail


def test_intel_max1550_stack_mask(tmp_path, no_torch, monkeypatch):
    root = fake_drm(tmp_path, [(0x0BD5, "0000:29:00.0")])
    assert intel.probe(root)[0][0].memory_bytes == 128 * GiB
    monkeypatch.setenv("ZE_AFFINITY_MASK", "0.1")
    (d,), _ = intel.probe(root)
    assert d.memory_bytes == 64 * GiB and d.bf16_tflops == pytest.approx(419.5) and "stack 1" in d.name


def test_intel_no_drm_and_xpu_only_when_torch_imported(tmp_path, no_torch, monkeypatch):
    devs, result = intel.probe(tmp_path)
    assert devs == [] and result.ok
    props = SimpleNamespace(name="Intel(R) Arc(TM) B580 Graphics", total_memory=12 * GiB)
    xpu = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(xpu=xpu))
    (d,), result = intel.probe(tmp_path)
    assert "torch.xpu" in result.detail and d.bandwidth_gbs == 456.0


# --- bundled profiles -----------------------------------------------------------------------------------
BUNDLED = ["cpu-only", "1xRTX4090-24G", "1xL4-24G", "1xA100-40G", "1xH100-80G", "2xH100-80G", "4xH100-80G",
           "1xH200-141G", "8xH100-80G", "8xH200-141G", "4xH20-96G", "4xA10-24G", "2xArcA770-16G", "1xArcB580-12G",
           "1xMax1550-128G", "2x8xH100-80G"]


def test_bundled_names_exact():
    assert sorted(hw.bundled_names()) == sorted(BUNDLED) and hw.bundled_names()[0] == "cpu-only"


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profile_loads_and_round_trips(name):
    p = hw.load_bundled(name)
    assert p.name == name and not p.local
    assert HardwareProfile.from_json(p.to_json()) == p
    assert json.loads(p.to_json()) == json.loads(p.to_json(indent=None))
    for node in p.nodes:
        c = node.cpu
        assert c.physical_cores > 0 and c.ram_bytes > 0 and c.flags and c.memory_bandwidth_gbs > 0
        for a in node.accelerators:  # numbers agree with the table detection uses
            spec = specs.lookup(a.vendor, a.name)
            assert spec.known and (a.bandwidth_gbs, a.bf16_tflops) == (spec.bandwidth_gbs, spec.bf16_tflops)
            assert (a.compute_capability is not None) == (a.vendor == "nvidia")
        n = len(node.accelerators)
        assert len(node.links) == n * (n - 1) // 2
        assert all(node.link(a, b) for a in range(n) for b in range(a + 1, n))
    gpu_count = sum(len(n.accelerators) for n in p.nodes)
    assert gpu_count == {"cpu-only": 0, "2x8xH100-80G": 16}.get(name) or int(name.split("x")[0])


def test_bundled_specifics():
    p8 = hw.load_bundled("8xH100-80G")
    assert p8.node.accelerators[0].memory_bytes == 81559 * MiB and p8.node.cpu.has("amx_bf16")
    assert p8.node.link(0, 7).kind == "nvlink" and p8.node.cpu.physical_cores == 112
    assert hw.load_bundled("4xA10-24G").node.link(1, 3).kind == "pcie"
    rtx = hw.load_bundled("1xRTX4090-24G").node
    assert rtx.cpu.has("avx512_bf16") and not rtx.cpu.has("amx_bf16") and rtx.accelerators[0].fp8
    two = hw.load_bundled("2x8xH100-80G")
    assert len(two.nodes) == 2 and all(n.network_gbs == 50.0 for n in two.nodes)
    assert hw.load_bundled("1xMax1550-128G").node.accelerators[0].memory_bytes == 128 * GiB


# --- resolve_hardware -----------------------------------------------------------------------------------
def test_resolve_names_files_and_objects(tmp_path):
    assert hw.resolve_hardware("4xh100-80g").name == "4xH100-80G"
    f = tmp_path / "mine.json"
    f.write_text(hw.load_bundled("1xL4-24G").to_json())
    assert hw.resolve_hardware(str(f)) == hw.load_bundled("1xL4-24G")
    p = hw.load_bundled("cpu-only")
    assert hw.resolve_hardware(p) is p


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: "4xH100", ["4xH100-80G", "Did you mean"]),
        (lambda d: "8xh200", ["8xH200-141G"]),
        (lambda d: str(d / "missing.json"), ["does not exist"]),
        (lambda d: (d / "bad.json").write_text("{not json") and str(d / "bad.json"), ["not valid JSON"]),
        (lambda d: (d / "list.json").write_text("[]") and str(d / "list.json"), ["JSON object"]),
        (lambda d: (d / "f.json").write_text('{"nodes": [{"gpus": 3}]}') and str(d / "f.json"), ["not a valid"]),
        (lambda d: str(d), ["directory"]),
    ],
)
def test_resolve_bad_input(tmp_path, make, words):
    with pytest.raises(BadInput) as err:
        hw.resolve_hardware(make(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg


# --- detect ---------------------------------------------------------------------------------------------
def test_detect_this_machine():
    t = time.perf_counter()
    p = hw.detect()
    assert time.perf_counter() - t < 1.0  # ~15 ms here; a generous bound against loaded CI machines
    assert p.local and p.node.cpu.physical_cores >= 1 and p.node.cpu.ram_bytes > 0
    assert {"cpu", "disk", "nvidia", "intel"} <= {r.name for r in p.probes}
    assert HardwareProfile.from_json(p.to_json()) == p


def test_detect_with_fake_nvml_and_plugins(use_nvml):
    use_nvml(*hgx(2))

    def amd():
        return [Accelerator(0, "amd", "AMD Instinct MI300X", 192 * GiB)], ProbeResult("amd", True, "1 GPU")

    def broken():
        raise RuntimeError("amdsmi exploded")

    p = hw.detect(extra_probes=[amd, broken])
    assert [a.device_id for a in p.accelerators] == ["cuda:0", "cuda:1", "rocm:0"]
    assert p.node.link(0, 1).kind == "nvlink" and p.node.host_to_device_gbs == 55.0
    failed = [r for r in p.probes if not r.ok]
    assert any("amdsmi exploded" in r.detail for r in failed)


def test_detect_does_not_import_torch():
    code = "import qwenhw.hardware as h; h.detect(); import sys; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)
