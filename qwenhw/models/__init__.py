"""Qwen model specs: the offline catalog, local checkpoints, the hub cache, and memory arithmetic.

Light to import: no torch, no transformers; huggingface_hub only inside the cache look-ups.
"""

from .catalog import get, names
from .checkpoint import from_checkpoint, split_weight_bytes, tensor_bytes
from .memory import (
    GiB,
    WeightBytes,
    active_bytes_per_token,
    expert_bytes,
    kv_bytes_per_token,
    linear_state_bytes_per_seq,
    weight_bytes_split,
)
from .resolve import find_local_weights, missing_weights_message, resolve_model
from .spec import LinearAttention, ModelSpec, MoE, Quantization

__all__ = [
    "GiB", "LinearAttention", "ModelSpec", "MoE", "Quantization", "WeightBytes",
    "active_bytes_per_token", "expert_bytes", "find_local_weights", "from_checkpoint", "get",
    "kv_bytes_per_token", "linear_state_bytes_per_seq", "missing_weights_message", "names", "resolve_model",
    "split_weight_bytes", "tensor_bytes", "weight_bytes_split",
]
