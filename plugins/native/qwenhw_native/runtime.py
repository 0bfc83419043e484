"""A lean decode loop over a transformers Qwen3 / Qwen3-MoE / Qwen2 model's own modules.

Why not `model.generate`: at batch 1 a 48-layer MoE spends most of each token in Python and kernel launches
(HF eager reaches 6-16 tok/s on an H100 whose bandwidth allows ~450). This loop owns a static KV cache and
position tensors, so every decode step has fixed shapes and no host synchronisation, and can be captured
as CUDA graphs: one graph for the whole step when all weights are on the GPU, or one graph per layer's
attention + router when the routed experts run on the CPU (hybrid). On the CPU it runs the same code
eagerly, which is how CI checks it token for token against `model.generate`.

It calls the checkpoint's own modules (norms, projections, rotary embedding, MLP / MoE block) through
step.LayerStep, so the arithmetic is transformers' (or the Triton kernels that follow it); the cache, the
mask, the graphs and the loop are here.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

import torch

from .config import KernelConfig
from .graphs import Emulated, capture
from .limits import ARCHITECTURES, PREFILL_CHUNK
from .sampling import SampleParams, sample_rows
from .step import NOTHING, LayerStep, rms_norm


def supported(model: Any) -> bool:
    return getattr(model.config, "model_type", "") in ARCHITECTURES


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
                 group: Any = None, kernels: KernelConfig | None = None):
        self.model = model
        self.batch = batch
        self.group = group  # tensor/expert-parallel process group (see sharding.py); None = one device
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
            self._capture = Emulated.capture
        else:
            pool = torch.cuda.graph_pool_handle()
            self._capture = lambda fn: capture(fn, pool)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = attn.k_proj.weight.shape[0] // self.head_dim  # this rank's share under TP
        dtype = model.model.embed_tokens.weight.dtype
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.arange = torch.arange(max_len, device=self.device)
        self.kernels = kernels or KernelConfig.resolve()
        reducer, lead = None, True
        if group is not None:
            from .reducer import Reducer

            reducer = Reducer(group, batch * self.cfg.hidden_size, dtype, self.device, self.kernels)
            lead = torch.distributed.get_rank(group=group) == 0
        self.reducer = reducer
        self.step = LayerStep(model, self.k, self.v, self.kernels, self.device, reducer, lead,
                              emulated=graphs == "emulate", hybrid=moe_hook is not None)
        # static buffers for captured decode steps
        self.tok = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        # prompts of a batch are left-padded to one length: sequence j's cache starts at slot start[j] (RoPE
        # depends on relative positions only, so the shift changes nothing; the pad slots are masked)
        self.start = self.step.start = torch.zeros((batch,), dtype=torch.long, device=self.device)
        self._step_graph: Any = None
        self._layer_graphs: list[Any] = []
        self._graph_out: Any = None
        self.length = 0
        # prompts longer than this go one sequence and one chunk at a time (the planner reserves activations
        # for this many tokens per sequence; LayerStep.row says which chunk a pass writes)
        self.prefill_chunk = PREFILL_CHUNK

    # --- the forward pass ----------------------------------------------------------------------------
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
        h, ahead = self.model.model.embed_tokens(ids), NOTHING
        cos, sin, mask = self._rope_and_mask(pos, causal_from_zero=from_zero, padded=padded)
        for i in range(len(self.layers)):
            h, ahead = self.step.attention(i, h, ahead, pos, cos, sin, mask)
            if self.moe_hook is not None and self._is_moe(i):
                h, ahead = self.moe_hook(i, h), NOTHING
            else:
                h, ahead = self.step.mlp(i, h, ahead)
        last = h if h.shape[1] == 1 else h[:, -1:]
        return self.model.lm_head(self.step.norm(self.model.model.norm, last, ahead))[:, -1].float()

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
        self.step.decoding = False
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
                    self.step.row = (row, first, end)
                    t = torch.tensor([chunk], dtype=torch.long, device=self.device)
                    logits = self._forward(t, torch.arange(end - len(chunk), end, device=self.device),
                                           from_zero=True)
                last.append(logits)
        finally:
            self.step.row = None
        return torch.cat(last)

    @torch.inference_mode()
    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """One step for every sequence: `token` is an int (batch 1) or a tensor of `batch` token ids."""
        if self.length >= self.max_len:
            raise ValueError(f"the {self.max_len}-token cache is full")
        self._use_experts(self.decode_experts)
        self.step.decoding = True
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
                h, ahead = self.step.attention(i, h_in, NOTHING, self.pos, rope["cos"], rope["sin"], rope["mask"])
                if self._is_moe(i):
                    return (h, *self.moe_hook.route(i, h))
                return (self.step.mlp(i, h, ahead)[0],)

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


def set_experts(model: Any, name: str) -> None:
    """Switch transformers' experts kernel (set_experts_implementation where this version has it)."""
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(name)
            return
        except Exception:
            pass
    model.config._experts_implementation = name
