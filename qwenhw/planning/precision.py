"""Which weight and KV-cache precision a request means for a given checkpoint. Pure.

A checkpoint stored in bf16 can be served in bf16, fp16, fp32 or quantized online to fp8/int4 by engines
that can; a checkpoint already quantized (FP8, AWQ, GPTQ) is served as it is stored.
"""

from __future__ import annotations

from ..errors import BadInput
from ..models.spec import ModelSpec, Quantization

WEIGHT_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8", "int8", "int4")
KV_DTYPES = ("auto", "bf16", "fp16", "fp8")


def stored_dtype(spec: ModelSpec) -> str:
    """The weight format the checkpoint holds: bf16, fp8, int4 ..."""
    q = spec.quant
    if q.method is None:
        return spec.dtype
    return "fp8" if q.method == "fp8" else f"int{q.bits}"


def check_dtype(dtype: str | None, allowed=WEIGHT_DTYPES, what: str = "--dtype") -> str:
    value = (dtype or "auto").lower().replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32")
    if value not in allowed:
        import difflib

        close = difflib.get_close_matches(value, list(allowed), n=2, cutoff=0.5)
        raise BadInput(f"{what} {dtype!r} is not one of {', '.join(allowed)}"
                       + (f" (closest: {', '.join(close)})" if close else "") + ". Pick one of those, or leave it out.")
    return value


def with_weight_dtype(spec: ModelSpec, dtype: str) -> ModelSpec:
    """The spec as it will sit in memory when served in `dtype` (online quantization included).

    Exact on-disk byte counts stay valid only when nothing changes.
    """
    if dtype in ("auto", stored_dtype(spec)):
        return spec
    if spec.quant.method is not None and dtype in ("bf16", "fp16", "fp32"):
        # dequantizing a quantized checkpoint: the engine upcasts (ipex-llm, transformers do), memory grows
        return spec.with_(quant=Quantization(), dtype=dtype, weight_bytes=None)
    if dtype in ("bf16", "fp16", "fp32"):
        return spec.with_(dtype=dtype, weight_bytes=None)
    if dtype == "fp8":
        return spec.with_(quant=Quantization("fp8", 8, 128), weight_bytes=None)
    if dtype == "int8":
        return spec.with_(quant=Quantization("int8", 8), weight_bytes=None)
    if dtype == "int4":
        return spec.with_(quant=Quantization("awq", 4, 128), weight_bytes=None)
    raise BadInput(f"unknown weight dtype {dtype!r}")
