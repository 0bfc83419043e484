"""Tile shapes and size limits of the decode kernels on a GPU: defaults, and per-GPU JSON files.

The defaults were chosen by the bench sweeps on an H200 (bench/decode_linear.py, bench/multi_gpu.py; the
record is in docs/benchmarks.md). A GPU with a file `configs/<device name>.json` here (the name as CUDA
reports it, spaces as underscores: `NVIDIA_H100_80GB_HBM3.json`) uses the values it holds over the
defaults; the sweeps write such files with `--write-tiles` (vLLM's fused_moe/configs/ is the model).
On the CPU (Triton's interpreter, the tests) the wrappers use small fixed tiles of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class Tiles:
    # split-KV decode attention: (BN, warps, stages)
    attn_block: tuple[int, int, int] = (64, 4, 2)
    # routed experts, gate/up kernel: (BN, BK, warps, stages); decode reads each touched expert once, so many
    # narrow column blocks keep every SM streaming weights
    moe_block: tuple[int, int, int, int] = (64, 128, 4, 3)
    moe_down_block: tuple[int, int, int, int] | None = None  # the down kernel's; None: moe_block's
    # up to moe_split_tokens tokens the gate/up kernel splits the hidden size moe_split ways (one token's 8
    # experts x 12 column blocks leave most SMs idle); at 16 tokens splitting loses
    moe_split: int = 4
    moe_split_tokens: int = 4
    # under PDL the down kernel asks L2 for this many 128-byte lines of each weight row before its wait
    # (whole rows overran L2: -6% at batch 16)
    moe_down_prefetch: int = 2
    # decode steps of up to this many (token, expert) pairs take the slot kernels above (at most
    # moe.MAX_INDEXED_PAIRS); larger ones sort the pairs and take the grouped GEMMs of a prompt pass (moe_prompt).
    # 128 rows of Qwen3-30B-A3B (1024 pairs) on one H100: 5088 tok/s on the slot kernels, 4432 grouped
    moe_max_pairs: int = 2048
    # past this many pairs one kernel sorts a step's pairs by expert for the two GEMM kernels (moe._moe_index),
    # up to it each program finds its own. One H100, Qwen3-30B-A3B, sorted once / each finding its own: 1 row
    # 268 / 242 tok/s, 16 rows 1088 / 1089, 32 rows 1624 / 1592, 64 rows 2676 / 2345 (docs/benchmarks.md), and
    # under vLLM's serving client at 1 request/s 6.8 / 7.6 ms per output token: sorted at every size
    moe_index_pairs: int = 0
    # sorted pairs: the GEMM kernels' programs over the index's blocks of 16 pairs (each a slot's chunk) instead of
    # a program per slot and possible chunk (at 128 rows 7 in 8 of those find no pair). Unmeasured: off
    moe_blocks: bool = False
    # decode GEMMs (q/k/v + RoPE + cache, o_proj + residual) in Triton up to this many rows (cuBLAS won at 64)
    linear_max_tokens: int = 16
    linear_bk: int = 128
    linear_stages: int = 3
    # q/k/v aims at ~qkv_programs programs (a head each, the hidden size split to make them up), o_proj at
    # ~proj_programs programs of proj_bn columns
    qkv_programs: int = 96
    qkv_warps: int = 8
    proj_programs: int = 512
    proj_warps: int = 4
    proj_bn: int = 32
    # under PDL a decode GEMM prefetches its whole weight slice only where its weights are at most this many
    # bytes (the TP shares gained 3-10%; one GPU's 17-21 MB lost 15-20%: lines evicted before use), at most
    # linear_prefetch 128-byte lines per row
    linear_prefetch_bytes: int = 9 * 2**20
    linear_prefetch: int = 16
    # the router's GEMM and top-k in one kernel up to this many tokens: (experts per program, BK, slices)
    router_max_tokens: int = 64
    router_tiles: tuple[int, int, int] = (16, 128, 4)
    # token rows per program of the pulling all-reduce + RMSNorm (each program is one cross-GPU barrier)
    reduce_rows: int = 1

    def replace(self, **changes: Any) -> "Tiles":
        return dataclasses.replace(self, **changes)


DEFAULT = Tiles()


def device_key(name: str) -> str:
    return name.replace(" ", "_").replace("/", "_")


def from_json(data: dict[str, Any], base: Tiles = DEFAULT) -> Tiles:
    """`base` with the values a tiles file holds (lists become tuples); unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(Tiles)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown kernel tile settings {unknown}; known: {sorted(fields)}")
    return base.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def to_json(tiles: Tiles) -> dict[str, Any]:
    """What differs from the defaults (what a tiles file holds)."""
    return {f.name: getattr(tiles, f.name) for f in dataclasses.fields(Tiles)
            if getattr(tiles, f.name) != getattr(DEFAULT, f.name)}


@functools.lru_cache(maxsize=None)
def _for_name(name: str) -> Tiles:
    path = CONFIG_DIR / f"{device_key(name)}.json"
    return from_json(json.loads(path.read_text())) if path.exists() else DEFAULT


_OVERRIDES: dict[str, Tiles] = {}


def for_device(device: Any) -> Tiles:
    """The tiles of a CUDA device (its file's, else the defaults), or the defaults elsewhere."""
    if getattr(device, "type", "cpu") != "cuda":
        return DEFAULT
    import torch

    name = torch.cuda.get_device_name(device)
    return _OVERRIDES.get(name) or _for_name(name)


@contextlib.contextmanager
def override(device: Any, **changes: Any) -> Iterator[Tiles]:
    """Run with other tiles on `device` (the bench sweeps and A/B runs); CUDA graphs keep the tiles they were
    captured with."""
    import torch

    name = torch.cuda.get_device_name(device)
    before = _OVERRIDES.get(name)
    _OVERRIDES[name] = tiles = for_device(device).replace(**changes)
    try:
        yield tiles
    finally:
        if before is None:
            _OVERRIDES.pop(name, None)
        else:
            _OVERRIDES[name] = before


def write(device_name: str, tiles: Tiles, folder: Path = CONFIG_DIR) -> Path:
    """Save what the sweep found for a GPU (only what differs from the defaults)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{device_key(device_name)}.json"
    path.write_text(json.dumps(to_json(tiles), indent=2) + "\n")
    _for_name.cache_clear()
    return path
