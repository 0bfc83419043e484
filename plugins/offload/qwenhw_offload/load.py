"""Load an offload plan: transformers with the plan's explicit device map, or DeepSpeed ZeRO-3."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from qwenhw.engine.hf import HFEngine
from qwenhw.engine.preflight import check_budgets, checkpoint_dir
from qwenhw.engine.progress import prefetch
from qwenhw.engine.ranks import free_port
from qwenhw.engine.torch_model import pretrained, set_threads, torch_dtype

from .engines import Engine


def load(plan: Any) -> HFEngine:
    path = checkpoint_dir(plan)
    check_budgets(plan)
    set_threads(plan)
    prefetch(path)
    if Engine(plan.engine) == Engine.DEEPSPEED_ZERO3:
        return _load_zero3(plan, path)
    return _load_transformers(plan, path, torch_dtype(plan.config["dtype"]))


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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(plan.config["dtype"]))
    engine = deepspeed.initialize(model=model, config_params=config)[0]
    engine.module.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = HFEngine(engine.module, tokenizer, plan=plan, device=compute if compute != "cpu" else "cpu")
    result._ds_config_keepalive = keep
    return result

