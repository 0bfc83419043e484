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
    """Prefill + decode for one sequence at a time, with a static cache of `max_len` tokens.

    `moe_hook(layer_idx, hidden, residual) -> hidden`, when given, replaces each MoE block (the hybrid engine
    computes experts on the CPU there); attention and routing stay in the captured graphs.
    """

    def __init__(self, model: Any, max_len: int, device: str | torch.device, graphs: bool = True,
                 moe_hook: Callable | None = None, decode_experts: str | None = None):
        self.model = model
        # experts kernels: transformers' default (grouped) for prefill; batched matmuls for decode, whose
        # fixed shapes capture into a graph (they gather T*k expert matrices: fine at decode, not prefill)
        self.prefill_experts = getattr(model.config, "_experts_implementation", None)
        self.decode_experts = decode_experts
        self._experts_now = self.prefill_experts
        self.device = torch.device(device)
        self.cfg = model.config
        self.layers = model.model.layers
        self.max_len = max_len
        self.moe_hook = moe_hook
        self.graphs = graphs and self.device.type == "cuda"
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = self.cfg.num_key_value_heads
        dtype = model.model.embed_tokens.weight.dtype
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.arange = torch.arange(max_len, device=self.device)
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        # static buffers for captured decode steps
        self.tok = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        self._step_graph: Any = None
        self._layer_graphs: list[Any] = []
        self._graph_out: Any = None
        self.length = 0

    # --- the model's pieces -------------------------------------------------------------------------
    def _attention(self, i: int, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        a = layer.self_attn
        b, t, _ = h.shape
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(b, t, -1, self.head_dim)
        k = a.k_proj(x).view(b, t, -1, self.head_dim)
        v = a.v_proj(x).view(b, t, -1, self.head_dim)
        if hasattr(a, "q_norm"):  # Qwen3 normalises q and k per head; Qwen2 does not
            q, k = a.q_norm(q), a.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        self.k[i].index_copy_(2, pos, k)
        self.v[i].index_copy_(2, pos, v)
        out = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, scale=a.scaling,
                                             enable_gqa=True)
        out = a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return h + out

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _rope_and_mask(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cos, sin = self.model.model.rotary_emb(self.k, position_ids=pos[None, :])
        # query t may see cache slots up to its own position; the rest of the static cache is masked
        allowed = self.arange[None, :] <= pos[:, None]
        mask = torch.zeros(allowed.shape, dtype=self.k.dtype, device=self.device)
        mask = mask.masked_fill(~allowed, float("-inf"))[None, None]
        return cos, sin, mask

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.model.model.embed_tokens(ids)
        cos, sin, mask = self._rope_and_mask(pos)
        for i in range(len(self.layers)):
            h = self._attention(i, h, pos, cos, sin, mask)
            h = self._moe_or_mlp(i, h)
        return self.model.lm_head(self.model.model.norm(h[:, -1:]))[:, -1].float()

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
    def prefill(self, ids: list[int]) -> torch.Tensor:
        if len(ids) + 1 > self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the {self.max_len}-token cache")
        self._use_experts(self.prefill_experts)
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(len(ids), device=self.device)
        self.length = len(ids)
        return self._forward(t, pos)

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        if self.length >= self.max_len:
            raise ValueError(f"the {self.max_len}-token cache is full")
        self._use_experts(self.decode_experts)
        self.tok.fill_(token)
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
            self._step_graph, self._graph_out = _capture(lambda: self._forward(self.tok, self.pos))
        self._step_graph.replay()
        return self._graph_out

    # one graph per layer's attention (+ the embedding / head at the ends); experts on the CPU in between
    def _replay_layers(self) -> torch.Tensor:
        if not self._layer_graphs:
            self._capture_layers()
        g_embed, g_layers, g_head = self._layer_graphs
        g_embed.replay()
        for i, (graph, h_in, h_out) in enumerate(g_layers):
            graph.replay()
            h = self.moe_hook(i, h_out) if self._is_moe(i) else h_out
            nxt = g_layers[i + 1][1] if i + 1 < len(g_layers) else self._head_in
            nxt.copy_(h)
        g_head.replay()
        return self._graph_out

    def _capture_layers(self) -> None:
        hidden = self.cfg.hidden_size
        dtype = self.k.dtype
        self._h0 = torch.zeros((1, 1, hidden), dtype=dtype, device=self.device)
        rope: dict[str, torch.Tensor] = {}

        def embed():
            self._h0.copy_(self.model.model.embed_tokens(self.tok))
            rope["cos"], rope["sin"], rope["mask"] = self._rope_and_mask(self.pos)
            return self._h0

        g_embed, _ = _capture(embed)
        layers = []
        for i in range(len(self.layers)):
            h_in = self._h0 if i == 0 else torch.zeros_like(self._h0)
            out_holder: dict[str, torch.Tensor] = {}

            def body(i=i, h_in=h_in):
                h = self._attention(i, h_in, self.pos, rope["cos"], rope["sin"], rope["mask"])
                if not self._is_moe(i):
                    h = self._mlp(i, h)
                return h

            graph, h_out = _capture(body)
            layers.append((graph, h_in, h_out))
            del out_holder
        self._head_in = torch.zeros_like(self._h0)
        g_head, self._graph_out = _capture(
            lambda: self.model.lm_head(self.model.model.norm(self._head_in))[:, -1].float())
        self._layer_graphs = [g_embed, layers, g_head]

    # --- sampling loop ------------------------------------------------------------------------------
    def generate(self, ids: list[int], max_new: int, params: SampleParams, eos: set[int]) -> Iterator[int]:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        logits = self.prefill(ids)
        for n in range(max_new):
            token = sample(logits, params, gen)
            yield token
            if token in eos or n + 1 == max_new or self.length >= self.max_len:
                return
            logits = self.decode(token)


def sample(logits: torch.Tensor, p: SampleParams, gen: torch.Generator | None) -> int:
    if p.temperature <= 0:
        return int(logits.argmax(-1))
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
    return int(torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen))


def set_experts(model: Any, name: str) -> None:
    """Switch transformers' experts kernel (set_experts_implementation where this version has it)."""
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(name)
            return
        except Exception:
            pass
    model.config._experts_implementation = name


def _capture(fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """Warm up on a side stream (as CUDA graphs require), then capture `fn` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
