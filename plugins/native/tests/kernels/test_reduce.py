"""The tensor-parallel all-reduce + RMSNorm kernels (kernels.reduce) as ranks in one process, their
symmetric buffers and signal pads all here. (The cross-GPU run is bench/multi_gpu.py's.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from qwenhw_native.kernels import reduce
from qwenhw_native.step import rms_norm


def _norm(hidden: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> Qwen3MoeRMSNorm:
    norm = Qwen3MoeRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(hidden, generator=g))
    return norm.to(dtype).requires_grad_(False)


def test_reduce_norm_sums_the_ranks_and_normalises():
    """Rank 0 of two: it signals the peer once per row, takes the peer's flags back to zero, and sums the
    half of the buffer it is pointed at."""
    g = torch.Generator().manual_seed(0)
    rows, hidden, world = 3, 96, 2
    bufs = [torch.randn(2 * rows * hidden, generator=g) for _ in range(world)]  # two halves each
    line = reduce.PAD_LINE  # each barrier slot's flags: rank r's at slot * line + r
    pads = [torch.zeros(rows * line, dtype=torch.int32) for _ in range(world)]
    for slot in range(rows):
        pads[0][slot * line + 1] = 1  # rank 1 has reached the barrier of every row already
    buf_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
    handle = SimpleNamespace(buffer_ptrs_dev=buf_ptrs.data_ptr(), signal_pad_ptrs_dev=pad_ptrs.data_ptr(), rank=0,
                             world_size=world)
    norm = _norm(hidden, g)
    h, x = torch.empty(rows, hidden), torch.empty(rows, hidden)
    reduce.reduce_norm(handle, rows * hidden, rows, hidden, norm.weight, 1e-6, h, x)  # the second half
    ref = (bufs[0][rows * hidden:] + bufs[1][rows * hidden:]).view(rows, hidden)
    assert float((h - ref).abs().max()) < 1e-6 and float((x - rms_norm(norm, ref)).abs().max()) < 1e-5
    sent = [int(pads[1][slot * line + 0]) for slot in range(rows)]
    assert int(pads[0].abs().sum()) == 0 and sent == [1, 1, 1] and int(pads[1].abs().sum()) == sum(sent)
    pads[1].zero_()
    pads[0][0 * line + 1] = pads[0][1 * line + 1] = 1  # two rows per program: two barriers
    reduce.reduce_norm(handle, 0, rows, hidden, norm.weight, 1e-6, h, x, per_program=2)  # the first half
    ref = (bufs[0][: rows * hidden] + bufs[1][: rows * hidden]).view(rows, hidden)
    assert float((h - ref).abs().max()) < 1e-6 and float((x - rms_norm(norm, ref)).abs().max()) < 1e-5
    assert [int(pads[0].abs().sum()), int(pads[1].abs().sum())] == [0, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduce_norm_push_sums_what_the_peers_pushed(dtype):
    """Two ranks one after the other: rank 0 finds rank 1's words in its memory (the wire format written
    here), pushes its own into rank 1's and clears what it read; rank 1 then sums what rank 0 pushed. Both
    get the same bits: the sum rounded once."""
    g = torch.Generator().manual_seed(0)
    rows, hidden, world, capacity, half = 3, 96, 2, 4, 1
    parts = [torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(world)]
    boxes = [torch.zeros(reduce.push_words(capacity * hidden, world), dtype=torch.int64) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in boxes], dtype=torch.int64)
    norm = _norm(hidden, g, dtype)
    stride = capacity * hidden // 2

    def wire(t):  # two values + a flag per word
        return (t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) | (1 << 32)

    def slot(src):
        at = half * world * stride + src * stride
        return slice(at, at + rows * hidden // 2)

    boxes[0][slot(1)] = wire(parts[1]).view(-1)  # rank 1 has pushed already
    h0, x0, h1, x1 = (torch.empty(rows, hidden, dtype=dtype) for _ in range(4))
    reduce.reduce_norm_push(ptrs.data_ptr(), 0, world, half, capacity, parts[0], norm.weight, 1e-6, h0, x0)
    assert torch.equal(boxes[1][slot(0)], wire(parts[0]).view(-1))  # sent
    assert int(boxes[0].count_nonzero()) + int(boxes[1].count_nonzero()) == rows * hidden // 2  # read: cleared
    reduce.reduce_norm_push(ptrs.data_ptr(), 1, world, half, capacity, parts[1], norm.weight, 1e-6, h1, x1,
                            per_program=2)  # reads what rank 0 pushed, two rows per program
    ref = (parts[0].float() + parts[1].float()).to(dtype)
    if dtype == torch.float16:
        assert torch.equal(h0, ref)
    else:  # the interpreter's bf16 rounds its own way
        assert float((h0.float() - ref.float()).norm() / ref.float().norm()) < 4e-3
    assert torch.equal(h0, h1) and torch.equal(x0, x1)
    expect = rms_norm(norm, ref).float()
    assert float((x0.float() - expect).norm() / expect.norm()) < 1e-2
    assert int(boxes[1].count_nonzero()) == 0
    # rank 1's words wait in rank 0's memory for its next call
    assert torch.equal(boxes[0][slot(1)], wire(parts[1]).view(-1)) and int(boxes[0].count_nonzero()) == rows * hidden // 2
