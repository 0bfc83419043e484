"""The native engine's Triton kernels: the interpreter's tests (plugins/native/tests/kernels, one process per
module, started with TRITON_INTERPRET=1) and each kernel compiled for sm_90 ahead of time (CI has no GPU;
the interpreter runs what a GPU compiler may reject), its PTX checked for what the design relies on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("transformers")
import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from qwenhw_native.config import KernelConfig  # noqa: E402
from qwenhw_native.kernels import common, linear, moe, reduce, router, tiles  # noqa: E402

KERNEL_TESTS = sorted(p.name for p in (Path(__file__).parent / "kernels").glob("test_*.py"))


@pytest.mark.parametrize("module", KERNEL_TESTS)
def test_kernels_under_the_interpreter(module, tiny_moe):
    """Run one kernel test module in a process of its own under Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TEST_TINY_MOE_CHECKPOINT": str(tiny_moe)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                           "-o", "addopts=", str(Path(__file__).parent / "kernels" / module)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.strip().splitlines()[-1]


def _hopper_ptx(fn, sig: dict, consts: dict) -> str:
    """A kernel compiled for sm_90 ahead of time (PTX), its pointer arguments 16-byte aligned as a launch
    specialises them; skips where this Triton build has no ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget

    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, ty in sig.items() if ty.startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                                    constexprs=consts, attrs=aligned)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
    except RuntimeError as exc:  # no ptxas in this Triton build
        if "ptxas" in str(exc):
            pytest.skip(str(exc)[:200])
        raise


def test_reduce_norm_compiles_for_hopper():
    """The interpreter runs what a GPU compiler may reject (it let a plain module global through), and CI
    has no GPU: compile the kernel for sm_90 ahead of time, and check its flags are sys-scope atomics."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    sig = {"bufs_ptr": "i64", "pads_ptr": "i64", "offset": "i32", "h_ptr": "*bf16", "x_ptr": "*bf16",
           "w_ptr": "*bf16", "N": "i32", "H": "i32", "eps": "fp32"}
    for world, rows in ((2, 1), (4, 2), (3, 4)):
        consts = {"RANK": 1, "WORLD": world, "BW": triton.next_power_of_2(world), "LINE": reduce.PAD_LINE,
                  "R": rows, "BH": 2048, "PDL": world != 3}
        src = triton.compiler.ASTSource(fn=reduce._reduce_norm, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                                        constexprs=consts)
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        except RuntimeError as exc:  # no ptxas in this Triton build
            if "ptxas" in str(exc):
                pytest.skip(str(exc)[:200])
            raise
        assert "atom.global.release.sys.cas.b32" in ptx and "atom.global.acquire.sys.cas.b32" in ptx
        assert ("griddepcontrol.wait" in ptx) == consts["PDL"]
    # the pushing kernel: its spin reads its own memory past L1 (volatile), and no atomics or barrier
    sig = {"part_ptr": "*bf16", "ll_ptr": "i64", "offset": "i32", "stride": "i32", "h_ptr": "*bf16", "x_ptr": "*bf16",
           "w_ptr": "*bf16", "N": "i32", "eps": "fp32"}
    for world, rows in ((2, 1), (4, 2)):
        consts = {"RANK": 1, "WORLD": world, "R": rows, "HW": 1024, "BW": 1024, "PDL": world == 2}
        src = triton.compiler.ASTSource(fn=reduce._reduce_norm_push,
                                        signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        assert "ld.volatile.global" in ptx and "atom." not in ptx
        assert ("griddepcontrol.wait" in ptx) == consts["PDL"]


def test_moe_kernels_compile_for_hopper():
    """The MoE kernels for sm_90 ahead of time (see above), the split gate/up kernel included: weight loads
    pipelined (cp.async, given the 16-byte aligned pointers a launch specialises on), the split's count an
    acquire-release atomic and its partial sums read back from L2; the router GEMM + routing kernel alike."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    tiles = {"BP": 128, "BM": 16, "BN": 64, "BK": 128, "EXACT": False}
    kernels = [
        (moe._moe_gate_up, {"x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "index_ptr": "*i32",
                              "h_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32", "P": "i32", "S": "i32",
                              "C": "i32", "ep_start": "i32", "E": "i32", "rank": "i32"},
         [{"H": 2048, "I": inter, "TOP_K": 8, "SPLIT": split, "PDL": split == 2, "SHARES": 1 + (inter == 768),
           "NW": 2, "INDEXED": split == 1, "BLOCKS": split == 1 and inter == 768, **tiles}
          for inter in (768, 192) for split in (1, 2)]),
        (moe._moe_down, {"h_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "index_ptr": "*i32", "rw_ptr": "*bf16",
                           "y_ptr": "*bf16", "P": "i32", "S": "i32", "ep_start": "i32", "E": "i32", "rank": "i32"},
         [{"H": 2048, "I": inter, "PDL": pdl, "LINE": 64, "LINES": lines, "SHARES": 1 + pdl, "NW": 2,
           "INDEXED": inter == 768, "BLOCKS": inter == 768 and pdl, **tiles}
          for inter, lines in ((192, 4), (768, 16)) for pdl in (False, True)]),
        (router._router, {"x_ptr": "*bf16", "g_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32", "w_ptr": "*bf16",
                         "idx_ptr": "*i64", "nw_ptr": "*bf16", "xn_ptr": "*bf16", "sq_ptr": "*fp32", "N": "i32",
                         "E": "i32", "SQ": "i32", "eps": "fp32"},
         [{"H": 2048, "K": 8, "BT": bt, "BE": 16, "BK": 128, "SPLIT": 4, "BLOCK_E": 128, "BLOCK_K": 8, "NORM": True,
           "PRENORM": prenorm, "BSQ": 64, "EXACT": False, "PDL": pdl, "LINE": 64, "LINES": 8}
          for bt, pdl, prenorm in ((16, False, False), (16, True, True), (64, True, False))]),
    ]
    for fn, sig, variants in kernels:
        for consts in variants:
            ptx = _hopper_ptx(fn, sig, consts)
            assert "cp.async.cg.shared.global" in ptx, (fn.__name__, consts)
            if consts.get("SPLIT", 1) > 1:  # the split gate/up kernel, the router
                assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx
            # PDL: wait for the kernel before, let the next one launch; the down kernel prefetches its weights
            assert ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx) == consts["PDL"]
            if fn is not moe._moe_gate_up:
                assert ("prefetch.global.L2" in ptx) == consts["PDL"]
                if consts["PDL"]:  # the prefetches come before the wait
                    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")
    # the index kernel: histogram, gather and sort over a step's pairs (batch 128 at top-8), dealt or not
    sig = {"ids_ptr": "*i64", "index_ptr": "*i32", "P": "i32", "ep_start": "i32", "E": "i32", "rank": "i32",
           "S": "i32", "B": "i32"}
    for consts in ({"SHARES": 1, "BP": 1024, "EB": 128, "SB": 128, "BLOCKS": True, "BM": 16, "BB": 256, "PDL": True},
                   {"SHARES": 2, "BP": 256, "EB": 128, "SB": 64, "BLOCKS": False, "BM": 16, "BB": 16, "PDL": False}):
        ptx = _hopper_ptx(moe._moe_index, sig, consts)
        assert ("griddepcontrol.wait" in ptx) == consts["PDL"]
    # the sum kernel, dealing the touched experts out (each program finds which of its token's are its rank's)
    sig = {"y_ptr": "*bf16", "ids_ptr": "*i64", "res_ptr": "*bf16", "out_ptr": "*bf16", "nw_ptr": "*bf16",
           "xn_ptr": "*bf16", "H": "i32", "ep_start": "i32", "E": "i32", "P": "i32", "rank": "i32", "eps": "fp32"}
    for consts in ({"TOP_K": 8, "BH": 1024, "RESIDUAL": True, "NORM": False, "SHARES": 2, "BP": 128, "NW": 2, "PDL": True},
                   {"TOP_K": 8, "BH": 2048, "RESIDUAL": True, "NORM": True, "SHARES": 1, "BP": 128, "NW": 2, "PDL": True}):
        src = triton.compiler.ASTSource(fn=moe._moe_sum, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                                        constexprs=consts)
        assert "griddepcontrol.wait" in triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                                       options={"num_warps": 8}).asm["ptx"]


def test_decode_gemm_kernels_compile_for_hopper():
    """The decode GEMM kernels for sm_90 ahead of time: weight loads pipelined, the split-K count an
    acquire-release atomic with the partial sums read back from L2, and under PDL the weight prefetches
    before the wait."""
    kernels = [
        (linear._qkv_rope, {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16",
                           "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64", "table_ptr": "*i32",
                           "part_ptr": "*fp32", "cnt_ptr": "*i32", "qo_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
                           "N": "i32", "HQ": "i32", "HK": "i32", "PAGE": "i32", "PAGES": "i32", "sc_b": "i32",
                           "POS_B": "i32", "eps": "fp32"},
         [{"H": 2048, "HALF": 64, "BT": 16, "BK": 128, "SPLIT": split, "NORM": True, "BIAS": False, "EXACT": False,
           "PDL": pdl, "LINE": 64, "LINES": 8} for split, pdl in ((1, False), (4, True))]),
        (linear._linear_residual, {"x_ptr": "*bf16", "w_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16",
                                  "part_ptr": "*fp32", "cnt_ptr": "*i32", "sq_ptr": "*fp32", "N": "i32", "NOUT": "i32"},
         [{"K": 4096, "BT": bt, "BN": 64, "BK": 128, "SPLIT": split, "RESIDUAL": True, "ROW_SQ": split == 8,
           "EXACT": False, "PDL": pdl, "LINE": 64, "LINES": 8}
          for bt, split, pdl in ((16, 1, False), (16, 8, True), (64, 4, True))]),
    ]
    for fn, sig, variants in kernels:
        for consts in variants:
            ptx = _hopper_ptx(fn, sig, consts)
            assert "cp.async.cg.shared.global" in ptx, (fn.__name__, consts)
            if consts["SPLIT"] > 1 or fn is linear._qkv_rope:  # the head's halves always go through the sums
                assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, (fn.__name__, consts)
            assert ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx) == consts["PDL"]
            assert ("prefetch.global.L2" in ptx) == consts["PDL"]
            if consts["PDL"]:
                assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")


def test_dependent_launch_only_on_cuda_and_switchable(monkeypatch):
    """PDL needs a Hopper-or-later CUDA device and a Triton that launches with it: never on the CPU (the
    interpreter gets PDL=False and no launch option it would not know); the kernel config turns it off."""
    assert not common.pdl_supported(torch.device("cpu")) and common.launch(False) == {"PDL": False}
    assert common.launch(True) == {"PDL": True, "launch_pdl": True}
    assert common._triton_pdl()  # the pinned Triton has it
    monkeypatch.setattr(common, "_major", lambda index: 9)  # as if an H100 were there
    assert common.pdl_supported(torch.device("cuda", 0))
    monkeypatch.setattr(common, "_major", lambda index: 8)  # an A100
    assert not common.pdl_supported(torch.device("cuda", 0))
    monkeypatch.setattr(common, "_major", lambda index: 9)
    monkeypatch.setattr(common, "_triton_pdl", lambda: False)  # a Triton older than 3.3
    assert not common.pdl_supported(torch.device("cuda", 0))
    monkeypatch.setenv("QWENHW_PDL", "0")
    assert not KernelConfig.resolve().pdl and KernelConfig.resolve({"pdl": True}).pdl  # the plan's word wins


def test_tiles_per_gpu_files(tmp_path):
    """A GPU's tiles file overrides the defaults it names; the sweep writes only what differs; unknown keys
    are refused."""
    found = tiles.DEFAULT.replace(moe_block=(32, 128, 4, 3), linear_max_tokens=8)
    path = tiles.write("NVIDIA H100 80GB HBM3", found, folder=tmp_path)
    assert path.name == "NVIDIA_H100_80GB_HBM3.json"
    import json

    data = json.loads(path.read_text())
    assert data == {"moe_block": [32, 128, 4, 3], "linear_max_tokens": 8}
    assert tiles.from_json(data) == found
    with pytest.raises(ValueError, match="moe_blok"):
        tiles.from_json({"moe_blok": [1, 2, 3, 4]})
    assert tiles.for_device(torch.device("cpu")) == tiles.DEFAULT


def test_prompt_kernels_compile_for_hopper():
    """The prompt pass's kernels for sm_90 ahead of time: SiLU x up and the experts' combine (+ the residual),
    the rope/cache kernel writing each token to the cache row it is given (packed prompts)."""
    from qwenhw_native.kernels import moe_prompt, rope_cache

    ptx = _hopper_ptx(moe_prompt._silu_mul, {"gu_ptr": "*bf16", "out_ptr": "*bf16", "I": "i32"}, {"BLOCK": 1024})
    assert "ex2.approx" in ptx  # the sigmoid's exp
    ptx = _hopper_ptx(moe_prompt._combine, {"down_ptr": "*bf16", "at_ptr": "*i64", "w_ptr": "*bf16", "res_ptr": "*bf16",
                                            "out_ptr": "*bf16", "H": "i32"}, {"K": 8, "BLOCK": 1024, "RESIDUAL": True})
    assert ptx.count("ld.global.b64") + ptx.count("ld.global.u64") >= 8  # the 8 pairs' rows, unrolled
    sig = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr", "qo_ptr",
                                       "kc_ptr", "vc_ptr")}
    sig.update({"pos_ptr": "*i64", "row_ptr": "*i64", "table_ptr": "*i32"})
    sig.update(dict.fromkeys(("T", "HQ", "HK", "PAGE", "PAGES", "sq_b", "sq_t", "sq_h", "sk_b", "sk_t", "sk_h", "sv_b", "sv_t",
                              "sv_h", "sc_b", "sc_t", "sp_b", "sr_b", "sr_t"), "i32"))
    sig["eps"] = "fp32"
    sig = {a: sig[a] for a in rope_cache._qk_rope_cache.arg_names if a in sig}
    for rows in (False, True):
        ptx = _hopper_ptx(rope_cache._qk_rope_cache, sig, {"HALF": 64, "NORM": True, "ROWS": rows, "PDL": False})
        assert ptx.count("ld.global.b64") + ptx.count("ld.global.u64") == 1 + rows  # pos, and the row if given
