"""Tensor parallel attention and expert parallel MoE over transformers' Qwen3 modules, one rank per GPU.

Each rank keeps its slice of every layer, in place:
- attention: its share of the query heads and of the KV heads (q/k/v split by rows, o_proj by columns);
- MoE layers, one of two ways (`experts`); the router is replicated and every rank routes every token:
  - "ep" (expert parallel): experts [rank*E/world, (rank+1)*E/world) whole, so block-quantized experts keep
    their shape; a step waits for the rank whose experts the batch touched most;
  - "tp": every expert split by its intermediate size (gate/up by rows, down by columns), as vLLM does
    without --enable-expert-parallel: each rank reads the same share of every touched expert;
  - "replicated": every rank holds every expert (where memory allows); a decode step deals the experts the
    batch touches out to the ranks in turn (kernels/moe.py, `_dealt`), so none reads more than its share rounded up,
    where whole experts per rank wait for the rank the batch touched most. Prompts split them as "ep" does;
- dense MLPs: gate/up by rows, down by columns;
- embeddings, norms and the LM head are replicated (small next to the experts).
Row-parallel outputs (o_proj, down projections, expert sums) are all-reduced by the runtime (reducer.Reducer).
A rank's experts see the tokens routed to them; tokens routed elsewhere go to transformers' expert-parallel
sentinel slot (id >= local expert count, weight 0), which its grouped kernel skips (the fused decode kernel
skips ids outside [ep_start, ep_start + local experts) itself).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .limits import split_counts


def check(config: Any, world: int, experts: str = "ep") -> str | None:
    """Why this model's attention, and its experts held as `experts` (module docstring), cannot be split
    `world` ways, or None (on a transformers config; the planner's split_rule asks the same of a spec)."""
    if experts not in ("ep", "tp", "replicated"):
        raise ValueError(f"experts={experts!r}: expected 'ep' (whole experts per GPU), 'tp' (every expert "
                         "split) or 'replicated' (every GPU holds every expert)")
    count = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    inter = getattr(config, "moe_intermediate_size", None) or 0
    return split_counts(config.num_attention_heads, config.num_key_value_heads, count if experts == "ep" else 0,
                        world, inter if experts == "tp" else 0)


def replica_group(tp: int) -> Any:
    """This rank's group of `tp` consecutive ranks: ranks [r*tp, (r+1)*tp) form replica r.

    Every rank creates every group, in the same order (new_group is collective)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(r * tp, (r + 1) * tp))) for r in range(world // tp)]
    return groups[rank // tp]


@dataclass(frozen=True)
class Share:
    """Which experts of a routed-experts module this rank computes: ids [ep_start, ep_start + local count)
    (expert parallel), and of those, with every expert on every rank, the touched ones dealt to `rank` of
    `ranks`."""

    ep_start: int = 0
    rank: int = 0
    ranks: int = 1


# routed-experts module -> this rank's Share, kept beside the model rather than on transformers' modules
SHARES: "weakref.WeakKeyDictionary[Any, Share]" = weakref.WeakKeyDictionary()


def share_of(experts: Any) -> Share:
    return SHARES.get(experts, Share())


Cut = tuple[str, int, int]  # ("rows" | "cols" | "experts" | "gate_up" | "inner", start, stop)


def cuts(model: Any, rank: int, world: int, experts: str = "ep") -> dict[str, Cut]:
    """How this rank's shard cuts each parameter of an unsharded model (see the module docstring); the
    parameters not listed are replicated whole. Shapes only: the model may live on the meta device."""
    why = check(model.config, world, experts)
    if why:
        raise ValueError(why)
    out: dict[str, Cut] = {}
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        a = layer.self_attn
        d = a.head_dim
        heads, kv = a.q_proj.weight.shape[0] // d, a.k_proj.weight.shape[0] // d
        h_per = heads // world
        q = ("rows", rank * h_per * d, (rank + 1) * h_per * d)
        if kv >= world:
            kv_per = kv // world
            k = ("rows", rank * kv_per * d, (rank + 1) * kv_per * d)
        else:  # fewer KV heads than ranks: each rank keeps the one its query heads use (replicated)
            group = rank * kv // world
            k = ("rows", group * d, (group + 1) * d)
        for name, cut in (("q_proj", q), ("k_proj", k), ("v_proj", k)):
            out[f"{pre}self_attn.{name}.weight"] = cut
            if getattr(a, name).bias is not None:
                out[f"{pre}self_attn.{name}.bias"] = cut
        out[f"{pre}self_attn.o_proj.weight"] = ("cols", q[1], q[2])
        mlp = layer.mlp
        routed = getattr(mlp, "experts", None)
        if routed is not None and experts == "tp":  # every expert's intermediate rows; shared expert replicated
            n = routed.down_proj.shape[-1] // world
            out[f"{pre}mlp.experts.gate_up_proj"] = ("gate_up", rank * n, (rank + 1) * n)
            out[f"{pre}mlp.experts.down_proj"] = ("inner", rank * n, (rank + 1) * n)
        elif routed is not None and experts == "replicated":
            pass  # every expert on every rank (shard marks them dealt)
        elif routed is not None:  # whole experts per rank; a shared expert stays replicated
            n = routed.gate_up_proj.shape[0] // world
            for name in ("gate_up_proj", "down_proj"):
                out[f"{pre}mlp.experts.{name}"] = ("experts", rank * n, (rank + 1) * n)
        else:
            inter = mlp.gate_proj.weight.shape[0] // world
            rows = ("rows", rank * inter, (rank + 1) * inter)
            out[f"{pre}mlp.gate_proj.weight"] = out[f"{pre}mlp.up_proj.weight"] = rows
            out[f"{pre}mlp.down_proj.weight"] = ("cols", rows[1], rows[2])
    return out


def _cut(t: Any, cut: Cut) -> Any:
    """A tensor, or a safetensors slice (read only where it is cut), cut as `cut` says. "gate_up": rows
    [start, stop) of both halves of a fused [experts, 2 x inter, hidden] tensor; "inner": its last dim."""
    how, start, stop = cut
    if how == "cols":
        return t[:, start:stop]
    if how == "inner":
        return t[:, :, start:stop]
    if how == "gate_up":
        half = (t.get_shape() if hasattr(t, "get_shape") else t.shape)[1] // 2
        return torch.cat([t[:, start:stop], t[:, half + start:half + stop]], 1)
    return t[start:stop]


def shard(model: Any, rank: int, world: int, experts: str = "ep") -> dict[str, Cut]:
    """Keep this rank's slice of every layer, in place (on the meta device: the shapes only); returns the
    cuts it made. `experts`: "ep" whole experts per rank, "tp" every expert split, "replicated" all on every
    rank (module docstring)."""
    plan = cuts(model, rank, world, experts)
    params = dict(model.named_parameters())
    for name, cut in plan.items():
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr,
                nn.Parameter(_cut(params[name].data, cut).clone(), requires_grad=False))
        if attr == "gate_up_proj" and cut[0] == "experts":  # transformers' expert-parallel fields, our first expert
            module = model.get_submodule(owner)
            module.num_experts = cut[2] - cut[1]
            module._is_expert_parallel = True
            SHARES[module] = Share(ep_start=cut[1])
    if experts == "replicated":
        for layer in model.model.layers:
            routed = getattr(layer.mlp, "experts", None)
            if routed is not None:  # all experts here; each rank computes its share, the sentinel skips
                routed._is_expert_parallel = True
                SHARES[routed] = Share(rank=rank, ranks=world)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return plan


def load_shard(path: str, rank: int, world: int, device: str, dtype: torch.dtype, experts: str = "ep",
               stats: dict | None = None) -> Any:
    """This rank's shard of a checkpoint, read slice by slice from its safetensors files: no process holds
    the whole model (Qwen3-235B-A22B is 470 GB in bf16), and the GPU never holds the unsharded tensors.
    Checkpoints store the experts one by one (experts.{e}.gate_proj/up_proj/down_proj); transformers' model
    holds them fused as [experts, 2 x inter, hidden] and [experts, hidden, inter]: built here for this
    rank's experts only. `stats` gets the seconds spent reading slices and copying them to the device."""
    import json
    import time
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else type(quant).__name__
        raise ValueError(f"{path} is a quantized checkpoint ({method}); tensor-parallel ranks load bf16/fp16 "
                         "weights: point the plan at the unquantized checkpoint")
    model, plan = empty_shard(config, rank, world, device, dtype, experts)
    root = Path(path)
    index = root / "model.safetensors.index.json"
    files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.exists() \
        else sorted(root.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {key: h for h in handles for key in h.keys()}

    def missing(key: str) -> ValueError:
        return ValueError(f"the checkpoint at {path} has no tensor {key}: tensor-parallel ranks read "
                          "Qwen2/Qwen3(-MoE) checkpoints in the Hub's layout")

    spent = {} if stats is None else stats
    spent.update(read_s=0.0, copy_s=0.0, slices=0)

    def read(key: str, cut: Cut | None = None) -> torch.Tensor:
        """The tensor, or its cut; column cuts come whole (`put` cuts them on the device): a column slice
        of the file is a strided walk over every page of the matrix, which in a rank process took 9 ms
        per expert matrix against under 1 ms to read it whole (docs/benchmarks.md)."""
        if key not in where:
            raise missing(key)
        start = time.perf_counter()
        part = where[key].get_slice(key)
        out = part[:] if cut is None or cut[0] == "cols" else _cut(part, cut)
        spent["read_s"] += time.perf_counter() - start
        spent["slices"] += 1
        return out

    def put(name: str, param: torch.Tensor, value: torch.Tensor, cut: Cut | None = None) -> None:
        start = time.perf_counter()
        if cut is not None and cut[0] == "cols" and value.shape[0] == param.shape[0]:
            value = _cut(value.to(param.device), cut)
        if value.shape != param.shape:
            raise ValueError(f"{name}: the checkpoint gives {tuple(value.shape)}, the shard holds "
                             f"{tuple(param.shape)}")
        param.copy_(value)
        spent["copy_s"] += time.perf_counter() - start

    with torch.no_grad():
        for name, param in model.named_parameters():
            cut = plan.get(name)
            if name in where:
                put(name, param, read(name, cut), cut)
            elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                stem, kind = name.rsplit(".", 1)
                lo = cut[1] if cut and cut[0] == "experts" else 0
                inner = cut if cut and cut[0] in ("gate_up", "inner") else None  # each expert's slice (tp)
                rows = ("rows", inner[1], inner[2]) if inner else None
                cols = ("cols", inner[1], inner[2]) if inner else None
                for j in range(param.shape[0]):  # each expert's matrices straight into its slot on the device
                    e = f"{stem}.{lo + j}"
                    if kind == "gate_up_proj":
                        half = param.shape[1] // 2
                        put(f"{e}.gate_proj.weight", param[j, :half], read(f"{e}.gate_proj.weight", rows))
                        put(f"{e}.up_proj.weight", param[j, half:], read(f"{e}.up_proj.weight", rows))
                    else:
                        put(f"{e}.down_proj.weight", param[j], read(f"{e}.down_proj.weight", cols), cols)
            else:
                raise missing(name)
    return model.eval()


def empty_shard(config: Any, rank: int, world: int, device: str, dtype: torch.dtype,
                experts: str = "ep") -> tuple[Any, dict[str, Cut]]:
    """This rank's shard of a model of `config`, allocated on `device` with its weights unset (built on the
    meta device: the whole model is never materialised), and the cuts that shaped it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plan = shard(model, rank, world, experts)
    model.to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for module in model.modules():  # non-persistent buffers (rotary inverse frequencies) were left empty
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config).to(device)
            for key, buf in fresh.named_buffers(recurse=False):
                setattr(module, key, buf)
    return model, plan


def expert_parallel_moe(mlp: Any, x: torch.Tensor, route: Any = None) -> torch.Tensor:
    """This rank's share of an MoE block: its local experts' contributions (the runtime sums ranks).
    `route(gate, flat) -> (weights, ids)` replaces the router's own forward (the fused decode kernel)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if route is not None:
        weights, idx = route(mlp.gate, flat)
    else:
        _, weights, idx = mlp.gate(flat)
    experts = mlp.experts
    share = share_of(experts)
    local = idx - share.ep_start  # 0 with experts split by their intermediate size (all local)
    mine = (local >= 0) & (local < experts.num_experts)
    rank, ranks = share.rank, share.ranks
    if ranks > 1:  # every rank holds every expert: prompts split them as expert parallelism does
        mine &= idx * ranks // experts.num_experts == rank
    local = torch.where(mine, local, torch.full_like(local, experts.num_experts))  # the sentinel slot
    weights = weights * mine.to(weights.dtype)
    return experts(flat, local, weights).view(shape)
