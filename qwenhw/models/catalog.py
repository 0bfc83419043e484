"""The built-in offline catalog: Qwen models as their config.json files state them. Pure data.

Shapes were checked against the published config.json files and safetensors index totals (see
KNOWN_CHECKPOINT_BYTES and tests/test_models.py). Quantized repos (FP8, AWQ, GPTQ) share the shape of
their parent, except where Qwen padded it (Qwen2.5-72B int4 forms: intermediate 29568 -> 29696 so that
TP=8 splits whole 128-groups).
"""

from __future__ import annotations

import difflib

from ..errors import BadInput
from .spec import LinearAttention, ModelSpec, MoE, Quantization

FP8 = Quantization("fp8", 8, 128)  # 128x128 blocks in e4m3 + one fp32 scale_inv per block
AWQ = Quantization("awq", 4, 128)
GPTQ_INT4 = Quantization("gptq", 4, 128)

QWEN3_VOCAB = 151936
QWEN25_VOCAB = 152064  # Qwen2.5 7B and larger pad the vocab further than Qwen3

# bf16 bytes that the official checkpoints' model.safetensors.index.json declare ("total_size").
# Every one equals 2 x ModelSpec.total_params() exactly; the tests hold the catalog to them.
KNOWN_CHECKPOINT_BYTES: dict[str, int] = {
    "Qwen3-4B": 8_044_936_192,
    "Qwen3-8B": 16_381_470_720,
    "Qwen3-14B": 29_536_614_400,
    "Qwen3-32B": 65_524_246_528,
    "Qwen3-Coder-30B-A3B-Instruct": 61_064_245_248,
    "Qwen2.5-7B-Instruct": 15_231_233_024,
    "Qwen2.5-14B-Instruct": 29_540_067_328,
    "Qwen2.5-32B-Instruct": 65_527_752_704,
}

# Totals (and active counts) in billions as the model cards state them: what `total_params()` must match.
PUBLISHED_PARAMS_B: dict[str, tuple[float, float | None]] = {
    "Qwen3-0.6B": (0.6, None),
    "Qwen3-4B": (4.0, None),
    "Qwen3-8B": (8.2, None),
    "Qwen3-14B": (14.8, None),
    "Qwen3-32B": (32.8, None),
    "Qwen3-30B-A3B": (30.5, 3.3),
    "Qwen3-30B-A3B-Instruct-2507": (30.5, 3.3),
    "Qwen3-Coder-30B-A3B-Instruct": (30.5, 3.3),
    "Qwen3-235B-A22B": (235.0, 22.0),
    "Qwen3-Coder-480B-A35B-Instruct": (480.0, 35.0),
    "Qwen3-Next-80B-A3B-Instruct": (80.0, None),  # "A3B" is loose: 3.87B active by the config
    "Qwen2.5-7B-Instruct": (7.61, None),
    "Qwen2.5-14B-Instruct": (14.7, None),
    "Qwen2.5-32B-Instruct": (32.5, None),
    "Qwen2.5-72B-Instruct": (72.7, None),
}

_CATALOG: dict[str, ModelSpec] = {}


def _add(name: str, **fields) -> ModelSpec:
    spec = ModelSpec(name=name, hf_id=f"Qwen/{name}", **fields)
    _CATALOG[name] = spec
    return spec


def _variants(name: str, base: dict, quants: dict[str, tuple[Quantization, dict]]) -> None:
    """Add `name` and its quantized repos (suffix -> (quantization, field overrides))."""
    _add(name, **base)
    for suffix, (quant, overrides) in quants.items():
        _add(f"{name}-{suffix}", **{**base, "quant": quant, **overrides})


_FP8 = {"FP8": (FP8, {})}
_AWQ = {"AWQ": (AWQ, {"dtype": "fp16"})}  # AutoAWQ checkpoints keep their unquantized tensors in fp16
_GPTQ = {"GPTQ-Int4": (GPTQ_INT4, {"dtype": "fp16"})}

# --- Qwen3 dense: size -> (hidden, layers, heads, kv heads, intermediate, tie embeddings) ----------
_QWEN3_DENSE = {
    "0.6B": (1024, 28, 16, 8, 3072, True),  # head_dim 128 although hidden/heads = 64
    "1.7B": (2048, 28, 16, 8, 6144, True),
    "4B": (2560, 36, 32, 8, 9728, True),
    "8B": (4096, 36, 32, 8, 12288, False),
    "14B": (5120, 40, 40, 8, 17408, False),
    "32B": (5120, 64, 64, 8, 25600, False),
}
for _size, (_h, _l, _nh, _kv, _inter, _tie) in _QWEN3_DENSE.items():
    _base = dict(architecture="qwen3", hidden_size=_h, num_layers=_l, num_heads=_nh, num_kv_heads=_kv,
                 head_dim=128, intermediate_size=_inter, vocab_size=QWEN3_VOCAB, max_position=40960,
                 tie_embeddings=_tie)
    _variants(f"Qwen3-{_size}", _base, {**_FP8, **(_AWQ if _size in ("4B", "8B", "14B", "32B") else {})})
    if _size == "4B":  # the 2507 refresh: 256K context, thinking split into two models
        _long = {**_base, "max_position": 262144}
        _variants("Qwen3-4B-Instruct-2507", {**_long, "thinking": "none"}, _FP8)
        _variants("Qwen3-4B-Thinking-2507", {**_long, "thinking": "thinking"}, _FP8)

# --- Qwen3 MoE --------------------------------------------------------------------------------------
_Q3_30B = dict(architecture="qwen3_moe", hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
               head_dim=128, intermediate_size=6144, vocab_size=QWEN3_VOCAB, max_position=40960,
               moe=MoE(num_experts=128, top_k=8, moe_intermediate_size=768))
_Q3_235B = dict(architecture="qwen3_moe", hidden_size=4096, num_layers=94, num_heads=64, num_kv_heads=4,
                head_dim=128, intermediate_size=12288, vocab_size=QWEN3_VOCAB, max_position=40960,
                moe=MoE(num_experts=128, top_k=8, moe_intermediate_size=1536))
for _name, _base in (("Qwen3-30B-A3B", _Q3_30B), ("Qwen3-235B-A22B", _Q3_235B)):
    _variants(_name, _base, {**_FP8, **_GPTQ})
    _long = {**_base, "max_position": 262144}
    _variants(f"{_name}-Instruct-2507", {**_long, "thinking": "none"}, _FP8)
    _variants(f"{_name}-Thinking-2507", {**_long, "thinking": "thinking"}, _FP8)

# Coder: same 30B-A3B shape (its config.json says intermediate 5472, unused: every layer is MoE).
_variants("Qwen3-Coder-30B-A3B-Instruct",
          {**_Q3_30B, "intermediate_size": 5472, "max_position": 262144, "thinking": "none"}, _FP8)
_variants("Qwen3-Coder-480B-A35B-Instruct",
          dict(architecture="qwen3_moe", hidden_size=6144, num_layers=62, num_heads=96, num_kv_heads=8,
               head_dim=128, intermediate_size=8192, vocab_size=QWEN3_VOCAB, max_position=262144,
               moe=MoE(num_experts=160, top_k=8, moe_intermediate_size=2560), thinking="none"), _FP8)

# --- Qwen3-Next: 3 Gated DeltaNet layers then 1 gated full-attention layer, 512 tiny experts + shared --
_NEXT = dict(architecture="qwen3_next", hidden_size=2048, num_layers=48, num_heads=16, num_kv_heads=2,
             head_dim=256, intermediate_size=5120, vocab_size=QWEN3_VOCAB, max_position=262144,
             moe=MoE(num_experts=512, top_k=10, moe_intermediate_size=512, shared_expert_intermediate_size=512),
             linear_attention=LinearAttention(full_attention_interval=4, num_key_heads=16, num_value_heads=32,
                                              key_head_dim=128, value_head_dim=128, conv_kernel=4),
             attn_output_gate=True,
             notes=("checkpoint also holds one MTP layer (mtp.*), loaded only for speculative decoding",))
_variants("Qwen3-Next-80B-A3B-Instruct", {**_NEXT, "thinking": "none"}, _FP8)
_variants("Qwen3-Next-80B-A3B-Thinking", {**_NEXT, "thinking": "thinking"}, _FP8)

# --- Qwen2.5 Instruct: q/k/v biases, no qk-norm, head_dim = hidden / heads ------------------------
_QWEN25 = {  # size -> (hidden, layers, heads, kv heads, intermediate)
    "7B": (3584, 28, 28, 4, 18944),
    "14B": (5120, 48, 40, 8, 13824),
    "32B": (5120, 64, 40, 8, 27648),
    "72B": (8192, 80, 64, 8, 29568),
}
for _size, (_h, _l, _nh, _kv, _inter) in _QWEN25.items():
    _base = dict(architecture="qwen2", hidden_size=_h, num_layers=_l, num_heads=_nh, num_kv_heads=_kv,
                 head_dim=_h // _nh, intermediate_size=_inter, vocab_size=QWEN25_VOCAB, max_position=32768,
                 attention_bias=True, qk_norm=False, thinking="none")
    _pad = {"intermediate_size": 29696} if _size == "72B" else {}
    _variants(f"Qwen2.5-{_size}-Instruct", _base, {
        "AWQ": (AWQ, {"dtype": "fp16", **_pad}),
        "GPTQ-Int4": (GPTQ_INT4, {"dtype": "fp16", **_pad}),
    })


# --- lookup -------------------------------------------------------------------------------------------
def _key(name: str) -> str:
    """Case-insensitive key; "Qwen/" prefix and "_" vs "-" do not matter.

    >>> _key(" Qwen/Qwen3_30B-A3B ")
    'qwen3-30b-a3b'
    """
    k = name.strip().lower().replace("_", "-")
    return k[len("qwen/"):] if k.startswith("qwen/") else k


_BY_KEY = {_key(n): s for n, s in _CATALOG.items()}


def names() -> list[str]:
    """Every catalog name, in catalog order (families together, each followed by its quantized forms)."""
    return list(_CATALOG)


def lookup(name: str) -> ModelSpec | None:
    """The catalog entry for a name or a Qwen hub id, or None."""
    return _BY_KEY.get(_key(name))


def closest(name: str, n: int = 3) -> list[str]:
    """Catalog names that look most like `name` (for "did you mean")."""
    keys = difflib.get_close_matches(_key(name), list(_BY_KEY), n=n, cutoff=0.5)
    return [_BY_KEY[k].name for k in keys]


def unknown_model_message(name: str) -> str:
    near = closest(name)
    hint = f"Closest catalog names: {', '.join(near)}." if near else (
        "Catalog names look like Qwen3-8B, Qwen3-30B-A3B, Qwen3-30B-A3B-FP8, Qwen3-235B-A22B-Instruct-2507.")
    return (f"Unknown model {name!r}: it is not in the built-in catalog. {hint} "
            "You can also give a hub id (Qwen/Qwen3-8B) that is in the local Hugging Face cache, or a local "
            "checkpoint directory with a config.json; `qwenhw.models.names()` lists the catalog.")


def get(name: str) -> ModelSpec:
    """The catalog entry for `name` (case-insensitive, with or without "Qwen/"); BadInput if unknown."""
    spec = lookup(name)
    if spec is None:
        raise BadInput(unknown_model_message(name))
    return spec
