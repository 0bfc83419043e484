"""Memory arithmetic for a ModelSpec: weight bytes by role, KV and recurrent-state bytes, bytes per token.

Pure functions over ModelSpec; no files, no environment, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import DTYPE_BYTES, ModelSpec

KiB, MiB, GiB = 1024, 1024**2, 1024**3  # GiB as in qwenhw.hardware.profile

_DTYPE_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "fp8_e4m3fn": "fp8", "float8_e4m3fn": "fp8", "float8": "fp8",
    "int4": "int4", "int8": "int8",
}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a dtype name (vLLM / torch / short spellings).

    >>> dtype_bytes("bf16"), dtype_bytes("float16"), dtype_bytes("fp8_e5m2"), dtype_bytes("int4")
    (2.0, 2.0, 1.0, 0.5)
    """
    d = dtype.lower().replace("torch.", "")
    d = _DTYPE_ALIASES.get(d, d)
    if d not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[d]


def gib(n: float) -> float:
    """Bytes to GiB.

    >>> gib(3 * 1024**3 // 2)
    1.5
    """
    return n / GiB


def format_bytes(n: float) -> str:
    """Human-readable binary size.

    >>> format_bytes(98304), format_bytes(61064245248), format_bytes(512)
    ('96.0 KiB', '56.87 GiB', '512 B')
    """
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


@dataclass(frozen=True)
class WeightBytes:
    embeddings: int  # embed_tokens (+ lm_head when untied), always in spec.dtype
    non_expert: int  # attention / linear attention, dense MLPs, shared experts, norms, routers
    experts: int  # all routed experts of all layers: what MoE offload moves to host RAM
    total: int


def _linear_bytes(spec: ModelSpec) -> float:
    """Stored bytes per weight of a quantizable linear layer."""
    if spec.quant.method is None:
        return dtype_bytes(spec.dtype)
    return spec.quant.bytes_per_weight()


def _split_params(spec: ModelSpec) -> tuple[int, int, int]:
    """(non-expert linear, non-expert small, routed-expert) parameter counts over all layers.

    "Small" tensors (norms, biases, routers, convs, gates) stay unquantized; linears follow spec.quant.
    Their sum plus embedding_params() equals spec.total_params().
    """
    h = spec.hidden_size
    la = spec.linear_attention
    linear = small = experts = 0
    for i in range(spec.num_layers):
        if la is not None and (i + 1) % la.full_attention_interval != 0:
            k_dim, v_dim = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
            lin = h * (2 * k_dim + 2 * v_dim) + h * 2 * la.num_value_heads + v_dim * h  # in_proj_qkvz, _ba, out
            linear += lin
            small += spec.linear_attention_params() - lin  # conv1d, dt_bias, A_log, gated norm
        else:
            d = spec.head_dim
            lin = h * spec.num_heads * d * (2 if spec.attn_output_gate else 1) + 2 * h * spec.num_kv_heads * d \
                + spec.num_heads * d * h
            linear += lin
            small += spec.full_attention_params() - lin  # q/k/v biases, q/k norms
        small += 2 * h  # input and post-attention norms
        if spec.is_moe_layer(i):
            m = spec.moe
            assert m is not None
            shared = 3 * h * m.shared_expert_intermediate_size
            linear += shared
            small += spec.moe_shared_params_per_layer() - shared  # router + shared-expert gate
            experts += m.num_experts * spec.expert_params_per_expert()
        else:
            linear += spec.dense_mlp_params()
    small += h  # final norm
    return linear, small, experts


def weight_bytes_split(spec: ModelSpec) -> WeightBytes:
    """Weight bytes by role. When spec.weight_bytes is known from disk, the parts are scaled to sum to it."""
    dt, lb = dtype_bytes(spec.dtype), _linear_bytes(spec)
    linear, small, experts = _split_params(spec)
    emb = spec.embedding_params() * dt
    non_expert = linear * lb + small * dt
    exp = experts * lb
    est = emb + non_expert + exp
    if spec.weight_bytes is None:
        e, x = round(emb), round(exp)
        total = round(est)
    else:  # disk is the truth; keep the estimate's proportions
        total = spec.weight_bytes
        e, x = round(emb * total / est), round(exp * total / est)
    return WeightBytes(embeddings=e, non_expert=total - e - x, experts=x, total=total)


def expert_bytes(spec: ModelSpec) -> int:
    """Bytes of one routed expert in one layer (gate, up and down projections with their scales)."""
    if spec.moe is None or spec.num_moe_layers == 0:
        return 0
    return weight_bytes_split(spec).experts // (spec.num_moe_layers * spec.moe.num_experts)


def active_bytes_per_token(spec: ModelSpec) -> int:
    """Weight bytes read to decode one token: the bandwidth roofline's numerator.

    All non-expert weights, top_k experts per MoE layer, and the LM head (the input embedding is a
    one-row lookup, so it is not counted when untied).
    """
    w = weight_bytes_split(spec)
    head = w.embeddings if spec.tie_embeddings else w.embeddings // 2
    experts = 0
    if spec.moe is not None:
        experts = w.experts * spec.moe.top_k // spec.moe.num_experts
    return w.non_expert + head + experts


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str = "bf16") -> int:
    """KV-cache bytes one token adds over all full-attention layers ("auto" = the model's dtype).

    >>> from qwenhw.models.catalog import get
    >>> kv_bytes_per_token(get("Qwen3-30B-A3B")) // KiB, kv_bytes_per_token(get("Qwen3-8B"), "fp8") // KiB
    (96, 72)
    """
    b = dtype_bytes(spec.dtype if kv_dtype == "auto" else kv_dtype)
    return int(2 * spec.num_kv_heads * spec.head_dim * b * spec.num_full_attention_layers)


def linear_state_bytes_per_seq(spec: ModelSpec, state_dtype: str = "fp32") -> int:
    """Fixed per-sequence state of Qwen3-Next's Gated DeltaNet layers (0 for pure-attention models).

    Per linear layer: the recurrent state (value heads x key dim x value dim, fp32) plus the causal-conv
    state ((2 x key dim + value dim) x (kernel - 1), model dtype).

    >>> from qwenhw.models.catalog import get
    >>> linear_state_bytes_per_seq(get("Qwen3-Next-80B-A3B-Instruct"))
    77266944
    """
    la = spec.linear_attention
    if la is None:
        return 0
    recurrent = la.num_value_heads * la.key_head_dim * la.value_head_dim * dtype_bytes(state_dtype)
    conv_dim = 2 * la.num_key_heads * la.key_head_dim + la.num_value_heads * la.value_head_dim
    conv = conv_dim * (la.conv_kernel - 1) * dtype_bytes(spec.dtype)
    return int((recurrent + conv) * (spec.num_layers - spec.num_full_attention_layers))
