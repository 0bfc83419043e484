"""One decoder layer's forward pass over a transformers model's own modules: attention, then the MLP or the
routed experts, choosing per op between torch (prompts, the CPU, what a kernel does not take) and the
Triton decode kernels (qwenhw_native.kernels), and summing row-parallel outputs over the tensor-parallel
ranks (reducer.Reducer).

What one kernel computes for the next op travels in an explicit `Ahead` value, not on the modules: the
RMSNorm of h that a fused all-reduce or MoE-sum kernel wrote, or the sums of squares of h's rows that
o_proj's kernel left for the router kernel, which then applies the norm itself.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .config import KernelConfig
from .kernels import attention, common, linear, moe, moe_prompt, rope_cache, router
from .kernels.tiles import for_device
from .kv_cache import KVCache
from .sharding import expert_parallel_moe, share_of


@dataclass(frozen=True)
class Ahead:
    """What the kernel that wrote a hidden state h also computed for the op that reads h next."""

    normed: torch.Tensor | None = None  # RMSNorm(h) * weight of `norm`
    norm: Any = None  # the norm module `normed` is for
    row_sq: torch.Tensor | None = None  # partial sums of h's rows' squares (o_proj's kernel), for the router


NOTHING = Ahead()


@dataclass(frozen=True)
class Rows:
    """Where a pass of whole prompts of one length writes its keys: rows `rows` of the cache (a slice, or a
    tensor of row numbers for prompts joining a running batch), from slot 0."""

    rows: Any = field(default_factory=lambda: slice(None))


@dataclass(frozen=True)
class Packed:
    """Prompt pieces packed into one sequence of a pass (no padding): token j goes to slot `slots[j]` of cache
    row `rows[j]`; piece p is tokens cu[p]..cu[p + 1] (`bounds`, the same on the host) of the prompt part. A
    piece that does not start its prompt (a later chunk) also attends to its row's earlier slots: then `keys`
    = (rows, slots) of every piece's keys from its row's slot 0 on, piece p's at cu_k[p]..cu_k[p + 1]
    (`bounds_k`); None: each piece's keys are its own tokens. A mixed pass (`decode` > 0) starts with the
    next token of each of the cache's rows 0..decode-1, as a decode step computes them: each attends to its
    row's slots start[j]..slots[j] (the decode-attention kernel), a row that does not decode to the scratch
    slot only."""

    rows: torch.Tensor
    slots: torch.Tensor
    cu: torch.Tensor  # int32 [pieces + 1], what the varlen attention kernel reads
    bounds: list[int]
    decode: int = 0
    start: torch.Tensor | None = None  # [decode]: each decoding row's first slot
    keys: tuple[torch.Tensor, torch.Tensor] | None = None
    cu_k: torch.Tensor | None = None
    bounds_k: list[int] | None = None

    def key_addresses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, slots) of the keys the pieces attend to, packed as packed_attention takes them."""
        return self.keys if self.keys is not None else (self.rows[self.decode:], self.slots[self.decode:])

# attention module -> its merged q/k/v weight and bias (LayerStep._merge_qkv), kept beside the model, not on it
_MERGED: "weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, torch.Tensor | None]]" = weakref.WeakKeyDictionary()


class LayerStep:
    """The layers' arithmetic for one runtime: its KV cache (kv_cache.KVCache), its reducer and which kernels it
    may use.

    `decoding` is set by the runtime: decode steps (one new token per sequence, each at its own position)
    take the fused kernels, prompts transformers' modules. `rows` says where a prompt pass writes.
    """

    def __init__(self, model: Any, cache: KVCache, kernels: KernelConfig, device: torch.device,
                 reducer: Any = None, lead: bool = True, emulated: bool = False, hybrid: bool = False):
        self.model = model
        self.layers = model.model.layers
        self.cache = cache
        self.k, self.v = cache.k, cache.v
        self.kernels = kernels
        self.reducer = reducer
        self.lead = lead  # the rank that adds the residual into its partial sum (all of them reduce)
        self.hybrid = hybrid  # routed experts outside (the hybrid's hook): no norm inside the MoE kernels
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        # decode steps on CUDA (or the interpreter, in tests): the Triton kernels; graphs="emulate" keeps torch
        self.fused = kernels.triton and common.available(device) and not emulated
        self.pdl = self.fused and kernels.pdl and common.pdl_supported(device)
        self.decoding = False
        self.rows: Rows | Packed = Rows()
        self.start: torch.Tensor | None = None  # each row's first slot a decode query reads (the runtime's)
        # (each row's slot, the scratch slot): a decode step's rows at the scratch slot do not decode, and the
        # router gives them no experts (their tokens would bring experts of their own to read)
        self.idle: tuple[torch.Tensor, int] | None = None
        self.qkv = self._merge_qkv() if self.fused else []

    # --- attention ------------------------------------------------------------------------------------
    def attention(self, i: int, h: torch.Tensor, ahead: Ahead, pos: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, Ahead]:
        """h + attention(input_layernorm(h)) and what its last kernel computed for the next op."""
        if self.fused and self.decoding:
            return self._attention_decode(i, h, ahead, pos, cos, sin)
        if self.fused and self.kernels.prompt:
            return self._attention_prompt(i, h, ahead, pos, cos, sin)
        layer = self.layers[i]
        a = layer.self_attn
        b, t, _ = h.shape
        x = self.norm(layer.input_layernorm, h, ahead)
        q = a.q_proj(x).view(b, t, -1, self.head_dim)
        k = a.k_proj(x).view(b, t, -1, self.head_dim)
        v = a.v_proj(x).view(b, t, -1, self.head_dim)
        if hasattr(a, "q_norm"):  # Qwen3 normalises q and k per head; Qwen2 does not
            q, k = rms_norm(a.q_norm, q), rms_norm(a.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        c = self.cache
        if self.decoding:  # each row's key at its own position, attention over its slots of the cache (masked)
            rows = torch.arange(b, device=h.device)
            c.write(i, rows, pos, k[:, :, 0], v[:, :, 0])
            kc, vc = c.rows_view(i, slice(0, b), c.max_len)
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=a.scaling, enable_gqa=True)
        elif isinstance(self.rows, Packed):  # pieces packed in one sequence: each over its row's keys
            p = self.rows
            c.write(i, p.rows, p.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            if p.keys is not None:  # later chunks: their rows' earlier slots too
                k, v = (x.transpose(0, 1)[None] for x in c.read(i, *p.keys))
            out = packed_attention(q, k, v, p, a.scaling)
        else:  # whole prompts of one length from slot 0: plain causal attention over their own keys
            c.write(i, self._rows(b)[:, None], torch.arange(t, device=h.device)[None, :], k.transpose(1, 2),
                    v.transpose(1, 2))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=a.scaling, enable_gqa=True)
        out = a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return self._reduce(out, h)

    def _attention_prompt(self, i: int, h: torch.Tensor, ahead: Ahead, pos: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> tuple[torch.Tensor, Ahead]:
        """A prompt pass's attention on CUDA: one q/k/v GEMM, then the q/k norms, RoPE and the cache write in
        one kernel (transformers' modules take ~14 element-wise kernels there), then attention over the
        keys as the cache holds them."""
        layer = self.layers[i]
        a = layer.self_attn
        b, t, _ = h.shape
        x = self.norm(layer.input_layernorm, h, ahead)
        w, bias, heads = self.qkv[i]
        q, k, v = F.linear(x, w, bias).view(b, t, -1, self.head_dim).split(heads, dim=2)
        norms = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        where = self.rows
        rows = None if isinstance(where, Rows) and isinstance(where.rows, slice) else where.rows  # None: 0, 1, ...
        c = self.cache
        q = rope_cache.qk_rope_cache(q, k, v, *norms, cos, sin, pos, self.k[i], self.v[i], rows=rows, table=c.table)
        if isinstance(where, Packed):  # the pieces (after a mixed pass's decode rows) over their rows' keys
            d = where.decode
            keys, values = (x.transpose(0, 1)[None] for x in c.read(i, *where.key_addresses()))
            out = packed_attention(q[:, :, d:], keys, values, where, a.scaling)
            if d:  # the decode rows over their rows of the cache, first
                rows_out = attention.decode_attention(q[0, :, :d].transpose(0, 1)[:, :, None].contiguous(), self.k[i],
                                                      self.v[i], where.slots[:d], a.scaling, where.start,
                                                      table=c.table, max_len=c.max_len)
                out = torch.cat([rows_out.view(1, d, -1), out.transpose(1, 2).reshape(1, t - d, -1)], dim=1)
                return self._reduce(a.o_proj(out), h)
        else:
            keys, values = c.rows_view(i, where.rows, t)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=a.scaling, enable_gqa=True)
        out = a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return self._reduce(out, h)

    def _attention_decode(self, i: int, h: torch.Tensor, ahead: Ahead, pos: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> tuple[torch.Tensor, Ahead]:
        """A decode step's attention on the kernels: the q/k/v GEMM, q/k norms, RoPE and the cache write in
        one (up to Tiles.linear_max_tokens sequences; else cuBLAS, then the rope/cache kernel); attention
        over the filled part of the cache; o_proj with the residual added."""
        layer = self.layers[i]
        a = layer.self_attn
        b, t, _ = h.shape
        x = self.norm(layer.input_layernorm, h, ahead)
        w, bias, heads = self.qkv[i]
        norms = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        if t == 1 and self._linear(x.view(b, -1), w):  # the GEMM, the norms, RoPE and the cache write
            q = linear.qkv_rope(x.view(b, -1), w, bias, heads, *norms, cos, sin, pos, self.k[i], self.v[i],
                                pdl=self.pdl, table=self.cache.table)
        else:
            q, k, v = F.linear(x, w, bias).view(b, t, -1, self.head_dim).split(heads, dim=2)
            q = rope_cache.qk_rope_cache(q, k, v, *norms, cos, sin, pos, self.k[i], self.v[i], pdl=self.pdl,
                                         table=self.cache.table)
        out = attention.decode_attention(q, self.k[i], self.v[i], pos, a.scaling, self.start, pdl=self.pdl,
                                         table=self.cache.table, max_len=self.cache.max_len)
        norm = layer.post_attention_layernorm
        # one GPU: the router kernel will apply the norm, from the sums of squares o_proj leaves (`_norm_route`)
        sums = hasattr(layer.mlp, "experts") and self.fused_moe(layer.mlp, h) and self._norm_in_kernels(norm)
        return self._row_parallel(out.view(b * t, -1), a.o_proj, h, norm, sums)

    def _rows(self, b: int) -> torch.Tensor:
        """The cache rows of a pass of `b` sequences that `self.rows` (a Rows) names."""
        rows = self.rows.rows
        if isinstance(rows, slice):
            return torch.arange(b, device=self.k.device) + (rows.start or 0)
        return rows

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        return self.kernels.linear and linear.fits(x, w)

    def _row_parallel(self, x: torch.Tensor, proj: Any, h: torch.Tensor, norm: Any = None,
                      sums: bool = False) -> tuple[torch.Tensor, Ahead]:
        """h + proj(x), summed over the tensor-parallel ranks: the residual rides in the GEMM (addmm) of
        one rank, whose output goes straight into the reducer's buffer. On one GPU the GEMM accumulates
        into h itself (the layer's input, read by nothing after this), which saves addmm's copy of h.
        `norm`: the RMSNorm that reads the sum next (see `_reduce`); `sums` (one GPU): also the rows' sums of
        squares, for the router kernel that applies it."""
        if proj.bias is not None:
            return self._reduce(proj(x).view_as(h), h)
        flat_h = h.view(-1, h.shape[-1])
        triton_gemm = self._linear(x, proj.weight)  # dependent-launched, its weights prefetched
        if self.reducer is None:
            if triton_gemm and sums:
                _, sq = linear.linear_residual(x, proj.weight, residual=flat_h, out=flat_h, row_sq=True, pdl=self.pdl)
                return h, Ahead(row_sq=sq)
            if triton_gemm:
                linear.linear_residual(x, proj.weight, residual=flat_h, out=flat_h, pdl=self.pdl)
            else:
                flat_h.addmm_(x, proj.weight.t())
            return h, NOTHING
        out = self.reducer.buffer_like(h)
        flat = out.view(-1, out.shape[-1])
        if triton_gemm:
            linear.linear_residual(x, proj.weight, residual=flat_h if self.lead else None, out=flat, pdl=self.pdl)
        elif self.lead:
            torch.addmm(flat_h, x, proj.weight.t(), out=flat)
        else:
            torch.mm(x, proj.weight.t(), out=flat)
        return self._sum(out, norm)

    def _merge_qkv(self) -> list[tuple[torch.Tensor, torch.Tensor | None, list[int]]]:
        """Decode steps project q, k and v in one GEMM: the three weights become views of one tensor (no
        copy kept; one layer's copy at a time while merging). A layer merged by an earlier runtime over the
        same model, and not re-sharded or moved since, is reused as it is."""
        merged = []
        for layer in self.layers:
            a = layer.self_attn
            projs = (a.q_proj, a.k_proj, a.v_proj)
            w, bias = _MERGED.get(a, (None, None))
            if w is None or a.q_proj.weight.data_ptr() != w.data_ptr() or any(
                    p.weight.device != w.device for p in projs):
                w = torch.cat([p.weight.data for p in projs])
                bias = torch.cat([p.bias.data for p in projs]) if a.q_proj.bias is not None else None
                start = 0
                for p in projs:
                    n = p.weight.shape[0]
                    p.weight = torch.nn.Parameter(w[start:start + n], requires_grad=False)
                    if bias is not None:
                        p.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=False)
                    start += n
                _MERGED[a] = (w, bias)
                if w.is_cuda:  # hand the three old tensors back now, or 48 layers keep ~1 GiB reserved
                    torch.cuda.empty_cache()
            merged.append((w, bias, [p.weight.shape[0] // self.head_dim for p in projs]))
        return merged

    # --- MLP / routed experts -------------------------------------------------------------------------
    def mlp(self, i: int, h: torch.Tensor, ahead: Ahead) -> tuple[torch.Tensor, Ahead]:
        """h + mlp(post_attention_layernorm(h)) and what its last kernel computed for the next op."""
        layer = self.layers[i]
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and self.fused_moe(layer.mlp, h):  # decode: router + 3 Triton kernels
            flat, weights, idx = self._norm_route(layer, h, ahead)
            out = self.reducer.buffer_like(h) if self.reducer is not None else torch.empty_like(h)
            nxt = self.next_norm(i)
            # one GPU: the experts' sum kernel also applies the next RMSNorm (tensor parallel: the all-reduce)
            xn = torch.empty_like(flat) if self._norm_in_kernels(nxt) else None
            share = share_of(experts)
            moe.experts(flat, experts, idx, weights, share.ep_start,
                        residual=h.view_as(flat) if self.lead else None, out=out.view_as(flat),
                        share=(share.rank, share.ranks),
                        norm=(nxt.weight, nxt.variance_epsilon, xn) if xn is not None else None, pdl=self.pdl,
                        every_expert=not self.kernels.moe_slots)
            if xn is not None:
                return out, Ahead(normed=xn.view_as(out), norm=nxt)
            return self._sum(out, nxt)
        x = self.norm(layer.post_attention_layernorm, h, ahead)
        route = self._gate_route if self.fused else None
        if self.reducer is not None and experts is not None:

            return self._reduce(expert_parallel_moe(layer.mlp, x, route), h)
        if route is not None and experts is not None and not hasattr(layer.mlp, "shared_expert"):
            flat = x.reshape(-1, x.shape[-1])
            weights, idx = route(layer.mlp.gate, flat)
            if self.reducer is None and self.kernels.prompt and moe.supported(experts):  # many tokens, one GPU
                return moe_prompt.experts(flat, experts, idx, weights, residual=h.view_as(flat)).view_as(h), NOTHING
            return self._reduce(experts(flat, idx, weights).view_as(x), h)
        return self._reduce(layer.mlp(x), h)

    def _gate_route(self, gate: Any, flat: torch.Tensor,
                    skip: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return router.gate_route(gate, flat, pdl=self.pdl, skip=skip)

    def _norm_route(self, layer: Any, h: torch.Tensor, ahead: Ahead) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, weights, ids) of a decode step's MoE block: x = the post-attention RMSNorm of h [tokens,
        hidden], and the router's choice for it. On one GPU the router kernel applies the norm itself, from
        the sums of squares o_proj left (one kernel fewer); under tensor parallelism the all-reduce before
        has (`ahead.normed`)."""
        norm, gate = layer.post_attention_layernorm, layer.mlp.gate
        flat = h.view(-1, h.shape[-1])
        if ahead.row_sq is not None and router.router_fits(gate, flat):
            x = torch.empty_like(flat)
            weights, idx = router.router(flat, gate.weight, gate.top_k, bool(gate.norm_topk_prob),
                                         norm=(norm.weight, norm.variance_epsilon, ahead.row_sq), xn=x, pdl=self.pdl,
                                         skip=self.idle)
            return x, weights, idx
        x = self.norm(norm, h, ahead).reshape(-1, h.shape[-1])
        return (x, *self._gate_route(gate, x, self.idle))

    def _norm_in_kernels(self, norm: Any) -> bool:
        return self.reducer is None and not self.hybrid and self.kernels.norm and is_rms(norm)

    def fused_moe(self, mlp: Any, x: torch.Tensor) -> bool:
        """Whether a decode step's routed experts take the Triton kernels (the hybrid's hook runs them
        elsewhere)."""
        if not (self.fused and self.decoding and self.kernels.moe and not self.hybrid
                and not hasattr(mlp, "shared_expert") and moe.supported(mlp.experts)):
            return False
        pairs = x.numel() // x.shape[-1] * getattr(mlp.gate, "top_k", 1 << 30)
        return moe.takes(pairs, for_device(x.device))  # past it: grouped GEMMs (`mlp`)

    # --- norms and the tensor-parallel sum --------------------------------------------------------------
    def _reduce(self, out: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, Ahead]:
        """h + out summed over the ranks (row-parallel outputs: every rank's partial out), no norm ahead."""
        return h + (self.reducer(out) if self.reducer is not None else out), NOTHING

    def _sum(self, x: torch.Tensor, norm: Any = None) -> tuple[torch.Tensor, Ahead]:
        """x (each rank's partial sum, residual included by the lead rank) summed over the ranks. With `norm`,
        the RMSNorm that reads the sum next, a decode step on GPUs sums and normalises in one kernel
        (Reducer.reduce_norm) and hands the normalised copy ahead."""
        if self.reducer is None:
            return x, NOTHING
        if norm is not None and self.fused and self.decoding and self.reducer.can_fuse(x, norm):
            try:
                h, normed = self.reducer.reduce_norm(x, norm, pdl=self.pdl)
            except Exception as exc:  # a Triton that cannot build it (every rank alike): the two kernels
                self.reducer.unfuse(exc)
                return self.reducer(x), NOTHING
            return h, Ahead(normed=normed, norm=norm)
        return self.reducer(x), NOTHING

    def norm(self, module: Any, h: torch.Tensor, ahead: Ahead = NOTHING) -> torch.Tensor:
        """rms_norm(module, h), unless the kernel that wrote h computed it already."""
        if ahead.normed is not None and ahead.norm is module and ahead.normed.shape == h.shape:
            return ahead.normed
        return rms_norm(module, h)

    def next_norm(self, i: int) -> Any:
        """The RMSNorm that reads layer i's output: the next layer's input norm, or the final one."""
        return self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.model.model.norm


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packed, scale: float) -> torch.Tensor:
    """Causal attention of packed pieces [1, heads, tokens, head_dim], each over its keys (k, v [1, kv_heads,
    keys, head_dim], packed by `p.bounds_k`, else by `p.bounds`): a piece's queries are its keys' last ones,
    the causal mask aligned to the lower right. FlashAttention's variable-length kernel on CUDA (one launch,
    grouped kv heads as they are; its causal mask is aligned so), an SDPA per piece elsewhere."""
    bounds_k = p.bounds_k or p.bounds
    spans = list(zip(zip(p.bounds, p.bounds[1:]), zip(bounds_k, bounds_k[1:])))
    if q.is_cuda:
        longest_q = max(b - a for (a, b), _ in spans)
        longest_k = max(b - a for _, (a, b) in spans)
        out = torch.ops.aten._flash_attention_forward(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), p.cu,
            p.cu if p.cu_k is None else p.cu_k, longest_q, longest_k, 0.0, True, False, scale=scale)[0]
        return out.transpose(0, 1)[None]
    out = []
    for (a, b), (ka, kb) in spans:
        t, n = b - a, kb - ka  # a later chunk sees its row's earlier slots and, causally, its own
        mask = {"is_causal": True} if n == t else {"attn_mask": causal_lower_right(t, n)}
        out.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb], scale=scale,
                                                  enable_gqa=True, **mask))
    return torch.cat(out, dim=2)


def is_rms(module: Any) -> bool:
    """A Qwen RMSNorm (weight and variance_epsilon), which the fused kernels can apply themselves."""
    return getattr(module, "variance_epsilon", None) is not None and isinstance(getattr(module, "weight", None),
                                                                                 torch.Tensor)


def rms_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen RMSNorm as one fused kernel: normalise in fp32, cast, then scale (same order)."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        return module(x)
    if x.is_cuda:  # weight fused too: one kernel instead of two (differs from transformers in the last bit)
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps)
    return F.rms_norm(x, (x.shape[-1],), None, eps) * module.weight
