"""A ModelSpec from a local checkpoint directory: config.json plus safetensors headers.

Reads only JSON and the header bytes of each .safetensors file (8-byte little-endian length, then a JSON
header): no tensor data is loaded, and no torch/transformers import.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from typing import Any

from ..errors import BadInput
from .spec import LinearAttention, ModelSpec, MoE, Quantization

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_next", "qwen2", "qwen2_moe")
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
_EXPERT_RE = re.compile(r"\.mlp\.experts\.")  # per-expert `experts.{i}.gate_proj` and fused `experts.gate_up_proj`
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on header size


def _bad(path: str, what: str, fix: str) -> BadInput:
    return BadInput(f"Checkpoint {path}: {what}. {fix}")


# --- safetensors headers ------------------------------------------------------------------------------
def _read_header(file: str) -> dict[str, Any]:
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _bad(file, f"not a readable safetensors file ({e})",
                   "Re-download the shard (an interrupted download leaves a truncated file).") from None
    if not isinstance(header, dict):
        raise _bad(file, "safetensors header is not a JSON object", "Re-download the shard.")
    return header


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's shards: those named by model.safetensors.index.json, else every *.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise _bad(path, f"model.safetensors.index.json is malformed ({e})",
                       "Re-download it or delete it (the shards are then globbed).") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise _bad(path, f"{len(missing)} of {len(shards)} shards named by the index are missing "
                       f"(first: {missing[0]})", "Finish the download (`hf download <repo id>` resumes it).")
        return [os.path.join(path, s) for s in shards]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def _covered(file: str) -> int:
    """Bytes a shard must hold: its 8-byte length, its header and the furthest tensor its header places."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    ends = [int(info["data_offsets"][1]) for name, info in _read_header(file).items()
            if name != "__metadata__" and isinstance(info, dict) and "data_offsets" in info]
    return 8 + n + max(ends, default=0)


# Tokenizer files, any one set of which transformers' and vLLM's tokenizer loaders accept
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def problems(path: str, weights: bool = True) -> list[str]:
    """What a checkpoint directory lacks for `run`: its weights (shards whose data the files do not cover
    included) unless `weights` is false (random weights), and a tokenizer."""
    out: list[str] = []
    if weights:
        files = safetensors_files(path)  # raises for shards the index names but the directory lacks
        if not files and not glob.glob(os.path.join(path, "pytorch_model*.bin")):
            out.append("has config.json but no weights (no *.safetensors files)")
        for file in files:
            need, size = _covered(file), os.path.getsize(file)
            if size < need:
                out.append(f"shard {os.path.basename(file)} holds {size:,} bytes where its header places "
                           f"{need:,} (the download was cut short)")
    if not any(all(os.path.isfile(os.path.join(path, f)) for f in group) for group in TOKENIZER_SETS):
        out.append("has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    return out


def tensor_bytes(path: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (safetensors dtype, shape, stored bytes) for every tensor of a checkpoint directory or file."""
    files = [path] if os.path.isfile(path) else safetensors_files(path)
    out: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for file in files:
        for name, info in _read_header(file).items():
            if name == "__metadata__":
                continue
            try:
                start, end = info["data_offsets"]
                out[name] = (info["dtype"], tuple(info["shape"]), int(end) - int(start))
            except (KeyError, TypeError, ValueError):
                raise _bad(file, f"tensor {name!r} has a malformed header entry", "Re-download the shard.") from None
    return out


def weight_bytes(path: str) -> int | None:
    """Exact stored bytes of all tensors, or None when the directory has no safetensors files."""
    files = safetensors_files(path)
    if not files:
        return None
    return sum(nbytes for _, _, nbytes in tensor_bytes(path).values())


def split_weight_bytes(path: str) -> dict[str, int]:
    """Stored bytes by role: embeddings (embed_tokens, lm_head), routed experts, everything else.

    Expert scales/zeros (fp8 scale_inv, AWQ qzeros...) count with their experts.
    """
    split = {"embeddings": 0, "experts": 0, "non_expert": 0}
    for name, (_, _, nbytes) in tensor_bytes(path).items():
        if "embed_tokens" in name or name.startswith("lm_head") or ".lm_head." in name:
            split["embeddings"] += nbytes
        elif _EXPERT_RE.search(name):
            split["experts"] += nbytes
        else:
            split["non_expert"] += nbytes
    split["total"] = sum(split.values())
    return split


# --- config.json -----------------------------------------------------------------------------------
def read_config(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise _bad(path, "the directory does not exist", "Check the path, or give a catalog name such as Qwen3-8B.")
    if not os.path.isdir(path):
        raise _bad(path, "is a file, not a checkpoint directory", "Give the directory that holds config.json.")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise _bad(path, "has no config.json", "Give the directory of a Hugging Face checkpoint (config.json next "
                   "to the *.safetensors files), or download one with `hf download Qwen/<model>`.")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise _bad(path, f"config.json is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                   "Fix or re-download config.json.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, f"config.json cannot be read ({e})", "Check the file's permissions.") from None
    if not isinstance(cfg, dict):
        raise _bad(path, "config.json is not a JSON object", "Fix or re-download config.json.")
    if "text_config" in cfg and "hidden_size" not in cfg and isinstance(cfg["text_config"], dict):
        cfg = {**cfg, **cfg["text_config"]}  # multimodal wrappers keep the language model one level down
    return cfg


def _quantization(cfg: dict, path: str) -> Quantization:
    qc = cfg.get("quantization_config")
    if not qc:
        return Quantization()
    method = str(qc.get("quant_method", "")).lower()
    keep = qc.get("modules_to_not_convert") or qc.get("ignored_layers")
    extra = {"modules_not_converted": tuple(keep)} if keep else {}
    if method == "fp8":
        block = qc.get("weight_block_size") or [128, 128]
        return Quantization("fp8", 8, int(block[0]), **extra)
    if method in ("awq", "gptq"):
        return Quantization(method, int(qc.get("bits", 4)), int(qc.get("group_size", 128)), **extra)
    raise _bad(path, f"quantization method {method or '(none given)'!r} is not supported",
               "Use the bf16, FP8, AWQ or GPTQ form of the model (e.g. Qwen/Qwen3-30B-A3B-FP8).")


def _thinking(name: str, cfg: dict, path: str) -> str:
    """"none" | "thinking" | "hybrid", from the repo name and the chat template's enable_thinking switch."""
    n = name.lower()
    if "thinking" in n:
        return "thinking"
    if cfg["model_type"] in ("qwen2", "qwen2_moe") or "instruct" in n or "coder" in n:
        return "none"  # Qwen3 hybrids are named without -Instruct; 2507 / Next / Coder instructs never think
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            template = json.load(f).get("chat_template") or ""
    except (OSError, ValueError):
        return "hybrid"
    return "hybrid" if "enable_thinking" in template or not template else "none"


def from_config(cfg: dict[str, Any], *, name: str, path: str = "<config>") -> ModelSpec:
    """A ModelSpec from a parsed config.json (no files touched)."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise _bad(path, f"model_type {mt!r} is not a supported Qwen architecture",
                   f"qwenhw plans {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints; check that this is a Qwen "
                   "text model (not a vision or embedding model).")
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    moe = "num_experts_per_tok" in cfg or mt in ("qwen3_moe", "qwen3_next", "qwen2_moe")
    if moe:
        need += ["moe_intermediate_size", "num_experts_per_tok"]
    missing = [k for k in need if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
    if moe and not any(isinstance(cfg.get(k), int) for k in ("num_experts", "num_local_experts")):
        missing.append("num_experts")
    if missing:
        raise _bad(path, f"config.json lacks positive integer {', '.join(missing)}",
                   "Restore the checkpoint's original config.json (these keys come from the model's release).")

    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qwen2 = mt.startswith("qwen2")
    moe_spec = None
    if moe:
        moe_spec = MoE(
            num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts")),  # transformers 5 renamed it
            top_k=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        )
    la = None
    if mt == "qwen3_next":
        interval = cfg.get("full_attention_interval")
        types = cfg.get("layer_types")
        if not interval and types:  # newer configs may list layer types instead
            interval = types.index("full_attention") + 1 if "full_attention" in types else cfg["num_hidden_layers"]
        la = LinearAttention(
            full_attention_interval=int(interval or 4),
            num_key_heads=int(cfg.get("linear_num_key_heads", 16)),
            num_value_heads=int(cfg.get("linear_num_value_heads", 32)),
            key_head_dim=int(cfg.get("linear_key_head_dim", 128)),
            value_head_dim=int(cfg.get("linear_value_head_dim", 128)),
            conv_kernel=int(cfg.get("linear_conv_kernel_dim", 4)),
        )
    dtype = _DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").replace("torch.", ""), "bf16")
    hub = cfg.get("_name_or_path", "")
    return ModelSpec(
        name=name,
        hf_id=hub if re.fullmatch(r"[\w.-]+/[\w.-]+", str(hub)) else "",
        architecture=mt,
        hidden_size=h,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or h // heads),
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_position=int(cfg.get("max_position_embeddings") or 32768),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        moe=moe_spec,
        linear_attention=la,
        attention_bias=True if qwen2 else bool(cfg.get("attention_bias", False)),  # Qwen2 hard-codes q/k/v bias
        qk_norm=not qwen2,
        attn_output_gate=bool(cfg.get("attn_output_gate", True)) if mt == "qwen3_next" else False,
        dtype=dtype,
        quant=_quantization(cfg, path),
        thinking="hybrid",
        source="checkpoint",
    )


def from_checkpoint(path: str, *, name: str | None = None, complete: bool | None = True) -> ModelSpec:
    """ModelSpec of a local checkpoint directory, with exact `weight_bytes` from its safetensors headers.

    `complete`: True checks that `run` will find everything (weights whose shards are whole, a tokenizer);
    False checks the tokenizer only (random weights: --load-format dummy); None checks nothing.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    cfg = read_config(path)
    name = name or os.path.basename(path.rstrip(os.sep))
    spec = from_config(cfg, name=name, path=path)
    if complete is not None:
        wrong = problems(path, weights=complete)
        if wrong:
            repo = spec.hf_id or f"Qwen/{name}"
            fix = (f"Finish the download with `hf download {repo} --local-dir {path}` (it resumes and fetches "
                   f"again what is missing or short)")
            if complete and wrong == ["has config.json but no weights (no *.safetensors files)"]:
                fix += ", or run random weights from the config with --load-format dummy (for benchmarks)"
            raise _bad(path, "; ".join(wrong), fix + ".")
    wb = weight_bytes(path)
    notes = () if wb is not None else ("no *.safetensors files: weight bytes are estimated from the config",)
    return spec.with_(weight_bytes=wb, path=path, thinking=_thinking(name, cfg, path), notes=notes)
