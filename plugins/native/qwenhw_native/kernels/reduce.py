"""Tensor-parallel decode: the all-reduce of a row-parallel output and the RMSNorm that reads it, in one
kernel over torch's symmetric memory (reducer.Reducer drives them).

`reduce_norm_push` (16-bit models): each GPU writes its partial sum, flagged word by word, into its peers'
buffers and sums what they wrote into its own: no barrier, no remote read. `reduce_norm`: each GPU reads the
peers' partial sums after one cross-GPU barrier. Both write the sum and its RMSNorm.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import _after_previous, _round, jit, launch, tl, triton
from .tiles import for_device

PAD_LINE = 32  # int32 flags per barrier slot in a signal pad: one 128-byte line (up to 32 ranks)


@jit
def _peer_barrier(pads_ptr, slot, RANK: tl.constexpr, WORLD: tl.constexpr, BW: tl.constexpr,
                  LINE: tl.constexpr):
    """Program `slot` of every rank waits here for program `slot` of every other. Each sets a flag in
    each peer's signal pad (release) and takes its peers' flags back to zero (acquire), so the pads
    end as they began and a CUDA graph replays the kernel as captured. The protocol is torch's
    symmetric-memory barrier's, so the two share the pads. One lane per peer, all at once (one NVLink
    round trip, not WORLD in a row); a lane that is done compares against 2, which no flag holds.
    Each slot's flags get a 128-byte line of their own (LINE ints): the programs' atomics and
    spinning do not queue on one line."""
    pads = pads_ptr.to(tl.pointer_type(tl.uint64))
    r = tl.arange(0, BW)
    mine = tl.load(pads + RANK)
    peers = tl.where(r < WORLD, tl.load(pads + r, mask=r < WORLD, other=0), mine)
    send = peers.to(tl.pointer_type(tl.int32)) + slot * LINE + RANK
    done = (r >= WORLD).to(tl.int32)
    while tl.min(done, 0) == 0:  # a peer that has not yet taken our previous flag: try again
        old = tl.atomic_cas(send, tl.where(done > 0, 2, 0), tl.full([BW], 1, tl.int32), sem="release",
                            scope="sys")
        done = done | (old == 0).to(tl.int32)
    wait = mine.to(tl.pointer_type(tl.int32)) + slot * LINE + tl.minimum(r, WORLD - 1)
    done = (r >= WORLD).to(tl.int32)
    while tl.min(done, 0) == 0:
        old = tl.atomic_cas(wait, tl.where(done > 0, 2, 1), tl.zeros([BW], tl.int32), sem="acquire",
                            scope="sys")
        done = done | (old == 1).to(tl.int32)
    tl.debug_barrier()


@jit
def _reduce_norm(bufs_ptr, pads_ptr, offset, h_ptr, x_ptr, w_ptr, N, H, eps, RANK: tl.constexpr,
                 WORLD: tl.constexpr, BW: tl.constexpr, LINE: tl.constexpr, R: tl.constexpr,
                 BH: tl.constexpr, PDL: tl.constexpr):
    """R token rows per program: h = the sum of every rank's partial rows (read over NVLink from the
    symmetric buffers, in rank order, so every rank gets the same bits), x = RMSNorm(h) * weight."""
    _after_previous(PDL)  # before the barrier: a peer's flag must mean its partial rows are written
    ty = h_ptr.dtype.element_ty
    p = tl.program_id(0)
    _peer_barrier(pads_ptr, p, RANK, WORLD, BW, LINE)
    rows = p * R + tl.arange(0, R)
    o = tl.arange(0, BH)
    at = rows[:, None] * H + o[None, :]
    m = (rows[:, None] < N) & (o[None, :] < H)
    bufs = bufs_ptr.to(tl.pointer_type(tl.uint64))
    acc = tl.zeros([R, BH], dtype=tl.float32)
    for r in tl.static_range(WORLD):  # .cg: from L2 (the owner's), never a stale L1 line
        part = tl.load(bufs + r).to(tl.pointer_type(ty)) + offset
        acc += tl.load(part + at, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
    h = acc.to(ty)
    tl.store(h_ptr + at, h, mask=m)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 1) / H + eps)
    w = tl.load(w_ptr + o, mask=o < H, other=0.0).to(tl.float32)
    tl.store(x_ptr + at, (hf * rstd[:, None] * w[None, :]).to(ty), mask=m)


@jit
def _unpack(w, ty: tl.constexpr):
    """The two 16-bit values (low half first) of int32 words, in fp32."""
    lo = (w & 0xFFFF).to(tl.int16).to(ty, bitcast=True).to(tl.float32)
    hi = (w >> 16).to(tl.int16).to(ty, bitcast=True).to(tl.float32)
    return lo, hi


@jit
def _pack(lo, hi, ty: tl.constexpr):
    """Two fp32 tensors rounded to 16-bit `ty`, as the int32 words that hold them (low half first)."""
    a = lo.to(ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return a | (hi.to(ty).to(tl.int16, bitcast=True).to(tl.int32) << 16)


@jit
def _reduce_norm_push(part_ptr, ll_ptr, offset, stride, h_ptr, x_ptr, w_ptr, N, eps, RANK: tl.constexpr,
                      WORLD: tl.constexpr, R: tl.constexpr, HW: tl.constexpr, BW: tl.constexpr,
                      PDL: tl.constexpr):
    """R token rows per program: each rank pushes its partial rows into its peers' memory, and sums what
    its peers pushed into its own; no barrier, no read across the links. Every 8-byte word sent
    carries two 16-bit values of the partial and a flag (NCCL's LL protocol: an aligned 8-byte store
    arrives whole), so the receiver spins on its own memory until each word it reads is flagged, then
    clears it. Rank r's words land in slot r of the half at `offset` (words); consecutive calls take
    the other half (a rank pushes into a half again only after every peer has pushed to it since, so
    has read and cleared that half). h = the sum in rank order (the same bits on every rank),
    x = RMSNorm(h) * weight; h, x and the partial are read and written as words of two values."""
    _after_previous(PDL)  # the partial rows come from the kernel before
    ty = h_ptr.dtype.element_ty
    p = tl.program_id(0)
    rows = p * R + tl.arange(0, R)
    o = tl.arange(0, BW)
    m = (rows[:, None] < N) & (o[None, :] < HW)
    at = rows[:, None] * HW + o[None, :]
    mine = tl.load(part_ptr.to(tl.pointer_type(tl.int32)) + at, mask=m, other=0)
    flag = tl.full([R, BW], 1 << 32, tl.uint64)
    word = mine.to(tl.uint32, bitcast=True).to(tl.uint64) | flag
    ptrs = ll_ptr.to(tl.pointer_type(tl.uint64))
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer = tl.load(ptrs + r).to(tl.pointer_type(tl.uint64)) + offset + RANK * stride
            tl.store(peer + at, word, mask=m)
    own = tl.load(ptrs + RANK).to(tl.pointer_type(tl.uint64)) + offset
    lo = tl.zeros([R, BW], dtype=tl.float32)
    hi = tl.zeros([R, BW], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK:
            w = mine
        else:
            box = own + r * stride + at
            got = tl.load(box, mask=m, other=flag, volatile=True)
            while tl.min(((got >> 32) == 1).to(tl.int32)) == 0:
                got = tl.load(box, mask=m, other=flag, volatile=True)
            tl.store(box, tl.zeros([R, BW], tl.uint64), mask=m)
            w = (got & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
        a, b = _unpack(w, ty)
        lo += a
        hi += b
    lo, hi = _round(lo, ty), _round(hi, ty)
    rstd = 1.0 / tl.sqrt((tl.sum(lo * lo, 1) + tl.sum(hi * hi, 1)) / (2 * HW) + eps)
    wl, wh = _unpack(tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + o, mask=o < HW, other=0), ty)
    tl.store(h_ptr.to(tl.pointer_type(tl.int32)) + at, _pack(lo, hi, ty), mask=m)
    x = _pack(lo * rstd[:, None] * wl[None, :], hi * rstd[:, None] * wh[None, :], ty)
    tl.store(x_ptr.to(tl.pointer_type(tl.int32)) + at, x, mask=m)


def rows_per_program(rows: int, per_program: int | None = None, device: Any = None) -> int:
    return triton.next_power_of_2(min(per_program or for_device(device).reduce_rows, rows))


def pad_bytes(rows: int, device: Any = None) -> int:
    """Signal-pad bytes reduce_norm's barriers use for `rows` token rows."""
    return triton.cdiv(rows, rows_per_program(rows, device=device)) * PAD_LINE * 4


def push_words(numel: int, world: int) -> int:
    """uint64 words of the symmetric buffer `reduce_norm_push` needs for partial sums of up to `numel`
    values: two halves of `world` slots, each value half a word."""
    return 2 * world * numel // 2


def reduce_norm_push(ll_ptrs: int, rank: int, world: int, half: int, capacity: int, part: torch.Tensor,
                     weight: torch.Tensor, eps: float, h: torch.Tensor, x: torch.Tensor,
                     per_program: int | None = None, pdl: bool = False) -> None:
    """All-reduce + RMSNorm in one kernel, pushing (`_reduce_norm_push`): `part` [rows, hidden] is this
    rank's partial sum, in 16-bit floats; `ll_ptrs` the device address of the ranks' buffer addresses (a
    symmetric-memory handle's buffer_ptrs_dev over `push_words(capacity * hidden, world)` zeroed words);
    `half` alternates between consecutive calls. Writes the sum into `h` and RMSNorm(sum) * weight into
    `x`."""
    rows, hidden = part.shape
    r = rows_per_program(rows, per_program, h.device)
    hw = hidden // 2
    stride = capacity * hw
    _reduce_norm_push[(triton.cdiv(rows, r),)](
        part, ll_ptrs, half * world * stride, stride, h, x, weight, rows, eps, RANK=rank, WORLD=world, R=r,
        HW=hw, BW=triton.next_power_of_2(hw), num_warps=max(1, min(8, r * hw // 256)), **launch(pdl))


def reduce_norm(handle: Any, offset: int, rows: int, hidden: int, weight: torch.Tensor, eps: float,
                h: torch.Tensor, x: torch.Tensor, per_program: int | None = None, pdl: bool = False) -> None:
    """All-reduce + RMSNorm in one kernel over torch symmetric memory (`handle`: rendezvous's result).

    Every rank's partial sum [rows, hidden] sits at element `offset` of its symmetric buffer; writes the sum
    into `h` and RMSNorm(sum) * weight into `x`. One barrier: it orders this call's reads after every
    rank's producer, not the next producer after them, so consecutive calls must alternate between two
    buffer regions (reducer.Reducer does). `per_program` overrides Tiles.reduce_rows (the bench sweeps it)."""
    r = rows_per_program(rows, per_program, h.device)
    bh = triton.next_power_of_2(hidden)
    _reduce_norm[(triton.cdiv(rows, r),)](
        handle.buffer_ptrs_dev, handle.signal_pad_ptrs_dev, offset, h, x, weight, rows, hidden, eps,
        RANK=handle.rank, WORLD=handle.world_size, BW=triton.next_power_of_2(handle.world_size), LINE=PAD_LINE,
        R=r, BH=bh, num_warps=max(1, min(8, r * bh // 512)), **launch(pdl))
