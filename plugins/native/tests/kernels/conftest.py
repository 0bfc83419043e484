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
