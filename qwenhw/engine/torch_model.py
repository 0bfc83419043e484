"""Loading a transformers model for an engine: the plan's dtype, its thread count, real or random weights.

Shared by every backend that runs transformers' modules (offload, native, intel). Imports torch when called.
"""

from __future__ import annotations

import os
from typing import Any

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def set_threads(plan: Any) -> int:
    """torch's CPU threads: OMP_NUM_THREADS where the user set it, else the plan's (its host's physical
    cores), never more than this machine has."""
    import torch

    cores = os.cpu_count() or 1
    wanted = int(os.environ.get("OMP_NUM_THREADS") or plan.config.get("threads") or cores)
    threads = max(1, min(wanted, cores))
    torch.set_num_threads(threads)
    return threads


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
