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
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import rms_norm


class OffloadedExperts(nn.Module):
    """Stands where the experts were, so `model.to(gpu)` leaves their weights in host RAM."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - the hybrid hook runs instead
        raise RuntimeError("routed experts are offloaded: run this model through the qwenhw hybrid runtime")


class HybridMoE:
    def __init__(self, model: Any, device: str, cache_bytes: int = 0, prefill_threshold: int = 32,
                 policy: str = "static", refresh: int = 64, cpu_workers: int = 1):
        self.model = model
        self.device = torch.device(device)
        self.layers = model.model.layers
        self.prefill_threshold = prefill_threshold
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
        # one GPU copy of a layer's experts for prefill, run by transformers' own experts implementation
        self.stage = copy.copy(template)
        self.stage._parameters = {}
        self.stage.gate_up_proj = nn.Parameter(torch.empty_like(first[0], device=self.device), requires_grad=False)
        self.stage.down_proj = nn.Parameter(torch.empty_like(first[1], device=self.device), requires_grad=False)
        self.resize_cache(cache_bytes)
        self.counts = torch.zeros((len(self.layers), self.num_experts), dtype=torch.long)
        self.steps = 0
        self.stats = {"cpu_experts": 0, "gpu_experts": 0, "streamed_layers": 0}
        self._host_bufs: dict = {}
        self.pool = None
        self.cores = torch.get_num_threads()
        self.set_workers(cpu_workers)

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

    def set_workers(self, workers: int) -> None:
        """Compute a token's CPU experts on `workers` threads, each with a share of the cores (1 = inline)."""
        if self.pool is not None:
            self.pool.shutdown()
        self.pool = None
        if workers > 1:
            self.pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                           initargs=(max(1, self.cores // workers),))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        for ptr in self.registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self.registered.clear()
        self.cpu.clear()

    def resize_cache(self, cache_bytes: int) -> None:
        """(Re)allocate the GPU expert cache: as many whole experts as `cache_bytes` holds."""
        first = next(iter(self.cpu.values()))
        slots = min(int(cache_bytes // self.expert_bytes), self.num_experts * len(self.cpu))
        self.cache_gu = self.cache_dn = None
        self.cache_gu = torch.empty((slots, *first[0].shape[1:]), dtype=first[0].dtype, device=self.device)
        self.cache_dn = torch.empty((slots, *first[1].shape[1:]), dtype=first[1].dtype, device=self.device)
        self.slot_of: dict[tuple[int, int], int] = {}

    @property
    def slots(self) -> int:
        return self.cache_gu.shape[0]

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
            self.cache_gu[slot].copy_(self.cpu[i][0][e], non_blocking=True)
            self.cache_dn[slot].copy_(self.cpu[i][1][e], non_blocking=True)
            keep[pair] = slot
        self.slot_of = keep

    # --- the MoE block -----------------------------------------------------------------------------------
    def route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm and router on the GPU (captured into the layer's graph in decode)."""
        layer = self.layers[i]
        x = rms_norm(layer.post_attention_layernorm, h)
        flat = x.reshape(-1, x.shape[-1])
        _, weights, idx = layer.mlp.gate(flat)
        return flat, weights, idx

    def experts(self, i: int, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if flat.shape[0] >= self.prefill_threshold:
            return self._streamed(i, flat, idx, weights)
        return self._split(i, flat, idx, weights)

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return h + self.experts(i, *self.route(i, h)).view_as(h)

    def _streamed(self, i: int, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.stats["streamed_layers"] += 1
        self.stage.gate_up_proj.data.copy_(self.cpu[i][0], non_blocking=True)
        self.stage.down_proj.data.copy_(self.cpu[i][1], non_blocking=True)
        self._count(i, idx.cpu())
        return self.stage(flat, idx, weights)

    def _to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Copy to pinned host buffers asynchronously, then wait once (one sync per layer, not three)."""
        if self.device.type != "cuda":
            return list(tensors)
        out = []
        for n, t in enumerate(tensors):
            buf = self._host_bufs.get((n, t.shape, t.dtype))
            if buf is None:
                buf = self._host_bufs[(n, t.shape, t.dtype)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            out.append(buf)
        torch.cuda.current_stream().synchronize()
        return out

    def _split(self, i: int, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        idx_c, x_c, w_c = self._to_host(idx, flat, weights)
        self._count(i, idx_c)
        gu_c, dn_c = self.cpu[i]
        out_gpu = None
        cpu_jobs = []  # (expert, tokens, k-slots)
        # ascending expert order, accumulated in the model dtype, as transformers' eager experts do
        for e in torch.unique(idx_c).tolist():
            tokens, ks = torch.where(idx_c == e)
            slot = self.slot_of.get((i, e))
            if slot is None:
                cpu_jobs.append((e, tokens, ks))
                continue
            self.stats["gpu_experts"] += 1  # launched now: runs on the GPU while the CPU works below
            t_gpu, k_gpu = tokens.to(self.device, non_blocking=True), ks.to(self.device, non_blocking=True)
            y = self._expert(flat[t_gpu], self.cache_gu[slot], self.cache_dn[slot]) * weights[t_gpu, k_gpu, None]
            out_gpu = torch.zeros_like(flat).index_add_(0, t_gpu, y) if out_gpu is None else out_gpu.index_add_(0, t_gpu, y)
        self._maybe_refresh()
        if not cpu_jobs:
            return out_gpu if out_gpu is not None else torch.zeros_like(flat)
        self.stats["cpu_experts"] += len(cpu_jobs)
        work = [lambda e=e, t=t: self._expert(x_c[t], gu_c[e], dn_c[e]) for e, t, _ in cpu_jobs]
        ys = list(self.pool.map(lambda f: f(), work)) if self.pool else [f() for f in work]
        out_cpu = torch.zeros_like(x_c)
        for (e, tokens, ks), y in zip(cpu_jobs, ys):
            out_cpu.index_add_(0, tokens, y * w_c[tokens, ks, None])
        out = out_cpu.to(self.device, non_blocking=self.device.type == "cuda")
        return out if out_gpu is None else out_gpu + out

    def _expert(self, x: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and not x.is_cuda:
            # one token on the CPU: matrix-vector products stream the weights ~1.4x faster than
            # F.linear, which hands oneDNN a weight layout it reorders on every call
            gate, up = torch.mv(gu, x[0]).chunk(2)
            return torch.mv(dn, self.act(gate) * up)[None]
        gate, up = F.linear(x, gu).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, dn)

    def _count(self, i: int, idx_c: torch.Tensor) -> None:
        self.counts[i] += torch.bincount(idx_c.reshape(-1), minlength=self.num_experts)

    def _maybe_refresh(self) -> None:
        if self.policy != "dynamic":
            return
        self.steps += 1
        if self.steps % (self.refresh * len(self.cpu)) == 0:
            self.place_cache()


def load_hybrid(plan: Any, path: str, dtype: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": "cpu"})
    return build_hybrid(model, AutoTokenizer.from_pretrained(path), plan)


def build_hybrid(model: Any, tokenizer: Any, plan: Any):
    """Experts pinned in host RAM, the rest on the plan's device, the lean runtime on top."""
    from .engine_runtime import RuntimeEngine
    from .runtime import Runtime, supported

    device = plan.config.get("main_device", "cpu")
    model.eval()
    if not supported(model):
        raise ValueError(f"the hybrid runtime supports Qwen3-MoE models, not {model.config.model_type}")
    threads = int(plan.config.get("threads") or os.cpu_count() or 1)
    torch.set_num_threads(min(threads, os.cpu_count() or threads))
    hybrid = HybridMoE(model, device, cache_bytes=int(plan.config.get("expert_cache_bytes", 0)),
                       prefill_threshold=int(plan.config.get("prefill_threshold", 32)),
                       policy=plan.config.get("cache_policy", "static"),
                       cpu_workers=int(plan.config.get("cpu_expert_workers", 1)))
    model.to(device)
    runtime = Runtime(model, max_len=int(plan.context or 4096), device=device,
                      graphs=plan.config.get("cuda_graphs", True), moe_hook=hybrid,
                      decode_experts=plan.config.get("decode_experts"))
    engine = RuntimeEngine(model, tokenizer, runtime, plan=plan)
    engine.hybrid = hybrid
    calibration = plan.config.get("calibration_prompt")
    if hybrid.slots and calibration:
        engine.calibrate(calibration)
    elif hybrid.slots:
        hybrid.place_cache()  # no routing seen yet: cache in layer order
    return engine
