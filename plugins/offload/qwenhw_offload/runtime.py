"""A lean decode loop over a transformers Qwen3 / Qwen3-MoE / Qwen2 model's own modules.

Why not `model.generate`: at batch 1 a 48-layer MoE spends most of each token in Python and kernel launches
(HF eager reaches 6-16 tok/s on an H100 whose bandwidth allows ~450). This loop owns a static KV cache and
position tensors, so every decode step has fixed shapes and no host synchronisation, and can be captured
as CUDA graphs: one graph for the whole step when all weights are on the GPU, or one graph per layer's
attention + router when the routed experts run on the CPU (hybrid). On the CPU it runs the same code
eagerly, which is how CI checks it token for token against `model.generate`.

It calls the checkpoint's own modules (norms, projections, rotary embedding, MLP / MoE block), so the
arithmetic is transformers'; only the cache, the mask and the loop are ours.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import fused
from .planner import PREFILL_CHUNK

SUPPORTED = ("qwen3", "qwen3_moe", "qwen2", "qwen2_moe")


@dataclass
class SampleParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def supported(model: Any) -> bool:
    return getattr(model.config, "model_type", "") in SUPPORTED


class Runtime:
    """Prefill + decode for `batch` sequences at a time (prompts left-padded to one length), with a static
    cache of `max_len` tokens per sequence.

    `moe_hook`, when given, replaces each MoE block: `moe_hook(i, h) -> h` eagerly, or in graph mode
    `moe_hook.route(i, h) -> (x, weights, idx)` inside layer i's graph and `moe_hook.experts(i, x, weights,
    idx, static=True) -> out` between graphs (the hybrid engine computes experts on the CPU there; `static`
    says the inputs are the graph's fixed output buffers).
    """

    def __init__(self, model: Any, max_len: int, device: str | torch.device, graphs: bool = True,
                 moe_hook: Callable | None = None, decode_experts: str | None = None, batch: int = 1,
                 group: Any = None):
        self.model = model
        self.batch = batch
        self.group = group  # tensor/expert-parallel process group (see parallel.py); None = one device
        # experts kernels: transformers' default (grouped) for prefill; batched matmuls for decode, whose
        # fixed shapes capture into a graph (they gather T*k expert matrices: fine at decode, not prefill)
        self.prefill_experts = "grouped_mm" if hasattr(model.config, "_experts_implementation") else None
        self.decode_experts = decode_experts
        self._experts_now = None
        self.device = torch.device(device)
        self.cfg = model.config
        self.layers = model.model.layers
        self.max_len = max_len
        self.moe_hook = moe_hook
        # graphs="emulate" replays the captured functions eagerly: the CPU tests walk the graph code paths
        self.graphs = graphs == "emulate" or (bool(graphs) and self.device.type == "cuda")
        emulate = graphs == "emulate" or self.device.type != "cuda"
        if emulate:
            self._capture = _Emulated.capture
        else:
            pool = torch.cuda.graph_pool_handle()
            self._capture = lambda fn: _capture(fn, pool)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = attn.k_proj.weight.shape[0] // self.head_dim  # this rank's share under TP
        dtype = model.model.embed_tokens.weight.dtype
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.arange = torch.arange(max_len, device=self.device)
        self.reducer = None
        self._normed: Any = None  # (h, norm, norm(h)) from a fused reduction, for `_norm`
        self._row_sq: Any = None  # (h, partial sums of its rows' squares) from o_proj, for `_norm_route`
        self.lead = True  # the rank that adds the residual into its partial sum (all of them reduce)
        if group is not None:
            from .parallel import Reducer

            self.reducer = Reducer(group, batch * self.cfg.hidden_size, dtype, self.device)
            self.lead = torch.distributed.get_rank(group=group) == 0
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        # decode steps on CUDA: q/k norm + RoPE + cache write and the MoE router as one Triton kernel each
        self.fused = fused.available(self.device) and graphs != "emulate"
        self._decoding = False  # decode steps take the fused MoE kernels; prompts keep transformers' experts
        self._qkv = self._merge_qkv() if self.fused else []
        # static buffers for captured decode steps
        self.tok = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        # prompts of a batch are left-padded to one length: sequence j's cache starts at slot start[j] (RoPE
        # depends on relative positions only, so the shift changes nothing; the pad slots are masked)
        self.start = torch.zeros((batch,), dtype=torch.long, device=self.device)
        self._step_graph: Any = None
        self._layer_graphs: list[Any] = []
        self._graph_out: Any = None
        self.length = 0
        # prompts longer than this go one sequence and one chunk at a time (the planner reserves activations
        # for this many tokens per sequence): (row, its first slot, the chunk's end) while they do
        self.prefill_chunk = PREFILL_CHUNK
        self._row: tuple[int, int, int] | None = None

    # --- the model's pieces -------------------------------------------------------------------------
    def _attention(self, i: int, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        if self.fused and self._decoding:
            return self._attention_decode(i, h, pos, cos, sin)
        layer = self.layers[i]
        a = layer.self_attn
        b, t, _ = h.shape
        x = rms_norm(layer.input_layernorm, h)
        q = a.q_proj(x).view(b, t, -1, self.head_dim)
        k = a.k_proj(x).view(b, t, -1, self.head_dim)
        v = a.v_proj(x).view(b, t, -1, self.head_dim)
        if hasattr(a, "q_norm"):  # Qwen3 normalises q and k per head; Qwen2 does not
            q, k = rms_norm(a.q_norm, q), rms_norm(a.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        # the cache rows this forward writes: every sequence's, or one chunk of one sequence's prompt
        seqs = slice(self._row[0], self._row[0] + 1) if self._row is not None else slice(None)
        kc, vc = self.k[i][seqs], self.v[i][seqs]
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        if self._row is not None:  # prefill_rows
            # the chunk's queries see the sequence's earlier slots and, causally, their own: the causal mask
            # aligned to the lower right, never materialised (flash / memory-efficient kernels)
            _, first, end = self._row
            span = end - first
            bias = causal_lower_right(t, span) if span > t else None
            out = F.scaled_dot_product_attention(q, kc[:, :, first:end], vc[:, :, first:end], attn_mask=bias,
                                                 is_causal=bias is None, scale=a.scaling, enable_gqa=True)
        elif mask is None:  # a prompt from position 0: plain causal attention over its own keys (flash kernels)
            out = F.scaled_dot_product_attention(q, kc[:, :, :t], vc[:, :, :t], is_causal=True, scale=a.scaling,
                                                 enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=a.scaling, enable_gqa=True)
        out = a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return h + self._reduce(out)

    def _attention_decode(self, i: int, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
        """A decode step's attention on the fused kernels: the q/k/v GEMM, q/k norms, RoPE and the cache write
        in one kernel (up to fused.LINEAR_MAX_TOKENS sequences; else cuBLAS, then one kernel for the rest);
        attention over the filled part of the cache; o_proj with the residual added."""
        layer = self.layers[i]
        a = layer.self_attn
        b, t, _ = h.shape
        x = self._norm(layer.input_layernorm, h)
        w, bias, heads = self._qkv[i]
        norms = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        if t == 1 and fused.linear_fits(x.view(b, -1), w):  # the GEMM, the norms, RoPE and the cache write
            q = fused.qkv_rope(x.view(b, -1), w, bias, heads, *norms, cos, sin, pos, self.k[i], self.v[i])
        else:
            q, k, v = F.linear(x, w, bias).view(b, t, -1, self.head_dim).split(heads, dim=2)
            q = fused.qk_rope_cache(q, k, v, *norms, cos, sin, pos, self.k[i], self.v[i])
        out = fused.decode_attention(q, self.k[i], self.v[i], pos, a.scaling, self.start)
        norm = layer.post_attention_layernorm
        # one GPU: the router kernel will apply the norm, from the sums of squares o_proj leaves (`_norm_route`)
        sums = (self.moe_hook is None and hasattr(layer.mlp, "experts") and self._fused_moe(layer.mlp, h)
                and self._norm_in_kernels(norm))
        return self._row_parallel(out.view(b * t, -1), a.o_proj, h, norm, sums)

    def _row_parallel(self, x: torch.Tensor, linear: Any, h: torch.Tensor, norm: Any = None,
                      sums: bool = False) -> torch.Tensor:
        """h + linear(x), summed over the tensor-parallel ranks: the residual rides in the GEMM (addmm) of
        one rank, whose output goes straight into the reducer's buffer. On one GPU the GEMM accumulates
        into h itself (the layer's input, read by nothing after this), which saves addmm's copy of h.
        `norm`: the RMSNorm that reads the sum next (see `_reduce`); `sums` (one GPU): also the rows' sums of
        squares, for the router kernel that applies it."""
        if linear.bias is not None:
            return h + self._reduce(linear(x).view_as(h))
        flat_h = h.view(-1, h.shape[-1])
        triton_gemm = fused.linear_fits(x, linear.weight)  # dependent-launched, its weights prefetched
        if self.reducer is None:
            if triton_gemm and sums:
                _, sq = fused.linear_residual(x, linear.weight, residual=flat_h, out=flat_h, row_sq=True)
                self._row_sq = (h, sq)
            elif triton_gemm:
                fused.linear_residual(x, linear.weight, residual=flat_h, out=flat_h)
            else:
                flat_h.addmm_(x, linear.weight.t())
            return h
        out = self._partial(h)
        flat = out.view(-1, out.shape[-1])
        if triton_gemm:
            fused.linear_residual(x, linear.weight, residual=flat_h if self.lead else None, out=flat)
        elif self.lead:
            torch.addmm(flat_h, x, linear.weight.t(), out=flat)
        else:
            torch.mm(x, linear.weight.t(), out=flat)
        return self._reduce(out, norm)

    def _partial(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like) if self.reducer is None else self.reducer.buffer_like(like)

    def _merge_qkv(self) -> list[tuple[torch.Tensor, torch.Tensor | None, list[int]]]:
        """Decode steps project q, k and v in one GEMM: the three weights become views of one tensor (no
        copy kept; one layer's copy at a time while merging). A model merged by an earlier runtime, and not
        re-sharded since, is reused as it is."""
        merged = []
        for layer in self.layers:
            a = layer.self_attn
            projs = (a.q_proj, a.k_proj, a.v_proj)
            w = getattr(a, "_qkv_weight", None)
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
                a._qkv_weight, a._qkv_bias = w, bias
                if w.is_cuda:  # hand the three old tensors back now, or 48 layers keep ~1 GiB reserved
                    torch.cuda.empty_cache()
            merged.append((w, a._qkv_bias, [p.weight.shape[0] // self.head_dim for p in projs]))
        return merged

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and self._fused_moe(layer.mlp, h):  # decode: router + 3 Triton kernels
            flat, weights, idx = self._norm_route(layer, h)
            out = self._partial(h)
            nxt = self._next_norm(i)
            # one GPU: the experts' sum kernel also applies the next RMSNorm (tensor parallel: the all-reduce)
            xn = torch.empty_like(flat) if self._norm_in_kernels(nxt) else None
            fused.moe_experts(flat, experts, idx, weights, getattr(experts, "ep_start", 0),
                              residual=h.view_as(flat) if self.lead else None, out=out.view_as(flat),
                              share=getattr(experts, "share", (0, 1)),
                              norm=(nxt.weight, nxt.variance_epsilon, xn) if xn is not None else None)
            if xn is not None:
                self._normed = (out, nxt, xn.view_as(out))
                return out
            return self._reduce(out, nxt)
        x = self._norm(layer.post_attention_layernorm, h)
        route = fused.gate_route if self.fused else None
        if self.group is not None and experts is not None:
            from .parallel import expert_parallel_moe

            return h + self._reduce(expert_parallel_moe(layer.mlp, x, route))
        if route is not None and experts is not None and not hasattr(layer.mlp, "shared_expert"):
            flat = x.reshape(-1, x.shape[-1])
            weights, idx = route(layer.mlp.gate, flat)
            return h + self._reduce(experts(flat, idx, weights).view_as(x))
        return h + self._reduce(layer.mlp(x))

    def _norm_route(self, layer: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, weights, ids) of a decode step's MoE block: x = the post-attention RMSNorm of h [tokens,
        hidden], and the router's choice for it. On one GPU the router kernel applies the norm itself, from
        the sums of squares o_proj left (one kernel fewer); under tensor parallelism the all-reduce before
        has (`_norm`)."""
        norm, gate = layer.post_attention_layernorm, layer.mlp.gate
        flat = h.view(-1, h.shape[-1])
        done, self._row_sq = self._row_sq, None
        if done is not None and done[0] is h and fused.router_fits(gate, flat):
            x = torch.empty_like(flat)
            weights, idx = fused.router(flat, gate.weight, gate.top_k, bool(gate.norm_topk_prob),
                                        norm=(norm.weight, norm.variance_epsilon, done[1]), xn=x)
            return x, weights, idx
        x = self._norm(norm, h).reshape(-1, h.shape[-1])
        return (x, *fused.gate_route(gate, x))

    def _norm_in_kernels(self, norm: Any) -> bool:
        return self.reducer is None and _is_rms(norm) and fused.norm_enabled()

    def _fused_moe(self, mlp: Any, x: torch.Tensor) -> bool:
        pairs = x.numel() // x.shape[-1] * getattr(mlp.gate, "top_k", 1 << 30)
        return (self.fused and self._decoding and fused.moe_enabled() and not hasattr(mlp, "shared_expert")
                and pairs <= fused.MOE_MAX_PAIRS and fused.moe_supported(mlp.experts))

    def _reduce(self, x: torch.Tensor, norm: Any = None) -> torch.Tensor:
        """Sum partial results over the tensor/expert-parallel ranks (row-parallel outputs). With `norm`, the
        RMSNorm that reads the sum next, a decode step on GPUs sums and normalises in one kernel
        (Reducer.reduce_norm); `_norm` hands the normalised copy to that reader."""
        if self.reducer is None:
            return x
        if norm is not None and self.fused and self._decoding and self.reducer.can_fuse(x, norm):
            try:
                h, normed = self.reducer.reduce_norm(x, norm)
            except Exception as exc:  # a Triton that cannot build it (every rank alike): the two kernels
                self.reducer.unfuse(exc)
                return self.reducer(x)
            self._normed = (h, norm, normed)
            return h
        return self.reducer(x)

    def _norm(self, module: Any, h: torch.Tensor) -> torch.Tensor:
        """rms_norm(module, h), unless the reduction that produced h computed it already."""
        done, self._normed = self._normed, None
        if done is not None and done[0] is h and done[1] is module:
            return done[2]
        return rms_norm(module, h)

    def _next_norm(self, i: int) -> Any:
        """The RMSNorm that reads layer i's output: the next layer's input norm, or the final one."""
        return self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.model.model.norm

    def _rope_and_mask(self, pos: torch.Tensor, causal_from_zero: bool = False, padded: bool = False):
        cos, sin = self.model.model.rotary_emb(self.k, position_ids=pos[None, :])
        if causal_from_zero and not padded:
            return cos, sin, None
        # query t of sequence j sees the cache slots from start[j] up to its own position; the rest of the
        # static cache is masked. A pad query sees itself only (no row may be fully masked: NaN)
        slots, start = self.arange[None, None, :], self.start[:, None, None]
        allowed = (slots <= pos[None, :, None]) & (slots >= start)
        allowed |= (slots == pos[None, :, None]) & (pos[None, :, None] < start)
        mask = torch.zeros(allowed.shape, dtype=self.k.dtype, device=self.device)
        return cos, sin, mask.masked_fill(~allowed, float("-inf"))[:, None]

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, from_zero: bool = False,
                 padded: bool = False) -> torch.Tensor:
        if self.reducer is not None:
            self.reducer.restart()
        self._normed = self._row_sq = None
        h = self.model.model.embed_tokens(ids)
        cos, sin, mask = self._rope_and_mask(pos, causal_from_zero=from_zero, padded=padded)
        for i in range(len(self.layers)):
            h = self._attention(i, h, pos, cos, sin, mask)
            h = self._moe_or_mlp(i, h)
        last = h if h.shape[1] == 1 else h[:, -1:]
        return self.model.lm_head(self._norm(self.model.model.norm, last))[:, -1].float()

    def _moe_or_mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.moe_hook is not None and self._is_moe(i):
            return self.moe_hook(i, h)
        return self._mlp(i, h)

    def _is_moe(self, i: int) -> bool:
        return hasattr(self.layers[i].mlp, "experts")

    # --- prefill and decode ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.length = 0

    @torch.inference_mode()
    def warm(self) -> None:
        """Capture the decode graphs now, not in the first request that reaches this runtime (measured: a
        DP=4 rank job served 16 concurrent requests at 790 tok/s instead of ~6000 when two of them arrived
        late and went alone to replicas whose batch-1 runtime had never run). Graph runtimes only; every
        rank of a tensor-parallel group calls it at the same point (the step has collectives)."""
        if not self.graphs or self.device.type != "cuda":
            return
        self.prefill([[0]] * self.batch)
        self.decode(torch.zeros(self.batch, dtype=torch.long, device=self.device))
        self.reset()

    @torch.inference_mode()
    def prefill(self, ids: list[int] | list[list[int]]) -> torch.Tensor:
        """Prompt(s) from position 0: one list of ids, or `batch` lists (left-padded to the longest).
        Returns the logits of each sequence's last token."""
        rows = ids if ids and isinstance(ids[0], list) else [ids]
        if len(rows) != self.batch or not all(rows):
            raise ValueError(f"this runtime decodes {self.batch} non-empty sequence(s) at a time")
        n = max(len(r) for r in rows)
        if n + 1 > self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the {self.max_len}-token cache")
        self._use_experts(self.prefill_experts)
        self._decoding = False
        pads = [n - len(r) for r in rows]
        self.start.copy_(torch.tensor(pads))
        self.length = n
        if n > self.prefill_chunk:
            return self._prefill_rows(rows, pads)
        t = torch.tensor([[r[0]] * p + r for r, p in zip(rows, pads)], dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        return self._forward(t, pos, from_zero=True, padded=any(pads))

    def _prefill_rows(self, rows: list[list[int]], pads: list[int]) -> torch.Tensor:
        """Long prompts: each sequence on its own, `prefill_chunk` tokens per forward pass, into its row of
        the cache at the slots the left-padded layout gives it (so decode steps find it where they look).
        A whole batch of 32k-token prompts in one pass would hold activations for all of them at once."""
        last = []
        try:
            for row, (ids, pad) in enumerate(zip(rows, pads)):
                for lo in range(0, len(ids), self.prefill_chunk):
                    chunk = ids[lo:lo + self.prefill_chunk]
                    first, end = pad, pad + lo + len(chunk)
                    self._row = (row, first, end)
                    t = torch.tensor([chunk], dtype=torch.long, device=self.device)
                    logits = self._forward(t, torch.arange(end - len(chunk), end, device=self.device),
                                           from_zero=True)
                last.append(logits)
        finally:
            self._row = None
        return torch.cat(last)

    @torch.inference_mode()
    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """One step for every sequence: `token` is an int (batch 1) or a tensor of `batch` token ids."""
        if self.length >= self.max_len:
            raise ValueError(f"the {self.max_len}-token cache is full")
        self._use_experts(self.decode_experts)
        self._decoding = True
        if isinstance(token, int):
            self.tok.fill_(token)
        else:
            self.tok.copy_(token.view(self.batch, 1))
        self.pos.fill_(self.length)
        self.length += 1
        if not self.graphs:
            return self._forward(self.tok, self.pos)
        if self.moe_hook is None:
            return self._replay_step()
        return self._replay_layers()

    def _use_experts(self, name: str | None) -> None:
        if name and name != self._experts_now and hasattr(self.layers[0].mlp, "experts"):
            set_experts(self.model, name)
            self._experts_now = name

    # whole step in one graph: everything on the GPU
    def _replay_step(self) -> torch.Tensor:
        if self._step_graph is None:
            self._step_graph, self._graph_out = self._capture(lambda: self._forward(self.tok, self.pos))
        self._step_graph.replay()
        return self._graph_out

    # one graph per layer's attention (+ the embedding / head at the ends); experts on the CPU in between
    def _replay_layers(self) -> torch.Tensor:
        if not self._layer_graphs:
            self._capture_layers()
        g_embed, g_layers, g_head = self._layer_graphs
        g_embed.replay()
        for i, (graph, outs, _) in enumerate(g_layers):
            graph.replay()
            h = outs[0]
            if len(outs) > 1:  # attention and routing ran in the graph; the experts run here
                h = h + self.moe_hook.experts(i, *outs[1:], static=True).view_as(h)
            nxt = g_layers[i + 1][2] if i + 1 < len(g_layers) else self._head_in
            nxt.copy_(h)
        g_head.replay()
        return self._graph_out

    def _capture_layers(self) -> None:
        hidden = self.cfg.hidden_size
        self._h0 = torch.zeros((self.batch, 1, hidden), dtype=self.k.dtype, device=self.device)
        rope: dict[str, torch.Tensor] = {}

        def embed():
            self._h0.copy_(self.model.model.embed_tokens(self.tok))
            rope["cos"], rope["sin"], rope["mask"] = self._rope_and_mask(self.pos)
            return self._h0

        g_embed, _ = self._capture(embed)
        layers = []
        for i in range(len(self.layers)):
            h_in = self._h0 if i == 0 else torch.zeros_like(self._h0)

            def body(i=i, h_in=h_in):
                h = self._attention(i, h_in, self.pos, rope["cos"], rope["sin"], rope["mask"])
                if self._is_moe(i):
                    return (h, *self.moe_hook.route(i, h))
                return (self._mlp(i, h),)

            graph, outs = self._capture(body)
            layers.append((graph, outs, h_in))
        self._head_in = torch.zeros_like(self._h0)
        g_head, self._graph_out = self._capture(
            lambda: self.model.lm_head(rms_norm(self.model.model.norm, self._head_in))[:, -1].float())
        self._layer_graphs = [g_embed, layers, g_head]

    # --- sampling loops -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], max_new: int, params: SampleParams,
                       eos: set[int]) -> list[list[int]]:
        """Up to `batch` prompts decoded together; each sequence's tokens up to its EOS (kept) or `max_new`."""
        out: list[list[int]] = [[] for _ in prompts]
        for row, token, _ in self.stream_batch(prompts, [max_new] * len(prompts), params, eos):
            out[row].append(token)
        return out

    @torch.inference_mode()
    def stream_batch(self, prompts: list[list[int]], max_new: list[int], params: SampleParams, eos: set[int],
                     alive: Callable[[int], bool] | None = None) -> Iterator[tuple[int, int, bool]]:
        """Up to `batch` prompts decoded together (rows past them repeat the first prompt and are dropped):
        (row, token, last) as each step samples. A row ends at its EOS (yielded, last), after its own
        max_new tokens or when the cache is full (last), or when `alive(row)` turns false (nothing more)."""
        n = len(prompts)
        if not 0 < n <= self.batch:
            raise ValueError(f"this runtime decodes up to {self.batch} sequences at a time, not {n}")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        logits = self.prefill(list(prompts) + [prompts[0]] * (self.batch - n))
        room = self.max_len - self.length
        limit = [min(m, room) for m in max_new]
        count = [0] * n
        live = {row for row in range(n) if limit[row] > 0}
        while live:
            tokens = sample_rows(logits, params, gen)
            for row, token in enumerate(tokens.tolist()[:n]):
                if row not in live:
                    continue
                if alive is not None and not alive(row):
                    live.discard(row)
                    continue
                count[row] += 1
                last = token in eos or count[row] >= limit[row]
                if last:
                    live.discard(row)
                yield row, token, last
            if live and alive is not None:
                live = {row for row in live if alive(row)}
            if live:
                logits = self.decode(tokens)

    def generate(self, ids: list[int], max_new: int, params: SampleParams, eos: set[int]) -> Iterator[int]:
        """One sequence's tokens, up to its EOS (yielded) or `max_new` or a full cache."""
        for _, token, _ in self.stream_batch([ids], [max_new], params, eos):
            yield token


def sample_rows(logits: torch.Tensor, p: SampleParams, gen: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [rows, vocab]."""
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)[:, 0]


def _is_rms(module: Any) -> bool:
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


def set_experts(model: Any, name: str) -> None:
    """Switch transformers' experts kernel (set_experts_implementation where this version has it)."""
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(name)
            return
        except Exception:
            pass
    model.config._experts_implementation = name


class _Emulated:
    """Stands in for a CUDA graph: replay() re-runs the function and copies into the captured outputs."""

    def __init__(self, fn: Callable, outs: Any):
        self.fn, self.outs = fn, outs

    @classmethod
    def capture(cls, fn: Callable) -> tuple["_Emulated", Any]:
        outs = fn()
        return cls(fn, outs), outs

    def replay(self) -> None:
        new = self.fn()
        pairs = zip(self.outs, new) if isinstance(new, tuple) else [(self.outs, new)]
        for static, fresh in pairs:
            if static is not fresh:
                static.copy_(fresh)


def _capture(fn: Callable[[], torch.Tensor], pool: Any = None) -> tuple[Any, torch.Tensor]:
    """Warm up on a side stream (as CUDA graphs require), then capture `fn` once.

    Graphs of one runtime share a memory pool: they replay in capture order, one at a time, so one graph's
    temporaries may reuse another's (49 private pools held ~1.4 GiB at 48 layers). Warm-ups share one side
    stream: cuBLAS keeps a workspace per stream it has run on, and torch hands out up to 32 pooled streams
    (measured: ~0.9 GiB of workspaces for 48 layer graphs, each warmed up on a fresh stream).
    """
    stream = _warmup_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


_WARMUP: dict[int, Any] = {}


def _warmup_stream() -> Any:
    device = torch.cuda.current_device()
    if device not in _WARMUP:
        _WARMUP[device] = torch.cuda.Stream()
    return _WARMUP[device]
