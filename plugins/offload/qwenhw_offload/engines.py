"""Load an offload plan: transformers with the plan's explicit device map, the MoE hybrid, or ZeRO-3."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from qwenhw.engine.hf import HFEngine
from qwenhw.engine.preflight import check_budgets, checkpoint_dir
from qwenhw.engine.progress import prefetch
from qwenhw.engine.ranks import free_port

from .planner import RANK_ENGINES

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load(plan: Any) -> HFEngine:
    path = checkpoint_dir(plan)
    check_budgets(plan)
    import torch

    threads = min(int(plan.config.get("threads") or os.cpu_count() or 1), os.cpu_count() or 1)
    torch.set_num_threads(threads)
    prefetch(path)
    if plan.engine == "deepspeed-zero3":
        return _load_zero3(plan, path)
    if plan.engine in RANK_ENGINES:
        return _load_rank(plan, path)
    dtype = getattr(torch, TORCH_DTYPES[plan.config["dtype"]])
    if plan.engine == "hybrid-moe":
        from .hybrid import load_hybrid

        return load_hybrid(plan, path, dtype)
    if plan.engine == "transformers-fast":
        from .engine_runtime import load_fast

        return load_fast(plan, path, dtype)
    return _load_transformers(plan, path, dtype)


def _load_rank(plan: Any, path: str) -> HFEngine:
    """This rank's part of a transformers-tp / -dp plan, inside the torchrun job (qwenhw.engine.ranks).

    Ranks [r*tp, (r+1)*tp) form replica r: with tp > 1 each holds its tensor/expert-parallel shard and
    all-reduces within the replica; replicas split each batch of prompts (qwenhw.engine.ranks.Replicas).
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenhw.engine.ranks import Replicas

    from .engine_runtime import runtime_engine
    from .parallel import load_shard, replica_group

    rank, world = dist.get_rank(), dist.get_world_size()
    tp = int(plan.config.get("tp", world))
    replicas = world // tp
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(rank)
    group = replica_group(tp) if replicas > 1 and tp > 1 else dist.group.WORLD
    dtype = getattr(torch, TORCH_DTYPES[plan.config["dtype"]])
    start = time.perf_counter()
    stats: dict[str, Any] = {}
    if tp > 1:  # only this rank's slices are read: the whole model need not fit one GPU, nor host RAM
        model = load_shard(path, rank % tp, tp, device, dtype, plan.config.get("experts", "ep"), stats)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device}).eval()
    weights_s = time.perf_counter() - start
    share = -(-int(plan.concurrency or 1) // replicas)  # the sequences one replica decodes at once
    inner = runtime_engine(model, AutoTokenizer.from_pretrained(path), plan, device, share,
                           decode_experts=plan.config.get("decode_experts"), group=group if tp > 1 else None)
    engine: Any = inner
    if replicas > 1:
        gather = dist.new_group(backend="gloo", timeout=timedelta(days=7))  # replicas wait here for the slowest
        engine = Replicas(engine, rank // tp, replicas, lead=rank % tp == 0, group=gather)
    # reported by rank 0 with its load reply (engine.info on the caller's side)
    engine.load_info = {"weights_s": round(weights_s, 2), "setup_s": round(time.perf_counter() - start - weights_s, 2),
                        "reduce": inner.runtime.reducer.path if inner.runtime.reducer else None,
                        **{k: round(v, 2) for k, v in stats.items() if k.endswith("_s")},
                        **({"experts": plan.config["experts"]} if tp > 1 and "experts" in plan.config else {})}
    return engine


def pretrained(plan: Any, path: str, dtype: Any, device: str) -> Any:
    """The checkpoint's model on `device`, or, for --load-format dummy, its config's with random weights made
    there (seconds on a GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if plan.config.get("load_format") != "dummy":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device})
    config = AutoConfig.from_pretrained(path)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def device_map(plan: Any) -> dict[str, Any]:
    # accelerate wants GPU indices as ints; "cpu" and "disk" stay strings
    out: dict[str, Any] = {}
    for name, dev in plan.config["device_map"].items():
        out[name] = int(dev.split(":")[1]) if dev.startswith("cuda:") else dev
    return out


def _load_transformers(plan: Any, path: str, dtype: Any) -> HFEngine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map(plan)}
    folder = None
    if plan.config.get("offload_folder"):
        folder = tempfile.mkdtemp(prefix="qwenhw-offload-")
        kwargs["offload_folder"] = folder
    if plan.config.get("load_format") == "dummy":  # the planner allows it where one device holds everything
        model = pretrained(plan, path, dtype, str(next(iter(kwargs["device_map"].values()), "cpu")))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cleanup = (lambda: shutil.rmtree(folder, ignore_errors=True)) if folder else None
    # a plan for N concurrent sequences: a server's batches of up to N decode in one generate() call
    return HFEngine(model, tokenizer, plan=plan, device=plan.config.get("main_device"), on_close=cleanup,
                    batch=plan.concurrency)


def zero3_config(plan: Any) -> dict[str, Any]:
    """The DeepSpeed config a ZeRO-3 inference plan runs with (also emitted as deepspeed_config.json)."""
    nvme = plan.config.get("offload_device") == "nvme"
    offload: dict[str, Any] = {"device": "nvme" if nvme else "cpu", "pin_memory": not plan.config.get(
        "compute_device", "cpu").startswith("cpu")}
    if nvme:
        offload.update(nvme_path=plan.config.get("nvme_path") or "/tmp", buffer_count=5, buffer_size=int(1e8))
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": plan.config["dtype"] == "bf16"},
        "fp16": {"enabled": plan.config["dtype"] == "fp16"},
        "zero_optimization": {
            "stage": 3,
            "offload_param": offload,
            "stage3_param_persistence_threshold": 0,  # nothing stays resident: memory stays at one layer
            "stage3_max_live_parameters": int(1e8),
            "stage3_prefetch_bucket_size": int(1e7),
        },
        "wall_clock_breakdown": False,
    }


def _load_zero3(plan: Any, path: str) -> HFEngine:
    import torch

    compute = plan.config.get("compute_device", "cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if compute == "cpu" else "cuda")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1")):
        os.environ.setdefault(key, value)
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    config = zero3_config(plan)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if compute == "cpu" else "nccl", verbose=False)
    keep = HfDeepSpeedConfig(config)  # noqa: F841 - must live while from_pretrained partitions the weights
    dtype = getattr(torch, TORCH_DTYPES[plan.config["dtype"]])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    engine = deepspeed.initialize(model=model, config_params=config)[0]
    engine.module.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = HFEngine(engine.module, tokenizer, plan=plan, device=compute if compute != "cpu" else "cpu")
    result._ds_config_keepalive = keep
    return result

