"""Weight formats of the Intel stack and what they cost in memory. Pure.

ipex-llm stores low-bit linears as ggml blocks of QK weights plus scales; the byte counts below are
`ggml_type_size(q) / ggml_qk_size(q)` read from ipex-llm 2.3.0b20251110 itself (tests/test_intel_engine.py
checks the total against a loaded model). ipex-llm quantizes every nn.Linear whose in_features is a multiple
of 64 -- the MoE router and the LM head included -- and leaves embeddings and norms in the model dtype.
GGUF bits per weight are file-average values of Qwen3-MoE community quants (e.g. Qwen3-235B-A22B Q2_K:
82.67 GiB at 3.02 BPW as llama.cpp prints it), since K-quant files mix block types.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec

# ipex-llm `load_in_low_bit` value -> bytes per weight (QK=64 blocks: 32 B of int4 + fp16 scale = 34 B...)
LOW_BIT_BYTES = {
    "sym_int4": 34 / 64,  # q4_0; on torch >= 2.6 ipex-llm stores it as woq_int4, the same 34 B per 64
    "asym_int4": 36 / 64,  # q4_1: fp16 scale and min
    "sym_int8": 68 / 64,  # q8_0 with an fp32 scale
    "fp8": 68 / 64,  # fp8_e5m2 blocks, fp32 scale
    "fp16": 2.0,
    "bf16": 2.0,
}
# what a --dtype request means for ipex-llm
REQUEST_TO_LOW_BIT = {"int4": "sym_int4", "int8": "sym_int8", "fp8": "fp8", "bf16": "bf16", "fp16": "fp16"}

# GGUF quant -> average bits per weight over a Qwen3-MoE file (llama.cpp's "BPW"), best quality first
GGUF_BPW = {"BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q4_K_M": 4.85, "Q3_K_M": 3.91, "Q2_K": 3.02}
GGUF_LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
REQUEST_TO_GGUF = {"int4": "Q4_K_M", "int8": "Q8_0", "bf16": "BF16", "fp16": "BF16"}


@dataclass(frozen=True)
class Bytes:
    """Resident weight bytes of a served model, by role."""

    embed: float  # input embedding (model dtype; a lookup, not streamed per token)
    head: float  # LM head (quantized like the linears)
    non_expert: float  # attention, dense MLPs, routers, shared experts, norms
    experts: float  # all routed experts

    @property
    def total(self) -> float:
        return self.embed + self.head + self.non_expert + self.experts


def _params(spec: ModelSpec) -> tuple[int, int, int]:
    """(vocab x hidden, non-expert, routed-expert) parameter counts."""
    vh = spec.vocab_size * spec.hidden_size
    experts = spec.routed_expert_params()
    return vh, spec.total_params() - spec.embedding_params() - experts, experts


def low_bit_bytes(spec: ModelSpec, low_bit: str, rest_dtype: str) -> Bytes:
    """ipex-llm: linears (LM head too) in `low_bit`, embedding and norms in `rest_dtype`.

    A tied LM head gets its own quantized copy. Norms are ~1e-4 of the weights and counted as linears.

    >>> from qwenhw.models.catalog import get
    >>> b = low_bit_bytes(get("Qwen3-30B-A3B"), "sym_int4", "fp16")
    >>> round(b.total / 2**30, 2), round(b.experts / b.total, 3)
    (15.53, 0.924)
    """
    vh, non_expert, experts = _params(spec)
    bpw = LOW_BIT_BYTES[low_bit]
    return Bytes(embed=vh * mm.dtype_bytes(rest_dtype), head=vh * bpw, non_expert=non_expert * bpw,
                 experts=experts * bpw)


def plain_bytes(spec: ModelSpec, dtype: str) -> Bytes:
    """Every weight in one dtype (IPEX bf16/fp32, DeepSpeed before conversion)."""
    vh, non_expert, experts = _params(spec)
    b = mm.dtype_bytes(dtype)
    head = 0.0 if spec.tie_embeddings else vh * b
    return Bytes(embed=vh * b, head=head, non_expert=non_expert * b, experts=experts * b)


def gguf_bytes(spec: ModelSpec, quant: str) -> Bytes:
    """A GGUF file: every tensor at the file's average bits per weight (llama.cpp keeps token_embd too)."""
    vh, non_expert, experts = _params(spec)
    bpw = GGUF_BPW[quant] / 8
    head = 0.0 if spec.tie_embeddings else vh * bpw
    return Bytes(embed=vh * bpw, head=head, non_expert=non_expert * bpw, experts=experts * bpw)
