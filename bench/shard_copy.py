"""Why parallel.load_shard copies split experts slowly: the same slices, copied to the GPU four ways.

    python bench/shard_copy.py --out $OUT           (one NVIDIA GPU, ~1 minute, ~2.5 GB of /tmp)

load_shard reads each expert's matrices through safetensors' get_slice and copies them into the shard on
the GPU. Whole experts (expert parallel) copied at ~4.5 GB/s; the halves of every expert (experts split
over 2 GPUs: gate/up rows, down columns) at ~460 MB/s (docs/benchmarks.md). This writes one layer's 128
experts in the Hub's layout, reads it once (so every way below finds it in the page cache) and times,
for whole experts and for halves:
  - `view`: the slice as safetensors gives it, straight into the GPU tensor (what load_shard does);
  - `contiguous`: the slice made contiguous in host memory first;
  - `pinned`: the slice copied into a pinned host buffer, then to the GPU without blocking;
  - `gpu-cut`: the whole matrix to the GPU, cut there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

E, I, H = 128, 768, 2048


def write(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    save_file({f"experts.{e}.{n}.weight": torch.randn(shape, generator=g).to(torch.bfloat16)
               for e in range(E) for n, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))},
              str(path))


def run(path: Path, split: bool, way: str) -> dict:
    f = safe_open(str(path), framework="pt", device="cpu")
    part = I // 2 if split else I
    gate_up = torch.empty((E, 2 * part, H), dtype=torch.bfloat16, device="cuda")
    down = torch.empty((E, H, part), dtype=torch.bfloat16, device="cuda")
    staging = torch.empty((H * I,), dtype=torch.bfloat16).pin_memory()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for e in range(E):
        for name, dst in (("gate_proj", gate_up[e, :part]), ("up_proj", gate_up[e, part:]), ("down_proj", down[e])):
            s = f.get_slice(f"experts.{e}.{name}.weight")
            if way == "gpu-cut":
                whole = s[:].to("cuda")
                dst.copy_(whole[:part] if name != "down_proj" else whole[:, :part])
                continue
            v = s[:part] if name != "down_proj" else s[:, :part]
            if way == "contiguous":
                v = v.contiguous()
            if way == "pinned":
                buf = staging[: v.numel()].view(v.shape)
                buf.copy_(v)
                dst.copy_(buf, non_blocking=True)
                torch.cuda.current_stream().synchronize()  # the buffer is reused by the next slice
            else:
                dst.copy_(v)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    nbytes = (gate_up.numel() + down.numel()) * 2
    return {"experts": "halves" if split else "whole", "way": way, "s": seconds, "GB_s": nbytes / seconds / 1e9,
            "ms_per_slice": seconds / (3 * E) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--file", default="/tmp/shard_copy.safetensors")
    args = ap.parse_args()
    path = Path(args.file)
    if not path.exists():
        write(path)
    run(path, False, "view")  # once through: the page cache holds the file for every row below
    rows = [run(path, split, way) for split in (False, True) for way in ("view", "contiguous", "pinned", "gpu-cut")]
    for r in rows:
        print(f"{r['experts']:>6} {r['way']:>10}: {r['s']:6.2f} s  {r['GB_s']:6.2f} GB/s  {r['ms_per_slice']:.2f} ms/slice")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "shard_copy.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
