"""Tensor + expert parallel runtime: 2 ranks over gloo on the CPU give the tokens of 1 rank."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "offload"))


def _rank(rank: int, world: int, port: int, path: str, prompt: list[int], out) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from qwenhw_offload.parallel import shard
    from qwenhw_offload.runtime import Runtime, SampleParams

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32: sums agree to ~1e-6
    shard(model, rank, world)
    rt = Runtime(model, 64, "cpu", graphs="emulate", group=dist.group.WORLD, batch=2)
    logits = rt.prefill([prompt, prompt[::-1]])
    tokens = [logits.argmax(-1)]
    for _ in range(5):
        tokens.append(rt.decode(tokens[-1]).argmax(-1))
    out.put((rank, torch.stack(tokens, 1).tolist()))
    dist.destroy_process_group()


def test_two_ranks_match_one(tiny_moe):
    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from qwenhw_offload.runtime import Runtime

    prompt = [785, 6722, 315, 9625, 374, 264]
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32)
    rt = Runtime(model, 64, "cpu", graphs=False, batch=2)
    logits = rt.prefill([prompt, prompt[::-1]])
    single = [logits.argmax(-1)]
    for _ in range(5):
        single.append(rt.decode(single[-1]).argmax(-1))
    single = torch.stack(single, 1).tolist()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tiny_moe), prompt, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1] == single
