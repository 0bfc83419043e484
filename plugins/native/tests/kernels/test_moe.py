"""The routed-experts kernels (kernels.moe) against transformers' Qwen3MoeExperts: all experts, an
expert-parallel rank's share, the residual and the next RMSNorm in the sum kernel, the gate/up kernel split
over the hidden size, and the touched experts dealt out to ranks that each hold all of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeExperts

from qwenhw_native.kernels import common, moe

CASES = [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)]


def random_experts(n: int, inter: int, g: torch.Generator, dtype: torch.dtype):
    cfg = Qwen3MoeConfig(hidden_size=48, moe_intermediate_size=inter, num_experts=n, num_experts_per_tok=3)
    cfg._experts_implementation = "eager"
    ex = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    return cfg, ex.to(dtype)


@pytest.fixture(params=CASES, ids=["float32", "bfloat16"])
def case(request):
    dtype, tol = request.param
    g = torch.Generator().manual_seed(0)
    cfg, ex = random_experts(8, 40, g, dtype)
    t = 20  # 60 pairs; every token picks expert 0, so it gets more than one 16-row block
    idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(7, generator=g)[:2]])
                       for _ in range(t)])
    idx[3] = torch.tensor([5, 6, 7])  # no pair on the rank holding experts 0..3
    x = torch.randn(t, 48, generator=g).to(dtype)
    w = torch.rand(t, 3, generator=g).to(dtype)
    upper = Qwen3MoeExperts(cfg).to(dtype)  # an expert-parallel rank holding experts 4..7
    upper.gate_up_proj.data, upper.down_proj.data = ex.gate_up_proj.data[4:].clone(), ex.down_proj.data[4:].clone()
    return dict(dtype=dtype, tol=tol, g=g, ex=ex, upper=upper, idx=idx, x=x, w=w, t=t)


@torch.no_grad()
def test_experts_and_an_expert_parallel_share(case, rel):
    ex, upper, idx, x, w, tol, dt = (case[k] for k in ("ex", "upper", "idx", "x", "w", "tol", "dtype"))
    ref = ex(x, idx, w)
    assert moe.supported(ex)
    assert rel(moe.experts(x, ex, idx, w), ref) < tol
    part = moe.experts(x, upper, idx, w, ep_start=4)
    mine = idx >= 4
    ref_part = ex(x, torch.where(mine, idx, torch.full_like(idx, 8)), w * mine.to(dt))
    rest = moe.experts(x, ex, torch.where(mine, torch.full_like(idx, 99), idx), w)  # ids 99: not here
    assert rel(part, ref_part) < tol and rel(part + rest, ref) < tol
    assert (rest[3] == 0).all()  # a token with no pair on this rank
    assert rel(moe.experts(x, ex, idx[:, :1], w[:, :1]), ex(x, idx[:, :1], w[:, :1])) < tol  # top-1
    assert rel(moe.experts(x, ex, idx, w, every_expert=True), ref) < tol  # a program per local expert


@torch.no_grad()
def test_sum_kernel_adds_the_residual_and_applies_the_next_norm(case, rel):
    ex, idx, x, w, tol, dt, g, t = (case[k] for k in ("ex", "idx", "x", "w", "tol", "dtype", "g", "t"))
    h = torch.randn(t, 48, generator=g).to(dt)
    into = torch.full((t, 48), float("nan"), dtype=dt)
    with_res = moe.experts(x, ex, idx, w, residual=h, out=into)
    assert with_res is into and not into.isnan().any()
    assert rel(with_res, h + ex(x, idx, w)) < tol
    nw = (1 + 0.2 * torch.randn(48, generator=g)).to(dt)
    xn = torch.full((t, 48), float("nan"), dtype=dt)
    normed_sum = moe.experts(x, ex, idx, w, residual=h, norm=(nw, 1e-6, xn))  # one GPU: + the next RMSNorm
    assert rel(normed_sum, with_res) == 0  # the same sum
    assert rel(xn, F.rms_norm(normed_sum.float(), (48,), nw.float(), 1e-6)) < (1e-6 if dt == torch.float32 else 1e-2)


@torch.no_grad()
def test_gate_up_split_over_the_hidden_size(case, rel):
    """The gate/up kernel in 3 slices of the hidden size (the last to finish applies the activation), the
    down kernel on tiles of its own; the slices' counters end at zero."""
    ex, upper, idx, x, w, tol, dt = (case[k] for k in ("ex", "upper", "idx", "x", "w", "tol", "dtype"))
    ref = ex(x, idx, w)
    split = moe.experts(x, ex, idx, w, block=(16, 16, 4, 1, 3), down_block=(32, 16, 4, 1))
    mine = idx >= 4
    ref_part = ex(x, torch.where(mine, idx, torch.full_like(idx, 8)), w * mine.to(dt))
    split_ep = moe.experts(x, upper, idx, w, ep_start=4, block=(16, 16, 4, 1, 3))
    assert rel(split, ref) < tol and rel(split_ep, ref_part) < tol
    counts = common._COUNTS[(x.device, "moe")]
    assert int(counts.count_nonzero()) == 0 and counts.numel() >= 8 * 3


@torch.no_grad()
def test_touched_experts_dealt_out_to_ranks_holding_all(case, rel):
    """Every rank holds every expert and the touched ones are dealt out in id order: 3 ranks over 8 experts,
    and 2 ranks over 130 (the touched set spans three 64-bit words)."""
    ex, idx, x, w, tol, dt, g, t = (case[k] for k in ("ex", "idx", "x", "w", "tol", "dtype", "g", "t"))
    _, many = random_experts(130, 16, g, dt)
    many_idx = torch.stack([torch.randperm(130, generator=g)[:3] for _ in range(t)])
    for experts, ids, ranks in ((ex, idx, 3), (many, many_idx, 2)):
        order = {e: i for i, e in enumerate(sorted(set(ids.flatten().tolist())))}
        owner = torch.tensor([[order[e] % ranks for e in row] for row in ids.tolist()])
        n = experts.gate_up_proj.shape[0]
        parts = [moe.experts(x, experts, ids, w, share=(r, ranks)) for r in range(ranks)]
        refs = [experts(x, torch.where(owner == r, ids, torch.full_like(ids, n)), w * (owner == r).to(dt))
                for r in range(ranks)]
        assert max(rel(a, b) for a, b in zip(parts, refs)) < tol, n
        assert rel(sum(parts), experts(x, ids, w)) < tol, n


@torch.no_grad()
def test_pairs_sorted_once_match_each_program_finding_its_own(case, rel):
    """Past Tiles.moe_index_pairs a kernel sorts the pairs by slot for the two GEMM kernels (`_moe_index`):
    the same output, bit for bit, as every program finding its pairs among all of them: one GPU (expert 0 in
    every token: two 16-pair chunks), idle rows (-1), an expert-parallel rank's share, ranks dealt the
    touched experts, top-1; and the index itself: each slot's expert, first place and count."""
    ex, upper, idx, x, w = (case[k] for k in ("ex", "upper", "idx", "x", "w"))
    idle = idx.clone()
    idle[[2, 7]] = -1  # rows that do not decode: no expert
    calls = [dict(module=ex, idx=idx), dict(module=ex, idx=idle), dict(module=upper, idx=idx, ep_start=4),
             dict(module=ex, idx=idx, share=(1, 3)), dict(module=ex, idx=idx[:, :1], weights=w[:, :1])]
    for kw in calls:
        kw = {"weights": w, **kw}
        sorted_once = moe.experts(x, indexed=True, **kw)
        assert rel(sorted_once, moe.experts(x, indexed=False, **kw)) == 0, kw.keys()
    call = moe.MoeCall(x, ex, idle, w, indexed=True)
    call.gate_up()
    s = call.slots
    experts, first, count = call.index[:s].tolist(), call.index[s:2 * s].tolist(), call.index[2 * s:3 * s].tolist()
    flat = idle.flatten().tolist()
    touched = sorted(set(flat) - {-1})
    assert experts == touched + [-1] * (s - len(touched))
    assert count[:len(touched)] == [flat.count(e) for e in touched] and count[0] == 17 > 16
    pairs = call.index[3 * s:].tolist()
    for e, f, c in zip(experts, first, count):
        if e >= 0:
            assert pairs[f:f + c] == [p for p, pe in enumerate(flat) if pe == e]


@torch.no_grad()
def test_programs_over_blocks_of_sorted_pairs_match_a_program_per_slot_and_chunk(case, rel):
    """Tiles.moe_blocks: the GEMM kernels' programs over the index's blocks of 16 sorted pairs (`_moe_index`
    lists each slot's chunks back to back) give, bit for bit, what a program per slot and possible chunk gives:
    one GPU (expert 0's 17 pairs: two blocks), idle rows, an expert-parallel share, dealt experts, top-1, the
    gate/up kernel split over the hidden size; and the block list itself."""
    ex, upper, idx, x, w = (case[k] for k in ("ex", "upper", "idx", "x", "w"))
    idle = idx.clone()
    idle[[2, 7]] = -1
    calls = [dict(module=ex, idx=idx), dict(module=ex, idx=idle), dict(module=upper, idx=idx, ep_start=4),
             dict(module=ex, idx=idx, share=(1, 3)), dict(module=ex, idx=idx[:, :1], weights=w[:, :1]),
             dict(module=ex, idx=idx[:4], weights=w[:4], x=x[:4], block=(16, 16, 4, 1, 3))]
    for kw in calls:
        kw = {"weights": w, "x": x, **kw}
        assert rel(moe.experts(indexed=True, blocks=True, **kw), moe.experts(indexed=True, blocks=False, **kw)) == 0
    call = moe.MoeCall(x, ex, idle, w, indexed=True, blocks=True)
    call.gate_up()
    s, p = call.slots, call.pairs
    count = call.index[2 * s:3 * s].tolist()
    codes = call.index[3 * s + p:].tolist()
    assert call.grid == (call.n_blocks, 1) and call.n_blocks == -(-(p + 15 * s) // 16)
    want = [slot * 65536 + c for slot, n in enumerate(count) for c in range(-(-n // 16))]
    assert codes == want + [-1] * (call.n_blocks - len(want)) and count[0] == 17  # slot 0: two blocks
