"""A Qwen model's shape and weight format, as config.json states it. Pure data and arithmetic.

Parameter counts are derived from the architecture; when a checkpoint is on disk, `weight_bytes` holds the
exact byte count read from its safetensors headers and wins over the derived estimate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Bytes per stored weight element, by format. int4 formats carry per-group scales (and zeros) on top.
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class Quantization:
    """How the checkpoint's linear weights are stored. `method` None means plain `dtype`."""

    method: str | None = None  # "fp8" (block), "awq", "gptq", "int8", "sym_int4"; None = unquantized (see dtype)
    bits: int = 16
    group_size: int = 128  # awq/gptq group, fp8 block edge
    modules_not_converted: tuple[str, ...] = ("lm_head", "embed_tokens", "gate", "norm")

    def bytes_per_weight(self) -> float:
        """Average stored bytes per quantized weight, scales included.

        >>> Quantization("fp8", 8, 128).bytes_per_weight()  # one fp32 scale per 128x128 block
        1.000244140625
        >>> round(Quantization("awq", 4, 128).bytes_per_weight(), 5)  # fp16 scale + packed int4 zero per 128
        0.51953
        """
        if self.method is None:
            return self.bits / 8
        if self.method == "fp8":
            return 1.0 + 4.0 / (self.group_size * self.group_size)
        if self.method in ("int8", "sym_int8"):  # per-channel scales: negligible
            return 1.0
        if self.method in ("sym_int4", "asym_int4"):  # ipex-llm: fp16 scale (and min) per 64 weights
            return 0.5 + (2.0 if self.method == "sym_int4" else 4.0) / 64
        if self.method in ("awq", "gptq"):
            # packed int4 + an fp16 scale and a 4-bit zero point per group (gptq also g_idx, ignored: per row)
            return self.bits / 8 + (2.0 + self.bits / 8) / self.group_size
        raise ValueError(f"unknown quantization method {self.method!r}")


@dataclass(frozen=True)
class MoE:
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int = 0  # Qwen3-Next / Qwen2-MoE shared expert
    mlp_only_layers: tuple[int, ...] = ()  # dense layers inside an MoE model
    decoder_sparse_step: int = 1


@dataclass(frozen=True)
class LinearAttention:
    """Qwen3-Next's Gated DeltaNet layers: no KV cache, a fixed recurrent state per sequence."""

    full_attention_interval: int  # every Nth layer is full attention
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    architecture: str  # config.json model_type: qwen3, qwen3_moe, qwen3_next, qwen2
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    tie_embeddings: bool = False
    moe: MoE | None = None
    linear_attention: LinearAttention | None = None
    attention_bias: bool = False  # Qwen2.5 has q/k/v biases
    qk_norm: bool = True  # Qwen3 normalises q and k per head
    attn_output_gate: bool = False  # Qwen3-Next doubles q_proj for a gate
    dtype: str = "bf16"  # dtype of unquantized tensors
    quant: Quantization = Quantization()
    thinking: str = "hybrid"  # "hybrid" (enable_thinking switch), "thinking" (always), "none"
    weight_bytes: int | None = None  # exact, from safetensors headers, when a checkpoint is on disk
    path: str | None = None  # local checkpoint directory
    source: str = "catalog"  # "catalog" | "checkpoint" | "plugin:<name>"
    notes: tuple[str, ...] = ()

    # --- shape helpers --------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def is_moe_layer(self, layer: int) -> bool:
        m = self.moe
        if m is None or layer in m.mlp_only_layers:
            return False
        return (layer + 1) % m.decoder_sparse_step == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def num_full_attention_layers(self) -> int:
        la = self.linear_attention
        if la is None:
            return self.num_layers
        return self.num_layers // la.full_attention_interval

    # --- parameter counts (elements) -------------------------------------------------------------
    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is not tied."""
        per = self.vocab_size * self.hidden_size
        return per if self.tie_embeddings else 2 * per

    def full_attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_heads * d * (2 if self.attn_output_gate else 1)
        kv = 2 * h * self.num_kv_heads * d
        o = self.num_heads * d * h
        bias = (self.num_heads + 2 * self.num_kv_heads) * d if self.attention_bias else 0
        norms = 2 * d if self.qk_norm else 0
        return q + kv + o + bias + norms

    def linear_attention_params(self) -> int:
        la = self.linear_attention
        if la is None:
            return 0
        h = self.hidden_size
        k_dim = la.num_key_heads * la.key_head_dim
        v_dim = la.num_value_heads * la.value_head_dim
        qkvz = h * (2 * k_dim + 2 * v_dim)  # q, k, v and the output gate z
        ba = h * 2 * la.num_value_heads  # beta and alpha per value head
        conv = (2 * k_dim + v_dim) * la.conv_kernel
        out = v_dim * h
        extra = 2 * la.num_value_heads + la.value_head_dim  # dt_bias, A_log, gated norm weight
        return qkvz + ba + conv + out + extra

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def expert_params_per_expert(self) -> int:
        assert self.moe is not None
        return 3 * self.hidden_size * self.moe.moe_intermediate_size

    def routed_expert_params(self) -> int:
        """All routed experts of all MoE layers: what MoE offload moves to host RAM."""
        if self.moe is None:
            return 0
        return self.num_moe_layers * self.moe.num_experts * self.expert_params_per_expert()

    def moe_shared_params_per_layer(self) -> int:
        """Router, shared expert and its gate: small parts that stay with attention."""
        m = self.moe
        assert m is not None
        h = self.hidden_size
        shared = 3 * h * m.shared_expert_intermediate_size + (h if m.shared_expert_intermediate_size else 0)
        return h * m.num_experts + shared

    def layer_params(self, layer: int) -> tuple[int, int]:
        """(non-expert, routed-expert) parameters of one decoder layer."""
        la = self.linear_attention
        if la is not None and (layer + 1) % la.full_attention_interval != 0:
            attn = self.linear_attention_params()
        else:
            attn = self.full_attention_params()
        norms = 2 * self.hidden_size
        if self.is_moe_layer(layer):
            assert self.moe is not None
            return attn + norms + self.moe_shared_params_per_layer(), self.moe.num_experts * self.expert_params_per_expert()
        return attn + norms + self.dense_mlp_params(), 0

    def total_params(self) -> int:
        total = self.embedding_params() + self.hidden_size  # final norm
        for i in range(self.num_layers):
            total += sum(self.layer_params(i))
        return total

    def active_params(self) -> int:
        """Parameters touched per token: experts counted top_k times (plus the shared expert)."""
        total = self.embedding_params() + self.hidden_size
        for i in range(self.num_layers):
            non_expert, experts = self.layer_params(i)
            total += non_expert
            if experts:
                assert self.moe is not None
                total += self.moe.top_k * self.expert_params_per_expert()
        return total

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        if d.get("moe"):
            m = dict(d["moe"])
            m["mlp_only_layers"] = tuple(m.get("mlp_only_layers", ()))
            d["moe"] = MoE(**m)
        if d.get("linear_attention"):
            d["linear_attention"] = LinearAttention(**d["linear_attention"])
        q = dict(d.get("quant") or {})
        if "modules_not_converted" in q:
            q["modules_not_converted"] = tuple(q["modules_not_converted"])
        d["quant"] = Quantization(**q)
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)

    def with_(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)
