"""Load a native plan: the engine on one GPU (or, forced, the CPU), the MoE hybrid, or this rank's share of a
tensor-parallel / replicas job."""

from __future__ import annotations

import time
from typing import Any

from qwenhw.engine.preflight import check_budgets, checkpoint_dir
from qwenhw.engine.progress import prefetch
from qwenhw.engine.torch_model import set_threads, torch_dtype

from .config import NativeConfig
from .engines import RANK_ENGINES, Engine


def load(plan: Any) -> Any:
    path = checkpoint_dir(plan)
    check_budgets(plan)
    set_threads(plan)
    prefetch(path)
    engine = Engine(plan.engine)
    if engine in RANK_ENGINES:
        return _load_rank(plan, path)
    dtype = torch_dtype(NativeConfig.of(plan).dtype)
    if engine == Engine.HYBRID:
        from .hybrid import load_hybrid

        return load_hybrid(plan, path, dtype)
    from .engine import load_one_gpu

    return load_one_gpu(plan, path, dtype)


def _load_rank(plan: Any, path: str) -> Any:
    """This rank's part of a tensor-parallel / replicas plan, inside the torchrun job (qwenhw.engine.ranks).

    Ranks [r*tp, (r+1)*tp) form replica r: with tp > 1 each holds its tensor/expert-parallel shard and
    all-reduces within the replica; replicas split each batch of prompts (qwenhw.engine.ranks.Replicas).
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenhw.engine.ranks import Replicas

    from .engine import runtime_engine
    from .sharding import load_shard, replica_group

    cfg = NativeConfig.of(plan)
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = cfg.tp
    replicas = world // tp
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(rank)
    group = replica_group(tp) if replicas > 1 and tp > 1 else dist.group.WORLD
    dtype = torch_dtype(cfg.dtype)
    start = time.perf_counter()
    stats: dict[str, Any] = {}
    if tp > 1:  # only this rank's slices are read: the whole model need not fit one GPU, nor host RAM
        model = load_shard(path, rank % tp, tp, device, dtype, cfg.experts or "ep", stats)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}).eval()
    weights_s = time.perf_counter() - start
    share = -(-int(plan.concurrency or 1) // replicas)  # the sequences one replica decodes at once
    inner = runtime_engine(model, AutoTokenizer.from_pretrained(path), plan, device, share,
                           group=group if tp > 1 else None)
    engine: Any = inner
    if replicas > 1:
        gather = dist.new_group(backend="gloo", timeout=timedelta(days=7))  # replicas wait here for the slowest
        engine = Replicas(engine, rank // tp, replicas, lead=rank % tp == 0, group=gather)
    # reported by rank 0 with its load reply (engine.info on the caller's side)
    engine.load_info = {**inner.info, "weights_s": round(weights_s, 2), "setup_s": round(time.perf_counter() - start - weights_s, 2),
                        "reduce": inner.runtime.reducer.path if inner.runtime.reducer else None,
                        **{k: round(v, 2) for k, v in stats.items() if k.endswith("_s")},
                        **({"experts": cfg.experts} if tp > 1 and cfg.experts else {})}
    return engine
