"""MoE hybrid execution: routed experts live in host RAM and are computed by the CPU during decode.

Attention, norms, router, embeddings and the KV cache stay on the GPU (llama.cpp's `-ot exps=CPU`,
KTransformers). Per MoE layer and decode step only the top-k selected experts are touched: the hidden state
(a few KiB) crosses PCIe twice instead of the experts' weights. Three refinements:
- a GPU expert cache holds the most-used experts in the GPU memory the plan leaves free; the cached experts
  of a token run on the GPU while the CPU computes the rest;
- placement is static (routing counts from a calibration prompt) or dynamic (re-ranked every N tokens);
- batches of at least `prefill_threshold` tokens ship the layer's expert weights to the GPU over pinned
  memory instead (at prefill sizes the GPU's FLOPs win over the CPU's).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_moe
from .config import KernelConfig, NativeConfig
from .kernels import common, router
from .graphs import capture
from .limits import PREFILL_THRESHOLD
from .step import rms_norm


CACHE_MAX_PAIRS = 16  # (token, expert) pairs per call the GPU cache serves: decode of 1-2 sequences


class OffloadedExperts(nn.Module):
    """Stands where the experts were, so `model.to(gpu)` leaves their weights in host RAM."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - the hybrid hook runs instead
        raise RuntimeError("routed experts are offloaded: run this model through the qwenhw hybrid runtime")


class HybridMoE:
    def __init__(self, model: Any, device: str, cache_bytes: int = 0, prefill_threshold: int = PREFILL_THRESHOLD,
                 policy: str = "static", refresh: int = 64, cpu_kernel: str = "fused",
                 kernels: KernelConfig | None = None):
        kernels = kernels or KernelConfig.resolve()
        self.model = model
        self.device = torch.device(device)
        self.layers = model.model.layers
        self.prefill_threshold = prefill_threshold
        self.fused_route = kernels.triton and common.available(self.device)  # the router in one Triton kernel
        self.pdl = self.fused_route and kernels.pdl and common.pdl_supported(self.device)
        self.kernels = kernels
        self.policy = policy
        self.refresh = refresh
        pin = self.device.type == "cuda"
        self.registered: list[int] = []
        self.cpu: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        template = None
        for i, layer in enumerate(self.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None or isinstance(experts, OffloadedExperts):
                continue
            self.cpu[i] = (self._host(experts.gate_up_proj.data, pin), self._host(experts.down_proj.data, pin))
            if template is None:
                template = experts
            layer.mlp.experts = OffloadedExperts(i)
        if template is None:
            raise ValueError("the model has no routed experts: the hybrid engine is for MoE models")
        first = next(iter(self.cpu.values()))
        self.num_experts = first[0].shape[0]
        self.expert_bytes = (first[0][0].numel() + first[1][0].numel()) * first[0].element_size()
        self.act = template.act_fn
        # one GPU copy of a layer's experts for prefill, and the expert cache, both run by transformers' own
        # experts implementation (the stage and cache hold no reference to the checkpoint's GPU weights)
        self.stage = self._experts_module(template, torch.empty_like(first[0], device=self.device),
                                          torch.empty_like(first[1], device=self.device))
        self._host_bufs: dict = {}
        self._graphs: dict = {}
        self._graph_pool = None
        self.set_kernel(cpu_kernel)
        self.counts = torch.zeros((len(self.layers), self.num_experts), dtype=torch.long)
        # per layer: which experts the GPU cache holds (host mask for the CPU side, slot table for the GPU)
        self.skip = torch.zeros((len(self.layers), self.num_experts), dtype=torch.uint8)
        self.table = torch.full((len(self.layers), self.num_experts), -1, dtype=torch.long, device=self.device)
        self.resize_cache(cache_bytes)
        self.steps = 0
        self.stats = {"cpu_experts": 0, "gpu_experts": 0, "streamed_layers": 0}
        self.threads: dict = {}  # the thread count calibration (fit_threads)

    @staticmethod
    def _experts_module(template: nn.Module, gate_up: torch.Tensor, down: torch.Tensor,
                        implementation: str | None = None) -> nn.Module:
        module = copy.copy(template)
        module._parameters = {}
        if implementation:  # its own config: the model's setting stays as it is
            module.config = copy.copy(template.config)
            module.config._experts_implementation = implementation
        module.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        module.down_proj = nn.Parameter(down, requires_grad=False)
        module.num_experts = gate_up.shape[0]
        return module

    def _host(self, t: torch.Tensor, pin: bool) -> torch.Tensor:
        """A host-RAM copy of `t`, page-locked in place when a GPU is used.

        cudaHostRegister pins our own allocation without a second copy and without the caching host
        allocator's power-of-two rounding (which would turn 54 GiB of experts into 72 GiB).
        """
        if not pin:
            return t.contiguous()
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        host.copy_(t)  # also detaches from a memory-mapped checkpoint file
        rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
        if int(getattr(rc, "value", rc)) != 0:
            return host.pin_memory()
        self.registered.append(host.data_ptr())
        return host

    def set_kernel(self, name: str) -> None:
        """"fused": the C kernel (cpu_moe.c) where it builds; "torch": one torch GEMV per expert matrix."""
        if name == "fused" and not self.kernels.cpu_kernel:
            name, why = "torch", "the CPU kernel is switched off (KernelConfig.cpu_kernel)"
        else:
            why = cpu_moe.usable(*next(iter(self.cpu.values()))) if name == "fused" else "asked for torch GEMVs"
        self.fused = not why
        self.cpu_kernel = "fused" if self.fused else f"torch ({why})"

    def fit_threads(self) -> dict:
        """Run the CPU experts (and torch's CPU ops) at the thread count, up to torch's current one, that
        times fastest here (cpu_moe.fastest_threads); returns its timings ({} without the kernel)."""
        if self.fused:
            self.threads = cpu_moe.fastest_threads(*next(iter(self.cpu.values())), torch.get_num_threads())
            torch.set_num_threads(self.threads["threads"])
        return self.threads

    def close(self) -> None:
        for ptr in self.registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self.registered.clear()
        self.cpu.clear()
        self._graphs.clear()

    def resize_cache(self, cache_bytes: int) -> None:
        """(Re)allocate the GPU expert cache: as many whole experts as `cache_bytes` holds."""
        first = next(iter(self.cpu.values()))
        slots = min(int(cache_bytes // self.expert_bytes), self.num_experts * len(self.cpu))
        self.cache = None
        self._graphs.clear()
        gate_up = torch.empty((slots, *first[0].shape[1:]), dtype=first[0].dtype, device=self.device)
        down = torch.empty((slots, *first[1].shape[1:]), dtype=first[1].dtype, device=self.device)
        # batched_mm: it gathers the T*k selected slots, capturable and fine at decode sizes; grouped_mm
        # takes at most 1024 groups, and a cache holds thousands of experts
        self.cache = self._experts_module(self.stage, gate_up, down, implementation="batched_mm")
        self.slot_of: dict[tuple[int, int], int] = {}
        self._publish()

    @property
    def slots(self) -> int:
        return self.cache.gate_up_proj.shape[0]

    # --- cache placement ---------------------------------------------------------------------------------
    def place_cache(self, counts: torch.Tensor | None = None) -> None:
        """Fill the cache with the most-routed (layer, expert) pairs (ties broken by layer order)."""
        if not self.slots:
            return
        counts = self.counts if counts is None else counts
        pairs = [(int(counts[i, e]), -i, -e) for i in self.cpu for e in range(self.num_experts)]
        pairs.sort(reverse=True)
        wanted = [(-i, -e) for _, i, e in pairs[: self.slots]]
        keep = {p: s for p, s in self.slot_of.items() if p in set(wanted)}
        free = [s for s in range(self.slots) if s not in keep.values()]
        for pair in wanted:
            if pair in keep:
                continue
            slot = free.pop()
            i, e = pair
            self.cache.gate_up_proj.data[slot].copy_(self.cpu[i][0][e], non_blocking=True)
            self.cache.down_proj.data[slot].copy_(self.cpu[i][1][e], non_blocking=True)
            keep[pair] = slot
        self.slot_of = keep
        self._publish()

    def _publish(self) -> None:
        """Write the placement into the mask and table, in place: captured graphs read them at replay."""
        table = torch.full(tuple(self.table.shape), -1, dtype=torch.long)
        for (i, e), slot in self.slot_of.items():
            table[i, e] = slot
        self.table.copy_(table)
        self.skip.copy_(table >= 0)

    # --- the MoE block -----------------------------------------------------------------------------------
    def route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm and router on the GPU (captured into the layer's graph in decode)."""
        layer = self.layers[i]
        x = rms_norm(layer.post_attention_layernorm, h)
        flat = x.reshape(-1, x.shape[-1])
        if self.fused_route:
            weights, idx = router.gate_route(layer.mlp.gate, flat, pdl=self.pdl)
        else:
            _, weights, idx = layer.mlp.gate(flat)
        return flat, weights, idx

    def experts(self, i: int, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                static: bool = False) -> torch.Tensor:
        """`static`: the inputs are a captured graph's outputs, so the cache's GPU work may be a graph too."""
        if flat.shape[0] >= self.prefill_threshold:
            return self._streamed(i, flat, idx, weights)
        return self._split(i, flat, idx, weights, static)

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return h + self.experts(i, *self.route(i, h)).view_as(h)

    def _streamed(self, i: int, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.stats["streamed_layers"] += 1
        self.stage.gate_up_proj.data.copy_(self.cpu[i][0], non_blocking=True)
        self.stage.down_proj.data.copy_(self.cpu[i][1], non_blocking=True)
        self.counts[i] += torch.bincount(idx.reshape(-1).cpu(), minlength=self.num_experts)
        return self.stage(flat, idx, weights)

    def _buf(self, key: Any, like: torch.Tensor, pinned: bool) -> torch.Tensor:
        buf = self._host_bufs.get((key, like.shape, like.dtype))
        if buf is None:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=pinned)
            self._host_bufs[(key, like.shape, like.dtype)] = buf
        return buf

    def _to_host(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        """Start copies to pinned host buffers; returns them and an event that marks their completion."""
        if self.device.type != "cuda":
            return list(tensors), None
        out = []
        for n, t in enumerate(tensors):
            buf = self._buf(n, t, pinned=True)
            buf.copy_(t, non_blocking=True)
            out.append(buf)
        done = torch.cuda.Event()
        done.record()
        return out, done

    def _cached(self, i: int, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                static: bool) -> torch.Tensor:
        """The GPU cache's share: experts not cached get weight 0 (their slot is a stand-in).

        No host round trip: the slot table lives on the GPU, so in decode this is one graph per layer,
        launched before the CPU starts and run while it works.
        """
        def run():
            slot = self.table[i][idx]
            return self.cache(flat, slot.clamp(min=0), weights * (slot >= 0))

        if not (static and self.device.type == "cuda"):
            return run()
        key = (i, flat.data_ptr(), flat.shape[0])
        if key not in self._graphs:
            if self._graph_pool is None:  # the layers' cache graphs replay one at a time: one shared pool
                self._graph_pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = capture(run, self._graph_pool)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _split(self, i: int, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
               static: bool = False) -> torch.Tensor:
        (idx_c, x_c, w_c), copied = self._to_host(idx, flat, weights)
        # the cache's batched_mm gathers one expert matrix per (token, k) pair: decode-sized calls only (a
        # 31-token prompt gathered 248 experts, 2.2 GiB); larger calls leave every expert to the CPU kernel
        use_cache = bool(self.slots) and idx.numel() <= CACHE_MAX_PAIRS
        out_gpu = self._cached(i, flat, idx, weights, static) if use_cache else None
        if copied is not None:
            copied.synchronize()  # the inputs are on the host; the cache's graph may still be running
        out_c = self._buf("out", x_c, pinned=self.device.type == "cuda")
        if self.fused and x_c.shape[0] <= cpu_moe.MAX_TOKENS:  # a prefill threshold set above it: torch
            hits = cpu_moe.moe_experts(*self.cpu[i], x_c, idx_c, w_c, out_c,
                                       skip=self.skip[i] if use_cache else None, counts=self.counts[i])
        else:
            hits = self._torch_experts(i, x_c, idx_c, w_c, out_c, use_cache)
        self.stats["gpu_experts"] += hits
        self.stats["cpu_experts"] += idx_c.numel() - hits
        self._maybe_refresh()
        out = out_c.to(self.device, non_blocking=True) if self.device.type == "cuda" else out_c.clone()
        return out if out_gpu is None else out + out_gpu

    def _torch_experts(self, i: int, x_c: torch.Tensor, idx_c: torch.Tensor, w_c: torch.Tensor,
                       out_c: torch.Tensor, use_cache: bool) -> int:
        """The fallback: per-expert torch GEMVs, accumulated in ascending expert order as transformers does."""
        self.counts[i] += torch.bincount(idx_c.reshape(-1), minlength=self.num_experts)
        gu_c, dn_c = self.cpu[i]
        out_c.zero_()
        hits = 0
        for e in torch.unique(idx_c).tolist():
            tokens, ks = torch.where(idx_c == e)
            if use_cache and self.skip[i, e]:
                hits += len(tokens)
                continue
            y = self._expert(x_c[tokens], gu_c[e], dn_c[e])
            out_c.index_add_(0, tokens, y * w_c[tokens, ks, None])
        return hits

    def _expert(self, x: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            # one token: matrix-vector products stream the weights ~1.4x faster than F.linear, which
            # hands oneDNN a weight layout it reorders on every call
            gate, up = torch.mv(gu, x[0]).chunk(2)
            return torch.mv(dn, self.act(gate) * up)[None]
        gate, up = F.linear(x, gu).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, dn)

    def _maybe_refresh(self) -> None:
        if self.policy != "dynamic":
            return
        self.steps += 1
        if self.steps % (self.refresh * len(self.cpu)) == 0:
            self.place_cache()


def load_hybrid(plan: Any, path: str, dtype: Any):
    from transformers import AutoTokenizer

    from qwenhw.engine.torch_model import pretrained

    model = pretrained(plan, path, dtype, "cpu")  # the experts stay in host RAM; the rest moves to the GPU
    return build_hybrid(model, AutoTokenizer.from_pretrained(path), plan)


def build_hybrid(model: Any, tokenizer: Any, plan: Any):
    """Experts pinned in host RAM, the rest on the plan's device, the runtime on top."""
    from .engine import RuntimeEngine
    from .runtime import Runtime, supported

    cfg = NativeConfig.of(plan)
    kernels = cfg.kernel_config()
    model.eval()
    if not supported(model):
        raise ValueError(f"the hybrid engine runs Qwen3-MoE models, not {model.config.model_type}")
    hybrid = HybridMoE(model, cfg.main_device, cache_bytes=int(cfg.expert_cache_bytes),
                       prefill_threshold=int(cfg.prefill_threshold), policy=cfg.cache_policy,
                       cpu_kernel=cfg.cpu_kernel, kernels=kernels)
    hybrid.fit_threads()  # the plan's thread count (set at load) is an upper bound
    model.to(cfg.main_device)
    runtime = Runtime(model, max_len=int(plan.context), device=cfg.main_device, graphs=cfg.cuda_graphs,
                      moe_hook=hybrid, decode_experts=cfg.decode_experts, kernels=kernels)
    engine = RuntimeEngine(model, tokenizer, runtime, plan=plan)
    engine.hybrid = hybrid
    calibration = cfg.calibration_prompt
    if hybrid.slots and calibration:
        engine.calibrate(calibration)
    elif hybrid.slots:
        hybrid.place_cache()  # no routing seen yet: cache in layer order
    return engine
