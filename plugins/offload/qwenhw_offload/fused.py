"""Fused decode kernels (Triton) for the lean runtime on NVIDIA GPUs.

A decode step replays ~57 small kernels per layer, and every GPU of a multi-GPU layout replays all of them
(docs/benchmarks.md, kernel census). Two groups are pure launch overhead at decode sizes:
- q/k RMSNorm + rotary embedding + the KV-cache write: 14 kernels per layer, here one;
- the MoE router's softmax, top-k, renormalisation and cast: 6 kernels per layer, here one.
Both follow transformers' Qwen3 arithmetic, rounding to the model dtype where it rounds. The runtime uses
them for decode steps on CUDA when Triton is importable, and keeps its torch code everywhere else (prefill,
CPU). The CPU tests run these kernels through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the runtime falls back to torch
    triton = None


def available(device: torch.device) -> bool:
    if triton is None or os.environ.get("QWENHW_FUSED", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _round(x, ty: tl.constexpr):
        return x.to(ty).to(tl.float32)

    @triton.jit
    def _qk_rope_cache(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr,
                       T, HQ, HK, MAX_LEN, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sc_b, sc_t,
                       eps, HALF: tl.constexpr, NORM: tl.constexpr):
        """One (token, head) per program: heads < HQ are query heads, the rest key heads (+ their values)."""
        ty = qo_ptr.dtype.element_ty
        bt = tl.program_id(0)
        h = tl.program_id(1)
        b = bt // T
        t = bt % T
        o = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + b * sc_b + t * sc_t + o).to(tl.float32)
        c2 = tl.load(cos_ptr + b * sc_b + t * sc_t + HALF + o).to(tl.float32)
        s1 = tl.load(sin_ptr + b * sc_b + t * sc_t + o).to(tl.float32)
        s2 = tl.load(sin_ptr + b * sc_b + t * sc_t + HALF + o).to(tl.float32)
        pos = tl.load(pos_ptr + t)
        is_q = h < HQ
        hk = h - HQ
        src = tl.where(is_q, q_ptr + b * sq_b + t * sq_t + h * sq_h, k_ptr + b * sk_b + t * sk_t + hk * sk_h)
        dst = tl.where(is_q, qo_ptr + ((b * HQ + h) * T + t) * 2 * HALF,
                       kc_ptr + ((b * HK + hk) * MAX_LEN + pos) * 2 * HALF)
        x1 = tl.load(src + o).to(tl.float32)
        x2 = tl.load(src + HALF + o).to(tl.float32)
        if NORM:  # Qwen3RMSNorm: normalise in fp32, round, then scale by the weight in the model dtype
            w_ptr = tl.where(is_q, qw_ptr, kw_ptr)
            r = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
            x1 = _round(_round(x1 * r, ty) * tl.load(w_ptr + o).to(tl.float32), ty)
            x2 = _round(_round(x2 * r, ty) * tl.load(w_ptr + HALF + o).to(tl.float32), ty)
        # apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
        y1 = _round(_round(x1 * c1, ty) + _round(-x2 * s1, ty), ty)
        y2 = _round(_round(x2 * c2, ty) + _round(x1 * s2, ty), ty)
        tl.store(dst + o, y1.to(ty))
        tl.store(dst + HALF + o, y2.to(ty))
        if not is_q:  # the value head goes to its cache slot unchanged
            vsrc = v_ptr + b * sv_b + t * sv_t + hk * sv_h
            vdst = vc_ptr + ((b * HK + hk) * MAX_LEN + pos) * 2 * HALF
            tl.store(vdst + o, tl.load(vsrc + o))
            tl.store(vdst + HALF + o, tl.load(vsrc + HALF + o))

    @triton.jit
    def _route(logits_ptr, w_ptr, idx_ptr, E, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
               NORM: tl.constexpr):
        """softmax (fp32) -> top-k -> renormalise -> cast, one token per program (Qwen3MoeTopKRouter)."""
        ty = w_ptr.dtype.element_ty
        n = tl.program_id(0)
        o = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + n * E + o, mask=o < E, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - tl.max(x, 0))
        p = e / tl.sum(e, 0)
        ks = tl.arange(0, BLOCK_K)
        vals = tl.zeros([BLOCK_K], dtype=tl.float32)
        idxs = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.max(p, 0)
            at = tl.argmax(p, 0)
            vals = tl.where(ks == j, best, vals)
            idxs = tl.where(ks == j, at.to(tl.int64), idxs)
            p = tl.where(o == at, -1.0, p)
        if NORM:
            vals = vals / tl.sum(vals, 0)
        tl.store(w_ptr + n * K + ks, vals.to(ty), mask=ks < K)
        tl.store(idx_ptr + n * K + ks, idxs, mask=ks < K)


def qk_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: Any, k_norm: Any,
                  cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> torch.Tensor:
    """q, k, v [b, t, heads, d] (last dim contiguous); caches [b, kv_heads, max_len, d]; cos/sin [1 or b, t, d].

    Writes k (normalised, rotated) and v into the caches at `pos` and returns q as [b, heads, t, d].
    """
    b, t, hq, d = q.shape
    hk = k.shape[2]
    q_out = torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    norm = q_norm is not None
    eps = float(q_norm.variance_epsilon) if norm else 0.0
    qw = q_norm.weight if norm else q
    kw = k_norm.weight if norm else k
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _qk_rope_cache[(b * t, hq + hk)](
        q, k, v, qw, kw, cos, sin, pos, q_out, k_cache, v_cache, t, hq, hk, k_cache.shape[2],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos_b, cos.stride(1), eps, HALF=d // 2, NORM=norm)
    return q_out


def route(logits: torch.Tensor, top_k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, k] in the logits' dtype, expert ids [n, k] int64) from router logits [n, E]."""
    n, experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty((n, top_k), dtype=logits.dtype, device=logits.device)
    idx = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    _route[(n,)](logits, weights, idx, experts, K=top_k, BLOCK_E=triton.next_power_of_2(experts),
                 BLOCK_K=triton.next_power_of_2(top_k), NORM=normalise)
    return weights, idx


def gate_route(gate: Any, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) of a transformers MoE router: one fused kernel for Qwen3-style top-k routers."""
    if hasattr(gate, "top_k") and hasattr(gate, "norm_topk_prob") and gate.weight.shape[0] == getattr(
            gate, "num_experts", -1):
        return route(torch.nn.functional.linear(flat, gate.weight), gate.top_k, bool(gate.norm_topk_prob))
    _, weights, idx = gate(flat)
    return weights, idx
