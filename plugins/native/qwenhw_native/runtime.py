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

from itertools import accumulate
from typing import Any, Callable, Iterator

import torch

from .batching import ContinuousBatch, Filling, Piece
from .config import KernelConfig
from .graphs import Emulated, Upload, capture, to_device
from .kv_cache import KVCache
from .limits import ADMIT_SPARE, ARCHITECTURES, PREFILL_CHUNK, PREFILL_TOKENS, STEP_PREFILL_TOKENS
from .sampling import SampleParams
from .step import NOTHING, LayerStep, Packed, Rows, rms_norm


def supported(model: Any) -> bool:
    return getattr(model.config, "model_type", "") in ARCHITECTURES


class Runtime:
    """Prefill + decode for up to `batch` sequences at a time, each of up to `max_len` tokens. Each row of the
    batch is a slot with its own length: a sequence's keys fill its row from slot 0 and a decode step writes
    each row at its own position (`pos`, an input of the captured graphs, not a shape), so a finished row takes
    the next prompt while the others go on (continuous batching).

    The KV cache (kv_cache.KVCache): static, `max_len` slots per row (`kv_tokens` 0), or a pool of `kv_tokens`
    slots in pages: a sequence is admitted when the pool has pages for its prompt and waits (in order) until
    then, takes a page each time its answer reaches the end of its last, and where none is left the newest
    sequence gives its pages back and waits again (`stream_batch`); so the rows (graph sizes) are not bounded by
    max_len x rows of memory, nor by the answers' max_tokens.

    `moe_hook`, when given, replaces each MoE block: `moe_hook(i, h) -> h` eagerly, or in graph mode
    `moe_hook.route(i, h) -> (x, weights, idx)` inside layer i's graph and `moe_hook.experts(i, x, weights,
    idx, static=True) -> out` between graphs (the hybrid engine computes experts on the CPU there; `static`
    says the inputs are the graph's fixed output buffers).
    """

    def __init__(self, model: Any, max_len: int, device: str | torch.device, graphs: bool = True,
                 moe_hook: Callable | None = None, decode_experts: str | None = None, batch: int = 1,
                 group: Any = None, kernels: KernelConfig | None = None, prefill_tokens: int = PREFILL_TOKENS,
                 kv_tokens: int = 0, prefix_caching: bool = False):
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
        self.cache = KVCache(len(self.layers), batch, self.kv_heads, self.head_dim, max_len, dtype, self.device,
                             kv_tokens, prefix=prefix_caching)
        self.k, self.v = self.cache.k, self.cache.v
        self.arange = torch.arange(max_len, device=self.device)
        self.kernels = kernels or KernelConfig.resolve()
        reducer, lead = None, True
        if group is not None:
            from .reducer import Reducer

            reducer = Reducer(group, batch * self.cfg.hidden_size, dtype, self.device, self.kernels)
            lead = torch.distributed.get_rank(group=group) == 0
        self.reducer = reducer
        self.step = LayerStep(model, self.cache, self.kernels, self.device, reducer, lead,
                              emulated=graphs == "emulate", hybrid=moe_hook is not None)
        # static buffers for captured decode steps: each row's token, the slot it goes to and the first slot
        # its query reads
        self.tok = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self._slots = torch.zeros((2, batch), dtype=torch.long, device=self.device)
        self.pos, self.start = self._slots[0], self._slots[1]
        self._upload_slots = Upload(self._slots)
        self.step.start = self.start
        self.step.idle = (self.pos, max_len - 1)  # the scratch slot (below)
        # tokens in each row's cache, and whether the row decodes. A row that does not (free, or its prompt
        # still going in) writes and reads only the cache's last slot, which no sequence reaches: a prompt
        # holds at most max_len - 1 tokens and its answer's last token is never written (a paged cache maps
        # it to the scratch page)
        self.lengths = [0] * batch
        self.active = [False] * batch
        self.scratch = max_len - 1
        # a paged pool's pages kept free when a sequence goes in beside others (limits.ADMIT_SPARE); sequences
        # that gave their pages back for others so far (`stream_batch`)
        self.spare = int(ADMIT_SPARE * self.cache.pool_tokens / self.cache.page)
        self.preemptions = 0
        # decode steps compute the rows up to the last busy one, rounded up to one of these sizes (a graph each)
        self.sizes = [m for m in (1 << j for j in range(batch.bit_length())) if m < batch] + [batch]
        self._step_graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._layer_graphs: list[Any] = []
        self._graph_out: Any = None
        # prompt tokens one pass holds: in all, while no row decodes, and of one prompt (limits.py; `_pieces`
        # says what a pass takes, LayerStep.rows where it writes)
        self.prefill_tokens, self.step_prefill_tokens = prefill_tokens, min(STEP_PREFILL_TOKENS, prefill_tokens)
        self.prefill_chunk = PREFILL_CHUNK

    # --- the forward pass ----------------------------------------------------------------------------
    def _decode_rope_and_mask(self, pos: torch.Tensor):
        """cos/sin at each row's own position [batch, 1, head_dim], and (where the torch path reads the
        static cache through SDPA) the mask of the slots up to it."""
        cos, sin = self.model.model.rotary_emb(self.k, position_ids=pos[:, None])
        if self.step.fused:  # the attention kernel reads slots start[j]..pos[j] by itself
            return cos, sin, None
        slots, start = self.arange[None, :], self.start[:len(pos), None]
        allowed = (slots <= pos[:, None]) & (slots >= start)
        mask = torch.zeros(allowed.shape, dtype=self.k.dtype, device=self.device)
        return cos, sin, mask.masked_fill(~allowed, float("-inf"))[:, None, None]

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a decode step (ids [batch, 1], pos [batch]), or of a prompt pass's tokens at `last` (ids
        [rows, t] at positions pos [t]; LayerStep.rows says which rows of the cache they are)."""
        if self.reducer is not None:
            self.reducer.restart()
        h, ahead = self.model.model.embed_tokens(ids), NOTHING
        if last is None:
            cos, sin, mask = self._decode_rope_and_mask(pos)
        else:
            (cos, sin), mask = self.model.model.rotary_emb(self.k, position_ids=pos[None, :]), None
        for i in range(len(self.layers)):
            h, ahead = self.step.attention(i, h, ahead, pos, cos, sin, mask)
            if self.moe_hook is not None and self._is_moe(i):
                h, ahead = self.moe_hook(i, h), NOTHING
            else:
                h, ahead = self.step.mlp(i, h, ahead)
        if last is not None:  # each prompt's last token: one per row, or (packed) along the one sequence
            h = h[0, last] if isinstance(self.step.rows, Packed) else h[torch.arange(h.shape[0], device=h.device), last]
            h, ahead = h[:, None], NOTHING
        return self.model.lm_head(self.step.norm(self.model.model.norm, h, ahead))[:, -1].float()

    def _is_moe(self, i: int) -> bool:
        return hasattr(self.layers[i].mlp, "experts")

    # --- prefill and decode ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Every row free."""
        for row in range(self.batch):
            self.release(row)

    def release(self, row: int) -> None:
        """The row's sequence is done: from the next step on its row (and its pages) are free for another."""
        self.lengths[row] = 0
        self.active[row] = False
        self.cache.release(row)

    def admits(self, tokens: int, ids: list[int] | None = None) -> bool:
        """Whether a sequence of `tokens` slots (prompt `ids`: pages it would share need none) can take a row's
        pages now (beside others: leaving `spare`)."""
        return self.cache.fits(min(tokens, self.scratch), self.spare if any(self.cache.held) else 0, ids)

    def admit(self, row: int, tokens: int, ids: list[int] | None = None) -> int:
        """Row `row` takes the pages for a sequence of up to `tokens` slots (a static cache: nothing to take); with
        its prompt `ids` and prefix caching, the pages a prompt that started alike left. Returns the prompt
        tokens those hold (the prompt goes in from there)."""
        cached = self.cache.admit(row, min(tokens, self.scratch), ids)
        self.lengths[row] = cached
        return cached

    def kv_usage(self) -> float:
        """The share of the KV cache that sequences hold: a pool's pages, or a static cache's rows."""
        if self.cache.paged:
            return self.cache.usage
        return sum(1 for on, n in zip(self.active, self.lengths) if on or n) / self.batch

    def grow(self, row: int) -> bool:
        """Whether decoding row `row` holds its next slot's page, taking it if it can."""
        return self.cache.grow(row, min(self.lengths[row] + 1, self.scratch))

    @torch.inference_mode()
    def warm(self) -> None:
        """Capture the decode graphs now, not in the first request that reaches this runtime (measured: a
        DP=4 rank job served 16 concurrent requests at 790 tok/s instead of ~6000 when two of them arrived
        late and went alone to replicas whose batch-1 runtime had never run). Graph runtimes only; every
        rank of a tensor-parallel group calls it at the same point (the step has collectives)."""
        if not self.graphs or self.device.type != "cuda":
            return
        for m in ([self.batch] if self._whole_batch else self.sizes):
            self.prefill([[0]] * m)
            self.decode(torch.zeros(self.batch, dtype=torch.long, device=self.device))
        self.reset()
        if self.group is None and self.moe_hook is None:
            self.warm_prompts()

    @torch.inference_mode()
    def warm_prompts(self) -> None:
        """Run each kind of prompt pass a server runs once, so that its kernels compile now (Triton compiles a
        kernel per kind of integer argument: 1, a multiple of 16, other), not in the first requests (measured:
        the first of 32 requests at 1/s waited 3.5 s for its first token, the median 115 ms): a prompt alone,
        prompts packed, and (batch > 1) prompts going in beside a decoding row. Leaves every row free."""
        n, m = (min(k, self.max_len - 2) for k in (17, 16))  # a cache holds max_len - 1 prompt tokens
        for prompts in ([[0] * n], [[0] * m, [0] * n]) if self.batch > 1 else ([[0] * n], [[0] * m]):
            self.prefill(prompts)
        if self.batch > 1 and self.mixes:
            tokens = torch.zeros(self.batch, dtype=torch.long, device=self.device)
            for length in (n, m - 1):  # beside one decoding row: 18 tokens in the pass, then 16
                self.prefill([[0] * m])
                self.admit(1, length + 1)
                self.fill_and_decode([Filling(1, [0] * length)], tokens)
        self.reset()

    @torch.inference_mode()
    def prefill(self, ids: list[int] | list[list[int]], room: int = 1) -> torch.Tensor:
        """Prompt(s) from an empty cache: one list of ids, or up to `batch` lists (rows 0, 1, ...; the rest
        stay free), in as many passes as `fill` makes; a paged cache gives each row pages for its prompt and
        `room` more tokens (what `decode` steps may write after). Returns the logits of each prompt's last
        token [prompts, vocab]."""
        rows = ids if ids and isinstance(ids[0], list) else [ids]
        self.reset()
        filling = [Filling(r, p) for r, p in enumerate(rows)]
        self._check(filling)
        for f in filling:
            if not self.admits(len(f.ids) + room):
                raise ValueError(f"the {self.cache.pool_tokens}-token KV pool has no pages left for a sequence of "
                                 f"{len(f.ids) + room} tokens")
            self.admit(f.row, len(f.ids) + room)
        logits: list[Any] = [None] * len(rows)
        while filling:
            done, out = self.fill(filling)
            for r, row_logits in zip(done, out):
                logits[r] = row_logits
        return torch.stack(logits)

    def _check(self, filling: list["Filling"]) -> None:
        if not 0 < len(filling) <= self.batch or not all(f.ids for f in filling):
            raise ValueError(f"this runtime decodes up to {self.batch} non-empty sequence(s) at a time")
        n = max(len(f.ids) for f in filling)
        if n + 1 > self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the {self.max_len}-token cache")

    @torch.inference_mode()
    def fill(self, filling: list["Filling"]) -> tuple[list[int], torch.Tensor]:
        """One prompt pass over what of `filling` (the prompts going in, in the order they came, each into its
        free row) it holds (`_pieces`). Returns the rows whose prompts are now complete, which decode from the
        next step on, and their last tokens' logits."""
        rows, logits, _ = self._fill(filling, None)
        return rows, logits

    @property
    def mixes(self) -> bool:
        """Whether a prompt pass can carry the decoding rows' next tokens (`fill_and_decode`): one device,
        the prompt kernels (the decode rows' attention is the decode-attention kernel over the cache)."""
        return (self.kernels.mixed and self.step.fused and self.kernels.prompt and self.reducer is None
                and self.moe_hook is None)

    @torch.inference_mode()
    def fill_and_decode(self, filling: list["Filling"], tokens: torch.Tensor) -> tuple[list[int], torch.Tensor, bool]:
        """`fill` and a decode step in one pass where rows decode (vLLM's chunked prefill mixes them so: the
        weights are read once for both, where a pass and a step read them twice): each decoding row's next
        token (`tokens` [batch], as `decode` takes) goes first, then the prompts' pieces, packed. Returns the
        rows that sampled (the decoding ones, then those whose prompts are complete), their logits, and whether
        the rows decoded (False: `fill` alone ran, passes not mixing or no row decoding; the step is to come)."""
        if not (self.mixes and any(self.active)):
            rows, logits = self.fill(filling)
            return rows, logits, False
        return self._fill(filling, tokens)

    def _fill(self, filling: list["Filling"], tokens: torch.Tensor | None) -> tuple[list[int], torch.Tensor, bool]:
        """A pass of `_pieces`, carrying the decode step where `tokens` are given (`fill_and_decode`)."""
        self._use_experts(self.prefill_experts)
        self.step.decoding = False
        self.cache.upload()
        m, decoding = 0, []
        if tokens is not None:
            m = self.busy_rows()
            decoding = [r for r in range(m) if self.active[r]]
            self._advance(m)
        pieces = self._pieces(filling)
        logits = self._prompt_pass(pieces, decoding, tokens[:m] if m else None)
        for f, n in pieces:
            f.done += n
            self.lengths[f.row] = f.done
            self.cache.register(f.row, f.done)  # its whole pages, for prompts that start alike
        complete = [f for f, _ in pieces if f.done == len(f.ids)]
        for f in complete:
            self.active[f.row] = True
        filling[:] = [f for f in filling if f.done < len(f.ids)]
        return decoding + [f.row for f in complete], logits, m > 0

    def _pieces(self, filling: list["Filling"]) -> list[tuple["Filling", int]]:
        """What of `filling` the next pass takes, in order: of each prompt its next tokens, at most
        `prefill_chunk`, while the pass holds them (`prefill_tokens` of prompts, `step_prefill_tokens` while
        rows decode). One prompt at most is cut short (a long one's chunk, or the last that fits: vLLM's one
        partial prefill at a time), and the earlier slots the pieces read (a later chunk's, a prompt's cached
        pages') hold one context at most beside the first piece's."""
        budget = self.step_prefill_tokens if any(self.active) else self.prefill_tokens
        pieces, cut, before = [], False, 0
        for f in filling:
            rest = len(f.ids) - f.done
            n = min(rest, self.prefill_chunk, budget)
            if n <= 0 or n < rest and cut or pieces and before + f.done > self.max_len:
                break
            pieces.append((f, n))
            budget, cut, before = budget - n, cut or n < rest, before + f.done
        return pieces

    def _prompt_pass(self, pieces: list[tuple["Filling", int]], decoding: list[int],
                     decode: torch.Tensor | None = None) -> torch.Tensor:
        """The pieces (prompt f's tokens f.done..f.done + n) into their rows in one pass: whole prompts of one
        length as a batch [prompts, tokens], anything else packed into one sequence (LayerStep's `Packed`: no
        pad computed; a later chunk attends to its row's earlier slots too). `decode`: the next token of each
        of rows 0..m-1 (their slots set by `_advance`), packed first. Returns the logits of the `decoding`
        rows' tokens, then of the last token of each prompt the pass completes."""
        n = pieces[0][1]
        if decode is None and all(f.done == 0 and k == len(f.ids) == n for f, k in pieces):
            rows = [f.row for f, _ in pieces]
            every = rows == list(range(self.batch))
            self.step.rows = Rows(slice(None) if every else to_device(rows, self.device))
            ids = to_device([f.ids for f, _ in pieces], self.device)
            pos, last = torch.arange(n, device=self.device), torch.full((len(pieces),), n - 1, device=self.device)
        else:
            self.step.rows, ids, pos, last = self._packed(pieces, decoding, decode)
        try:
            return self._forward(ids, pos, last)
        finally:
            self.step.rows = Rows()

    def _packed(self, pieces: list[tuple["Filling", int]], decoding: list[int],
                decode: torch.Tensor | None) -> tuple[Packed, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A packed pass's addresses (decode rows first, then each piece at its slots f.done..f.done + n of its
        row), its token ids [1, tokens], their positions and the tokens whose logits it returns. What the host
        gives goes up in one copy, queued behind the kernels before (`to_device`): the ids, and a few numbers per
        piece from which the device spreads each token's row and slot."""
        m = decode.numel() if decode is not None else 0
        firsts, lengths = [f.done for f, _ in pieces], [k for _, k in pieces]
        ends = [lo + k for lo, k in zip(firsts, lengths)]
        bounds, bounds_k = [0, *accumulate(lengths)], [0, *accumulate(ends)]
        last = decoding + [m + b - 1 for (f, _), b, e in zip(pieces, bounds[1:], ends) if e == len(f.ids)]
        later = any(firsts)  # a later chunk (or cached pages): every piece's keys from its row's slot 0
        host: list[int] = []
        for f, k in pieces:
            host += f.ids[f.done:f.done + k]
        host += [f.row for f, _ in pieces] + lengths + [lo - b for lo, b in zip(firsts, bounds)] + bounds + last
        host += ends + bounds_k if later else []
        up = to_device(host, self.device)
        t, p = bounds[-1], len(pieces)
        ids, piece_rows, piece_len, shift = up[:t], up[t:t + p], up[t + p:t + 2 * p], up[t + 2 * p:t + 3 * p]
        at = t + 4 * p + 1
        cu, last_t = up[t + 3 * p:at].int(), up[at:at + len(last)]
        spread = lambda xs, n, size: torch.repeat_interleave(xs, n, output_size=size)  # noqa: E731
        rows = spread(piece_rows, piece_len, t)
        slots = torch.arange(t, device=self.device) + spread(shift, piece_len, t)  # piece p from firsts[p]
        keys = cu_k = None
        if later:
            at += len(last)
            piece_ends, cu_k, total = up[at:at + p], up[at + p:at + 2 * p + 1], bounds_k[-1]
            keys = (spread(piece_rows, piece_ends, total),
                    torch.arange(total, device=self.device) - spread(cu_k[:-1], piece_ends, total))
            cu_k = cu_k.int()
        pos = torch.cat([self.pos[:m], slots])
        packed = Packed(torch.cat([self.arange[:m], rows]), pos, cu, bounds, decode=m, start=self.start[:m],
                        keys=keys, cu_k=cu_k, bounds_k=bounds_k if later else None)
        return packed, (torch.cat([decode.view(-1), ids]) if m else ids)[None], pos, last_t

    @property
    def _whole_batch(self) -> bool:
        """Decode steps always compute every row: tensor-parallel ranks (each must take the same collectives
        whatever it sampled) and the hybrid (one graph per layer, between the CPU's experts)."""
        return self.group is not None or self.moe_hook is not None

    def busy_rows(self) -> int:
        """Rows the next decode step computes: up to the last busy one, rounded up to a captured size (a
        lone request decodes at batch 1's cost, not the batch's)."""
        if self._whole_batch:
            return self.batch
        busy = max((r + 1 for r, on in enumerate(self.active) if on), default=1)
        return next(m for m in self.sizes if m >= busy)

    @torch.inference_mode()
    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """One step for the busy rows (`busy_rows()` of them; those among them that do not decode compute on
        the scratch slot): `token` is an int (batch 1) or a tensor of a token id per row (at least that
        many), each written at its row's next slot. Returns their logits [rows, vocab]."""
        if any(on and n >= min(self.cache.slots(r), self.scratch)
               for r, (on, n) in enumerate(zip(self.active, self.lengths))):
            raise ValueError(f"a row has filled its {self.max_len}-token context or the pages it took")
        self._use_experts(self.decode_experts)
        self.step.decoding = True
        self.cache.upload()
        m = self.busy_rows()
        if isinstance(token, int):
            self.tok.fill_(token)
        else:
            self.tok[:m].copy_(token.view(-1, 1)[:m])
        self._advance(m)
        if not self.graphs:
            return self._forward(self.tok[:m], self.pos[:m])
        if self.moe_hook is None:
            return self._replay_step(m)
        return self._replay_layers()

    def _advance(self, m: int) -> None:
        """Rows 0..m-1 take a token: each decoding row's slot (pos) and first slot it reads (start) into the
        graphs' buffers, the others' the scratch slot; the decoding rows' lengths grow by one. Queued behind
        the kernels before, without waiting for them."""
        on = self.active  # rows past m never decode: their slots are the scratch slot's too
        assert not any(on[m:])
        self._upload_slots(torch.tensor([[n if a else self.scratch for n, a in zip(self.lengths, on)],
                                         [0 if a else self.scratch for a in on]]))
        self.lengths = [n + a for n, a in zip(self.lengths, self.active)]

    def _use_experts(self, name: str | None) -> None:
        if name and name != self._experts_now and hasattr(self.layers[0].mlp, "experts"):
            set_experts(self.model, name)
            self._experts_now = name

    # whole step in one graph per row count: everything on the GPU
    def _replay_step(self, m: int) -> torch.Tensor:
        if m not in self._step_graphs:
            self._step_graphs[m] = self._capture(lambda: self._forward(self.tok[:m], self.pos[:m]))
        graph, out = self._step_graphs[m]
        graph.replay()
        return out

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
            rope["cos"], rope["sin"], rope["mask"] = self._decode_rope_and_mask(self.pos)
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
        """Prompts decoded `batch` at a time, continuously (a finished row takes the next prompt); each
        sequence's tokens up to its EOS (kept) or `max_new`."""
        out: list[list[int]] = [[] for _ in prompts]
        for seq, token, _ in self.stream_batch(prompts, [max_new] * len(prompts), params, eos):
            out[seq].append(token)
        return out

    @torch.inference_mode()
    def stream_batch(self, prompts: list[list[int]], max_new: list[int], params: SampleParams, eos: set[int],
                     alive: Callable[[int], bool] | None = None,
                     join: Callable[[int], list[tuple[list[int], int]]] | None = None,
                     ) -> Iterator[Piece]:
        """Prompts decoded together, `batch` rows at a time: (sequence, token, last) as each step samples,
        sequences numbered in the order they came. A sequence ends at its EOS (yielded, last), after its own
        max_new tokens or when its row of the cache is full (last), or when `alive(sequence)` turns false
        (nothing more); its row then takes the next prompt: the prompts past the first `batch`, then what
        `join(free rows)` returns, (prompt, max_new) pairs numbered on after them (a server's requests that
        arrived meanwhile). Each step runs one prefill pass of the prompts going in (`fill`: a burst of
        prompts or a long one stalls the rows decoding one bounded pass at a time), then one decode step; with
        `KernelConfig.mixed` (one GPU) a pass of whole prompts carries the decode step's tokens too
        (`fill_and_decode`). With `KernelConfig.async_steps` a turn's pass and decode step launch before the tokens
        of the turn before are handed out (`launch`, `settle`): each sequence's tokens are the same, the
        sequences' pieces interleave differently. A paged cache admits a prompt when the pool has its pages (`admits`) and
        gives a decoding row a page as it reaches one (`room`); where the pool has none left, the newest
        sequences give theirs back and go first in line again, their prompt and tokens so far to compute
        again (vLLM's preemption by recomputation). The loop ends when no row is busy and nothing joins. The loop
        and its state: batching.ContinuousBatch."""
        yield from ContinuousBatch(self, prompts, max_new, params, eos, alive, join).run()

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
