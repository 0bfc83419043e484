"""Shared fixtures: the tiny real-architecture checkpoints and a reference HF run on them."""

from __future__ import annotations

import os
import signal

import pytest

os.environ.setdefault("QWENHW_QUIET", "1")
# A test run started in the background of a non-interactive shell (`cmd &`) inherits SIGINT as ignored, and
# so would every process it starts: the Ctrl-C tests (chat, serve) need it delivered. A handler here (not
# SIG_IGN) is reset to the default in child processes.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """A 2-layer Qwen3-MoE checkpoint with the real Qwen3 tokenizer (built offline, ~7 s)."""
    from qwenhw import tiny

    built = os.environ.get("TEST_TINY_MOE_CHECKPOINT")  # built already by the test run that started this one
    return tiny.build(built or tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-moe", moe=True)


@pytest.fixture(scope="session")
def hf_reference(tiny_moe):
    """Greedy tokens of plain transformers on the tiny checkpoint: what every backend must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_moe)
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.bfloat16)
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return {"prompt": prompt, "tokens": out[0, ids.shape[1]:].tolist()}


def _row_texts(pieces) -> list[tuple[str, str, int]]:
    """(text, finish reason, completion tokens) per row of Engine.stream_batch's pieces, rows in order."""
    out: dict[int, list] = {}
    for piece in pieces:
        row = out.setdefault(piece.row, ["", None, 0])
        row[0] += piece.text
        if piece.finish:
            row[1:] = [piece.finish, piece.tokens]
    return [tuple(out[i]) for i in sorted(out)]


@pytest.fixture
def texts():
    return _row_texts


def _streamed(rt, prompts, limits) -> dict[int, list[int]]:
    """A native runtime's greedy tokens of `prompts` decoded together (stream_batch), by sequence."""
    from qwenhw_native.sampling import SampleParams

    got: dict[int, list[int]] = {}
    for seq, token, _ in rt.stream_batch(prompts, limits, SampleParams(), set()):
        got.setdefault(seq, []).append(token)
    return got


def _alone(model, prompts, limits, max_len: int = 64) -> dict[int, list[int]]:
    """Each prompt's greedy tokens decoded alone on a one-row native runtime (eager, CPU): what decoding them
    together must give each, by sequence."""
    from qwenhw_native.runtime import Runtime, SampleParams

    rt = Runtime(model, max_len, "cpu", graphs=False)
    return {i: rt.generate_batch([p], n, SampleParams(), set())[0] for i, (p, n) in enumerate(zip(prompts, limits))}


@pytest.fixture
def streamed():
    return _streamed


@pytest.fixture
def alone():
    return _alone
