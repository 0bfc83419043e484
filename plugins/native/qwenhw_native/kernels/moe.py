"""The routed experts of a decode step in three kernels whatever the routing (transformers' grouped or
batched kernels sort, gather, pad and scatter around the two GEMMs: ~15 kernels, 4 more under expert
parallelism): gate/up + SiLU, down x routing weight, and the sum (+ the residual, on one GPU + the next
RMSNorm).

Each kernel's grid axis 0 is a slot, not an expert: slot j finds the j-th expert the batch touched
(`_slot_expert`), so the grid follows the batch, not the expert count. Past Tiles.moe_index_pairs pairs a
fourth kernel sorts the pairs by slot once (`_moe_index`) and the GEMM programs read their expert and pairs
from it: finding them among all the pairs in every program grows with the pairs, and at 64 rows the
programs outnumber the touched experts' column blocks 4 to 1; with Tiles.moe_blocks the index also lists the
blocks of 16 sorted pairs and the programs go over those (a slot's possible chunks past its pairs are not
launched: at 128 rows 184 programs per column block, not 1024). Where every GPU holds every expert,
the touched experts are dealt out to the GPUs (`share`, `_dealt`). Expert ids are global; a module holding
experts [ep_start, ep_start + E) skips the others (expert parallel).
"""

from __future__ import annotations

from typing import Any

import torch

from .common import _after_previous, _dot, _prefetch_l2, _round, counts, jit, launch, tl, triton
from .tiles import for_device

MAX_PAIRS = 512  # token-expert pairs per call (batch 64 at top-8) where each program selects its own pairs
MAX_INDEXED_PAIRS = 2048  # with the index (batch 256 at top-8): one program sorts them all


@jit
def _pairs_of(ids_ptr, P, e, ep_start, c, BP: tl.constexpr, BM: tl.constexpr):
    """Rows c..c+BM of expert e's (token, slot) pairs, in pair order: (pair index, valid)."""
    p = tl.arange(0, BP)
    mine = (tl.load(ids_ptr + p, mask=p < P, other=-1, cache_modifier=".cg") - ep_start) == e  # see _touched
    rank = tl.cumsum(mine.to(tl.int32), 0) - 1
    m = c + tl.arange(0, BM)
    sel = mine[None, :] & (rank[None, :] == m[:, None])
    pair = tl.sum(tl.where(sel, p[None, :], 0), 1)
    return pair, tl.sum(sel.to(tl.int32), 1) > 0


@jit
def _or(a, b):
    return a | b


@jit
def _popcount(x):
    """Set bits of each uint64 (SWAR: no intrinsic the interpreter lacks)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


@jit
def _touched(ids_ptr, P, ep_start, E, BP: tl.constexpr, NW: tl.constexpr):
    """Which of experts [ep_start, ep_start + E) the batch's pairs touch: bit e - ep_start of NW uint64 words."""
    p = tl.arange(0, BP)  # .cg: from L2; the down kernel reads the ids before its wait (never stale L1)
    loc = tl.load(ids_ptr + p, mask=p < P, other=-1, cache_modifier=".cg") - ep_start
    w = tl.arange(0, NW)
    one = tl.full([BP, NW], 1, tl.uint64)
    hit = ((loc >= 0) & (loc < E))[:, None] & ((loc // 64)[:, None] == w[None, :])
    bits = tl.where(hit, one << (tl.maximum(loc, 0) % 64).to(tl.uint64)[:, None], tl.zeros([BP, NW], tl.uint64))
    return tl.reduce(bits, 0, _or)


@jit
def _nth_touched(words, k, NW: tl.constexpr):
    """The k-th (from 0) touched expert in id order, or -1 where fewer are touched."""
    e = tl.arange(0, NW * 64)
    w = tl.arange(0, NW)
    word = tl.reduce(tl.where((e // 64)[:, None] == w[None, :], words[None, :], tl.zeros([NW * 64, NW], tl.uint64)),
                     1, _or)
    hit = ((word >> (e % 64).to(tl.uint64)) & 1).to(tl.int32)
    found = (hit > 0) & (tl.cumsum(hit, 0) - 1 == k)
    return tl.where(tl.sum(found.to(tl.int32), 0) > 0, tl.sum(tl.where(found, e, 0), 0), -1)


@jit
def _dealt(words, e, rank, SHARES: tl.constexpr, NW: tl.constexpr):
    """Whether expert e falls to `rank` when every rank holds every expert: the touched experts, in id
    order, are dealt to the SHARES ranks in turn, so none reads more than ceil(touched / SHARES)."""
    w = tl.arange(0, NW)
    low = (tl.full([NW], 1, tl.uint64) << (e % 64).to(tl.uint64)) - 1
    below = tl.where(w < e // 64, words, tl.where(w == e // 64, words & low, tl.zeros([NW], tl.uint64)))
    return (tl.sum(_popcount(below), 0) % SHARES) == rank


@jit
def _slot_expert(ids_ptr, P, ep_start, E, rank, SHARES: tl.constexpr, BP: tl.constexpr, NW: tl.constexpr):
    """The local expert program slot `program_id(0)` computes, or -1: the MoE kernels' grids have a slot
    per expert the batch can touch (min(E, pairs), dealt: / SHARES), not one per expert, so a decode
    step launches few programs that find nothing to do. Slot j takes the (j * SHARES + rank)-th touched
    expert: with SHARES > 1, this rank's turn of the dealt ones (`_dealt`)."""
    return _nth_touched(_touched(ids_ptr, P, ep_start, E, BP, NW), tl.program_id(0) * SHARES + rank, NW)


@jit
def _count(ids_ptr, P, e, ep_start, BP: tl.constexpr):
    p = tl.arange(0, BP)  # .cg: from L2; the down kernel reads the ids before its wait (never stale L1)
    ids = tl.load(ids_ptr + p, mask=p < P, other=-1, cache_modifier=".cg")
    return tl.sum(((ids - ep_start) == e).to(tl.int32), 0)


@jit
def _moe_index(ids_ptr, index_ptr, P, ep_start, E, rank, S, B, SHARES: tl.constexpr, BP: tl.constexpr,
               EB: tl.constexpr, SB: tl.constexpr, BLOCKS: tl.constexpr, BM: tl.constexpr, BB: tl.constexpr,
               PDL: tl.constexpr):
    """The step's pairs sorted by slot, once for both GEMM kernels: index[s] is slot s's local expert (-1:
    none), index[S + s] its first place in the sorted pairs, index[2S + s] its pair count, index[3S + j]
    the j-th pair (the experts of a slot in pair order; pairs of no slot of this rank at the end). Slots
    as in `_slot_expert`: the (s * SHARES + rank)-th touched expert. BLOCKS: then index[3S + P + b], for
    each of the B blocks of BM sorted pairs a GEMM program may take, its slot * 65536 + its chunk of the
    slot's pairs (the slots' chunks back to back; -1: no block)."""
    _after_previous(PDL)  # the routing comes from the kernel before
    p = tl.arange(0, BP)
    loc = tl.load(ids_ptr + p, mask=p < P, other=-1) - ep_start
    loc = tl.where((loc >= 0) & (loc < E), loc, -1).to(tl.int32)  # another rank's expert, an idle row's -1
    cnt = tl.histogram(loc, EB, mask=loc >= 0)
    touched = cnt > 0
    order = tl.cumsum(touched.to(tl.int32), 0) - 1
    mine = touched & (order % SHARES == rank)
    slot = order // SHARES
    n = tl.where(mine, cnt, 0)
    e = tl.arange(0, EB)
    tl.store(index_ptr + slot, e, mask=mine)
    tl.store(index_ptr + S + slot, tl.cumsum(n, 0) - n, mask=mine)
    tl.store(index_ptr + 2 * S + slot, cnt, mask=mine)
    s = tl.arange(0, SB)
    unused = (s >= tl.sum(mine.to(tl.int32), 0)) & (s < S)
    tl.store(index_ptr + s, tl.full([SB], -1, tl.int32), mask=unused)
    tl.store(index_ptr + 2 * S + s, tl.zeros([SB], tl.int32), mask=unused)
    ours = (loc >= 0) & (tl.gather(mine.to(tl.int32), tl.maximum(loc, 0), 0) > 0)
    key = tl.sort(tl.where(ours, loc, EB) * BP + p)  # (expert, pair) order: the slots' runs back to back
    tl.store(index_ptr + 3 * S + p, key % BP, mask=p < P)
    if BLOCKS:  # each slot's chunks, in slot (= expert) order: block b lies in the slot whose run holds it
        nb = tl.where(mine, (cnt + BM - 1) // BM, 0)
        end = tl.cumsum(nb, 0)
        b = tl.arange(0, BB)
        hit = (b[:, None] >= (end - nb)[None, :]) & (b[:, None] < end[None, :])
        code = tl.sum(tl.where(hit, slot[None, :] * 65536 + b[:, None] - (end - nb)[None, :], 0), 1)
        code = tl.where(tl.sum(hit.to(tl.int32), 1) > 0, code, -1)
        tl.store(index_ptr + 3 * S + P + b, code, mask=b < B)


@jit
def _slot_pairs(index_ptr, ids_ptr, P, S, ep_start, E, rank, chunk, INDEXED: tl.constexpr, BLOCKS: tl.constexpr,
                SHARES: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr, NW: tl.constexpr):
    """The program's slot's local expert (-1: none), its pair count, its chunk's pairs (pair index, valid) and
    the chunk: read from the index, or (not INDEXED) found among all the pairs, the pairs only where the chunk
    has any. The program is slot `program_id(0)`'s chunk `chunk`, or (BLOCKS) the program_id(0)-th block of
    the index's (a program that has none: no pairs)."""
    if INDEXED:
        slot = tl.program_id(0)  # .cg: from L2; the down kernel reads the index before its wait
        if BLOCKS:
            code = tl.load(index_ptr + 3 * S + P + slot, cache_modifier=".cg")
            slot = tl.maximum(code, 0) // 65536
            chunk = tl.maximum(code, 0) % 65536
        e = tl.load(index_ptr + slot, cache_modifier=".cg")
        count = tl.load(index_ptr + 2 * S + slot, cache_modifier=".cg")
        if BLOCKS:
            count = tl.where(code >= 0, count, 0)
        m = chunk * BM + tl.arange(0, BM)
        valid = m < count
        first = tl.load(index_ptr + S + slot, cache_modifier=".cg")
        pair = tl.load(index_ptr + 3 * S + first + m, mask=valid, other=0, cache_modifier=".cg")
    else:
        e = _slot_expert(ids_ptr, P, ep_start, E, rank, SHARES, BP, NW)
        count = tl.where(e >= 0, _count(ids_ptr, P, e, ep_start, BP), 0)
        pair = tl.zeros([BM], tl.int32)
        valid = pair > 0
        if chunk * BM < count:
            pair, valid = _pairs_of(ids_ptr, P, e, ep_start, chunk * BM, BP, BM)
    return e, count, pair, valid, chunk


@jit
def _moe_gate_up(x_ptr, w_ptr, ids_ptr, index_ptr, h_ptr, part_ptr, cnt_ptr, P, S, C, ep_start, E, rank,
                 H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, EXACT: tl.constexpr,
                 SHARES: tl.constexpr, NW: tl.constexpr, INDEXED: tl.constexpr, BLOCKS: tl.constexpr,
                 PDL: tl.constexpr):
    """h[pair, n] = act(x[token] @ gate[e, n]) * (x[token] @ up[e, n]) for BM of expert e's pairs (chunk
    c of its pairs; programs past its count return at once, without reading a weight), BN columns; e is
    the expert of the program's slot (`_slot_expert`).

    Chunks are programs (grid axis 2), not a loop around the pipelined one over the hidden size.
    SPLIT > 1: program (slot, tile, c * SPLIT + s) sums hidden slice s of SPLIT only and leaves its fp32
    sums in `part` [SPLIT, pairs, 2, I]; the last of the SPLIT to finish (an atomic count per (e, tile,
    c), put back to zero after) adds them up and applies the activation. More, shorter programs: at
    decode sizes few experts are touched, and one program per (expert, column block) leaves SMs idle."""
    _after_previous(PDL)  # the routing comes from the kernel before
    tile = tl.program_id(1)
    chunk = tl.program_id(2) // SPLIT
    s = tl.program_id(2) % SPLIT
    n = tile * BN + tl.arange(0, BN)
    e, count, pair, valid, chunk = _slot_pairs(index_ptr, ids_ptr, P, S, ep_start, E, rank, chunk, INDEXED, BLOCKS,
                                               SHARES, BP, BM, NW)
    if chunk * BM < count:
        tok = pair // TOP_K
        w_e = w_ptr + e.to(tl.int64) * 2 * I * H
        KS: tl.constexpr = H // SPLIT  # the wrapper checks that BK divides it
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, KS, BK):
            k = s * KS + k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + tok[:, None] * H + k[None, :], mask=valid[:, None] & (k[None, :] < H), other=0.0)
            wmask = (n[None, :] < I) & (k[:, None] < H)
            wg = tl.load(w_e + n[None, :] * H + k[:, None], mask=wmask, other=0.0)
            wu = tl.load(w_e + (I + n[None, :]) * H + k[:, None], mask=wmask, other=0.0)
            acc_g = _dot(x, wg, acc_g, EXACT)
            acc_u = _dot(x, wu, acc_u, EXACT)
        out = valid[:, None] & (n[None, :] < I)
        last = True
        if SPLIT > 1:
            at = (s * P + pair[:, None]) * 2 * I + n[None, :]
            tl.store(part_ptr + at, acc_g, mask=out)
            tl.store(part_ptr + at + I, acc_u, mask=out)
            tl.debug_barrier()  # every thread's partials written before the count says so (release)
            cnt = cnt_ptr + (e * tl.num_programs(1) + tile) * C + chunk  # C: chunks an expert may have
            last = tl.atomic_add(cnt, 1, sem="acq_rel") == SPLIT - 1
            if last:
                tl.store(cnt, 0)  # for the next call (and the next replay of a CUDA graph)
                tl.debug_barrier()
                acc_g = tl.zeros([BM, BN], dtype=tl.float32)
                acc_u = tl.zeros([BM, BN], dtype=tl.float32)
                for j in tl.static_range(SPLIT):  # .cg: from L2, where the other programs wrote
                    at = (j * P + pair[:, None]) * 2 * I + n[None, :]
                    acc_g += tl.load(part_ptr + at, mask=out, other=0.0, cache_modifier=".cg")
                    acc_u += tl.load(part_ptr + at + I, mask=out, other=0.0, cache_modifier=".cg")
        if last:
            ty = h_ptr.dtype.element_ty
            g = _round(acc_g, ty)  # transformers: linear -> chunk (rounded), silu (rounded), * up (rounded)
            act = _round(g / (1.0 + tl.exp(-g)), ty)
            tl.store(h_ptr + pair[:, None] * I + n[None, :], (act * _round(acc_u, ty)).to(ty), mask=out)


@jit
def _moe_down(h_ptr, w_ptr, ids_ptr, index_ptr, rw_ptr, y_ptr, P, S, ep_start, E, rank, H: tl.constexpr,
              I: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              EXACT: tl.constexpr, SHARES: tl.constexpr, NW: tl.constexpr, INDEXED: tl.constexpr,
              BLOCKS: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr):
    """y[pair, n] = (h[pair] @ down[e, n]) * routing weight[pair], for BM of expert e's pairs (chunk c),
    BN columns.

    With PDL the program starts while the gate/up kernel finishes: the routing is final by then (that
    kernel waited for the router before letting this one launch), so a program with pairs asks L2 for
    the first LINES lines (of LINE elements) of each of its weight rows first, and waits for the gate/up
    output after."""
    ty = y_ptr.dtype.element_ty
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    chunk = tl.program_id(2)
    e, count, pair, valid, chunk = _slot_pairs(index_ptr, ids_ptr, P, S, ep_start, E, rank, chunk, INDEXED, BLOCKS,
                                               SHARES, BP, BM, NW)
    w_e = w_ptr + e.to(tl.int64) * H * I
    if PDL and LINES > 0:
        if chunk * BM < count:
            lines = tl.minimum(tl.arange(0, LINES) * LINE, I - 1)
            _prefetch_l2(w_e + tl.minimum(n, H - 1)[:, None] * I + lines[None, :])
    _after_previous(PDL)
    if chunk * BM < count:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, I, BK):
            k = k0 + tl.arange(0, BK)
            h = tl.load(h_ptr + pair[:, None] * I + k[None, :], mask=valid[:, None] & (k[None, :] < I), other=0.0)
            w = tl.load(w_e + n[None, :] * I + k[:, None], mask=(n[None, :] < H) & (k[:, None] < I), other=0.0)
            acc = _dot(h, w, acc, EXACT)
        rw = tl.load(rw_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        y = _round(acc, ty) * rw[:, None]
        tl.store(y_ptr + pair[:, None] * H + n[None, :], y.to(ty), mask=valid[:, None] & (n[None, :] < H))


@jit
def _moe_sum(y_ptr, ids_ptr, res_ptr, out_ptr, nw_ptr, xn_ptr, H, ep_start, E, P, rank, eps,
             TOP_K: tl.constexpr, BH: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr,
             SHARES: tl.constexpr, BP: tl.constexpr, NW: tl.constexpr, PDL: tl.constexpr):
    """out[token] = (residual +) the sum of its pairs' rows whose expert this rank computed (local, and
    dealt to it where experts are dealt); the other ranks add the rest. NORM (one GPU: the whole row
    in one program, BH >= H): also xn = RMSNorm(out) * weight, the next layer's input (as the
    tensor-parallel reduce_norm does), rounded once."""
    _after_previous(PDL)
    ty = out_ptr.dtype.element_ty
    t = tl.program_id(0)
    o = tl.program_id(1) * BH + tl.arange(0, BH)
    acc = tl.zeros([BH], dtype=tl.float32)
    if RESIDUAL:
        acc += tl.load(res_ptr + t * H + o, mask=o < H, other=0.0).to(tl.float32)
    if SHARES > 1:
        words = _touched(ids_ptr, P, ep_start, E, BP, NW)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j) - ep_start
        ok = (e >= 0) & (e < E)
        if SHARES > 1:
            ok = ok & _dealt(words, e, rank, SHARES, NW)
        acc += tl.load(y_ptr + (t * TOP_K + j) * H + o, mask=(o < H) & ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + o, acc.to(ty), mask=o < H)
    if NORM:
        h = _round(acc, ty)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / H + eps)
        w = tl.load(nw_ptr + o, mask=o < H, other=0.0).to(tl.float32)
        tl.store(xn_ptr + t * H + o, (h * rstd * w).to(ty), mask=o < H)


def takes(pairs: int, tiles: Any) -> bool:
    """Whether a decode step's (token, expert) pairs take these kernels (Tiles: moe_max_pairs, moe_index_pairs);
    past that, moe_prompt's grouped GEMMs over the sorted pairs."""
    return pairs <= min(MAX_INDEXED_PAIRS if pairs > tiles.moe_index_pairs else MAX_PAIRS, tiles.moe_max_pairs)


def supported(experts: Any) -> bool:
    """transformers' fused-3D experts layout with a SiLU gate, no biases: what `experts` computes."""
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3:
        return False
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        return False
    act = type(getattr(experts, "act_fn", None)).__name__
    if not getattr(experts, "has_gate", True) or act not in ("SiLU", "SiLUActivation"):
        return False
    e, two_i, h = gu.shape
    return dn.shape == (e, h, two_i // 2) and gu.is_contiguous() and dn.is_contiguous() and gu.dtype == dn.dtype


def experts(x: torch.Tensor, module: Any, idx: torch.Tensor, weights: torch.Tensor,
            ep_start: int = 0, block: tuple[int, ...] | None = None,
            residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
            down_block: tuple[int, ...] | None = None, share: tuple[int, int] = (0, 1),
            norm: tuple[torch.Tensor, float, torch.Tensor] | None = None, pdl: bool = False,
            every_expert: bool = False, indexed: bool | None = None, blocks: bool | None = None) -> torch.Tensor:
    """The routed experts' output [tokens, hidden] for x [tokens, hidden], ids/weights [tokens, top_k].

    Experts are `module.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (transformers' layout); ids are
    global, this module holds experts [ep_start, ep_start + E) and pairs routed elsewhere contribute zero
    (expert parallel). Three kernels whatever the routing: gate/up + SiLU, down * weight, and the sum.
    `block` = (BN, BK, warps, stages[, split]) overrides the gate/up kernel's tile shape and its split of the
    hidden size, `down_block` = (BN, BK, warps, stages) the down kernel's (bench/multi_gpu.py sweeps them).
    `residual` [tokens, hidden] is added in the last kernel (the decoder layer's skip connection); `out`, a
    contiguous [tokens, hidden] tensor to write into (a tensor-parallel reducer's buffer). `share` = (rank,
    ranks): every rank holds every expert and computes the touched ones dealt to it (`_dealt`). `norm` =
    (weight, eps, xn) (a whole sum on one GPU): the last kernel also writes RMSNorm(out) * weight into xn.
    `every_expert`: a program per local expert, not per expert the batch can touch (the bench's A/B).
    `indexed`: the pairs sorted by slot first, in a kernel of their own (None: past Tiles.moe_index_pairs);
    `blocks` (indexed): the GEMM kernels' programs over the index's blocks of pairs, not over each slot's every
    possible chunk (None: Tiles.moe_blocks).
    """
    call = MoeCall(x, module, idx, weights, ep_start, block, down_block, residual, out, share, pdl, every_expert,
                   indexed, blocks)
    call.gate_up()
    call.down()
    return call.sum(norm)


class MoeCall:
    """One `experts` call's buffers and launches, each kernel callable alone (the bench times them)."""

    def __init__(self, x: torch.Tensor, module: Any, idx: torch.Tensor, weights: torch.Tensor, ep_start: int = 0,
                 block: tuple[int, ...] | None = None, down_block: tuple[int, ...] | None = None,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 share: tuple[int, int] = (0, 1), pdl: bool = False, every_expert: bool = False,
                 indexed: bool | None = None, blocks: bool | None = None):
        self.gu, self.dn = module.gate_up_proj, module.down_proj
        self.launch = launch(pdl)
        t = for_device(x.device)
        self.down_prefetch = t.moe_down_prefetch
        self.n_exp, two_i, self.hidden = self.gu.shape
        self.inter = two_i // 2
        self.line = 128 // self.dn.element_size()  # elements per 128-byte cache line
        self.tokens, self.top_k = idx.shape
        self.pairs = self.tokens * self.top_k
        self.ep_start = ep_start
        self.x = x.contiguous()
        self.ids = idx.reshape(-1).contiguous()
        self.rw = weights.reshape(-1).contiguous()
        dev = x.device
        self.h = torch.empty((self.pairs, self.inter), dtype=x.dtype, device=dev)
        self.y = torch.empty((self.pairs, self.hidden), dtype=x.dtype, device=dev)
        self.out = torch.empty((self.tokens, self.hidden), dtype=x.dtype, device=dev) if out is None else out
        self.residual = residual.contiguous() if residual is not None else None
        exact = not x.is_cuda or x.dtype == torch.float32  # fp32 models keep fp32 products (no TF32)
        bn, bk, warps, stages, *rest = block or (t.moe_block if x.is_cuda else (16, 32, 4, 1))
        split = rest[0] if rest else (t.moe_split if block is None and x.is_cuda and self.tokens <= t.moe_split_tokens
                                      else 1)
        if self.hidden % (split * bk):
            split = 1  # each slice a whole number of BK steps
        self.split = split
        self.chunks = triton.cdiv(self.tokens, 16)  # an expert gets at most one pair per token: chunks of 16
        self.rank, shares = share
        self.slots = triton.cdiv(min(self.n_exp, self.pairs), shares)  # experts one rank may compute
        if every_expert:
            self.slots = self.n_exp
        self.dealt = dict(SHARES=shares, NW=triton.next_power_of_2(triton.cdiv(self.n_exp, 64)),
                          BP=max(16, triton.next_power_of_2(self.pairs)))
        self.indexed = self.pairs > t.moe_index_pairs if indexed is None else indexed
        if self.pairs > (MAX_INDEXED_PAIRS if self.indexed else MAX_PAIRS):
            raise ValueError(f"{self.pairs} (token, expert) pairs: the decode kernels take at most "
                             f"{MAX_PAIRS} ({MAX_INDEXED_PAIRS} indexed); larger batches take moe_prompt's")
        # blocks: a GEMM program per block of 16 of a slot's sorted pairs (at most pairs / 16 + a block per slot:
        # at 128 rows 184 programs per column block, where the slots' every possible chunk are 1024)
        self.blocks = self.indexed and (t.moe_blocks if blocks is None else blocks)
        self.n_blocks = triton.cdiv(self.pairs + self.slots * 15, 16) if self.blocks else 0
        # the index: each slot's expert, first place and count, then the pairs sorted by slot (`_moe_index`), then
        # the blocks
        self.index = torch.empty(3 * self.slots + self.pairs + self.n_blocks, dtype=torch.int32, device=dev) \
            if self.indexed else self.ids
        common = dict(BM=16, EXACT=exact, INDEXED=self.indexed, BLOCKS=self.blocks, **self.dealt)
        self.up_tiles = dict(BN=bn, BK=bk, num_warps=warps, num_stages=stages, **common)
        if down_block is None:  # an explicit `block` sets both kernels' tiles unless down_block is given too
            down_block = t.moe_down_block if block is None and x.is_cuda and t.moe_down_block else (bn, bk, warps, stages)
        dbn, dbk, dwarps, dstages = down_block
        self.down_tiles = dict(BN=dbn, BK=dbk, num_warps=dwarps, num_stages=dstages, **common)
        self.n_tiles = triton.cdiv(self.inter, bn)
        self.part, self.cnt = self.h, self.ids  # unused unless split
        if split > 1:
            self.part = torch.empty((split, self.pairs, two_i), dtype=torch.float32, device=dev)
            self.cnt = counts(dev, self.n_exp * self.n_tiles * self.chunks, "moe")

    @property
    def grid(self) -> tuple[int, int]:
        """The GEMM kernels' programs (axes 0 and 2) per column block: a slot's every possible chunk, or blocks."""
        return (self.n_blocks, 1) if self.blocks else (self.slots, self.chunks)

    def gate_up(self) -> None:
        if self.indexed:
            bp = self.dealt["BP"]
            _moe_index[(1,)](self.ids, self.index, self.pairs, self.ep_start, self.n_exp, self.rank, self.slots,
                             self.n_blocks, SHARES=self.dealt["SHARES"], BP=bp,
                             EB=max(16, triton.next_power_of_2(self.n_exp)),
                             SB=max(16, triton.next_power_of_2(self.slots)), BLOCKS=self.blocks, BM=16,
                             BB=max(16, triton.next_power_of_2(self.n_blocks)), num_warps=4 if bp <= 256 else 8,
                             **self.launch)
        programs, chunks = self.grid
        _moe_gate_up[(programs, self.n_tiles, chunks * self.split)](
            self.x, self.gu, self.ids, self.index, self.h, self.part, self.cnt, self.pairs, self.slots, self.chunks,
            self.ep_start, self.n_exp, self.rank, H=self.hidden, I=self.inter, TOP_K=self.top_k, SPLIT=self.split,
            **self.up_tiles, **self.launch)

    def down(self) -> None:
        programs, chunks = self.grid
        _moe_down[(programs, triton.cdiv(self.hidden, self.down_tiles["BN"]), chunks)](
            self.h, self.dn, self.ids, self.index, self.rw, self.y, self.pairs, self.slots, self.ep_start, self.n_exp,
            self.rank, H=self.hidden, I=self.inter, LINE=self.line,
            LINES=min(self.down_prefetch, triton.next_power_of_2(triton.cdiv(self.inter, self.line))),
            **self.down_tiles, **self.launch)

    def sum(self, norm: tuple[torch.Tensor, float, torch.Tensor] | None = None) -> torch.Tensor:
        """The routed experts' sum into `out`; `norm` = (weight, eps, xn): also RMSNorm(out) * weight into xn."""
        bh = triton.next_power_of_2(self.hidden) if norm else min(1024, triton.next_power_of_2(self.hidden))
        res = self.residual if self.residual is not None else self.out
        weight, eps, xn = norm or (self.out, 0.0, self.out)
        _moe_sum[(self.tokens, triton.cdiv(self.hidden, bh))](
            self.y, self.ids, res, self.out, weight, xn, self.hidden, self.ep_start, self.n_exp, self.pairs, self.rank,
            float(eps), TOP_K=self.top_k, BH=bh, RESIDUAL=self.residual is not None, NORM=norm is not None,
            num_warps=4 if bh <= 1024 else 8, **self.dealt, **self.launch)
        return self.out
