"""In-process engines of the intel backend: ipex-llm low-bit (CPU or XPU), IPEX `ipex.llm.optimize`, and the
per-rank model of a DeepSpeed AutoTP or ipex-llm pipeline-parallel job (ranks.py launches those).

All of them hand a transformers model to qwenhw's HFEngine, so generation, streaming and chat are shared.
These imports need the pinned Intel stack (ci/envs/intel.sh); nothing here runs at planning time.
"""

from __future__ import annotations

import os
from typing import Any

from qwenhw.engine.hf import HFEngine
from qwenhw.engine.preflight import check_budgets, checkpoint_dir
from qwenhw.engine.progress import prefetch
from qwenhw.engine.torch_model import set_threads, torch_dtype


def _setup(plan: Any) -> str:
    path = checkpoint_dir(plan)
    for key, value in plan.config.get("env", {}).items():
        os.environ.setdefault(key, value)  # read at import time by ipex-llm / oneCCL: before the imports
    set_threads(plan)
    prefetch(path)
    return path


def load(plan: Any) -> HFEngine:
    check_budgets(plan)
    path = _setup(plan)
    if plan.engine == "ipex":
        return _load_ipex(plan, path)
    if plan.engine == "ipex-llm":
        return _load_ipex_llm(plan, path)
    raise ValueError(f"the intel backend cannot load engine {plan.engine!r} in one process")


def _load_ipex_llm(plan: Any, path: str) -> HFEngine:
    from ipex_llm.transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    cfg = plan.config
    # torch_dtype set explicitly: on the CPU ipex-llm would otherwise keep embeddings and norms in fp32
    model = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=cfg["low_bit"], optimize_model=True,
                                                 trust_remote_code=False, torch_dtype=torch_dtype(cfg["torch_dtype"]),
                                                 use_cache=True)
    device = "xpu" if cfg["device"] == "xpu" else "cpu"
    model = model.to(device).eval()
    return HFEngine(model, AutoTokenizer.from_pretrained(path), plan=plan, device=device)


def _load_ipex(plan: Any, path: str) -> HFEngine:
    import intel_extension_for_pytorch as ipex
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(plan.config["dtype"])
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
    model = ipex.llm.optimize(model, dtype=dtype, inplace=True)  # fused attention, AMX/TPP linears, traced
    return HFEngine(model, AutoTokenizer.from_pretrained(path), plan=plan, device="cpu")


def load_rank(plan: Any, rank: int, world: int) -> HFEngine:
    """This rank's share of a multi-rank plan (the process group already exists; see ranks.py)."""
    path = _setup(plan)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = plan.config
    tokenizer = AutoTokenizer.from_pretrained(path)
    if cfg.get("pp", 1) > 1:  # ipex-llm pipeline parallel: XPU only (oneCCL); every rank converts, keeps its layers
        from ipex_llm.transformers import AutoModelForCausalLM as LowBitModel

        model = LowBitModel.from_pretrained(path, load_in_low_bit=cfg["low_bit"], optimize_model=True,
                                            torch_dtype=torch_dtype(cfg["torch_dtype"]), pipeline_parallel_stages=world)
        return HFEngine(model, tokenizer, plan=plan, device=f"xpu:{rank}")
    import deepspeed

    on_xpu = cfg["device"] == "xpu"
    dtype = torch_dtype("fp16" if on_xpu else cfg["dtype"])
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=True).eval()
    # AutoTP (no kernel injection): attention heads and MLP/expert projections split, two all-reduces per layer
    model = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=dtype,
                                     replace_with_kernel_inject=False).module
    if on_xpu:  # ipex-llm low-bit on each shard, then onto this rank's card (ipex-llm's AutoTP recipe)
        from ipex_llm import optimize_model

        model = optimize_model(model.to("cpu"), low_bit=cfg["low_bit"]).to(torch.float16).to(f"xpu:{rank}")
    return HFEngine(model, tokenizer, plan=plan, device=f"xpu:{rank}" if on_xpu else "cpu")
