"""The kernel tests run the Triton kernels through Triton's interpreter on the CPU, in a process started with
TRITON_INTERPRET=1 (Triton reads it when it is imported, so it cannot be switched on inside a test run that
also compiles kernels for sm_90). plugins/native/tests/test_kernels.py starts that process, one per module
here; run them directly with `TRITON_INTERPRET=1 pytest plugins/native/tests/kernels`."""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]  # collected by test_kernels.py's interpreter processes instead

pytest.importorskip("triton")
pytest.importorskip("transformers")


def _rel(a, r) -> float:
    return float((a.float() - r.float()).norm() / r.float().norm())


@pytest.fixture
def rel():
    """Relative error of a against the reference r, in fp32."""
    return _rel


def _rotary(rows: int, tokens: int, d: int, generator, dtype=None):
    """cos, sin [rows, tokens, d] of random angles, laid out as transformers' rotary embedding gives them (each
    half the same angles)."""
    import torch

    ang = torch.randn(rows, tokens, d // 2, generator=generator)
    cos, sin = (torch.cat([f(ang), f(ang)], -1) for f in (torch.cos, torch.sin))
    return (cos, sin) if dtype is None else (cos.to(dtype), sin.to(dtype))


@pytest.fixture
def rotary():
    """cos, sin of random rotary angles: rotary(rows, tokens, head_dim, generator, dtype=None)."""
    return _rotary
