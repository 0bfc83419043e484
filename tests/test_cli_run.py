"""`qwenhw run`, and the argument checks `chat` and `serve` share with it (in-process, click's runner)."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

import qwenhw
from qwenhw.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_run_answers_like_the_engine(tiny_moe):
    result = invoke("run", tiny_moe, "--backend", "offload", "--prompt", "What is 2+2?", "--no-think",
                    "--max-tokens", 8,
                    "--temperature", 0)
    assert result.exit_code == 0, result.output
    with qwenhw.load(str(tiny_moe), backend="offload") as engine:
        direct = engine.chat([{"role": "user", "content": "What is 2+2?"}], thinking=False, max_tokens=8,
                             temperature=0)
        raw = engine.generate("The capital of France is", max_tokens=5, temperature=0)[0].text
    assert direct.content in result.stdout
    result = invoke("run", tiny_moe, "--backend", "offload", "--prompt", "The capital of France is", "--raw",
                    "--max-tokens", 5,
                    "--temperature", 0)
    assert result.exit_code == 0 and result.stdout.rstrip("\n").endswith(raw)


@pytest.mark.parametrize("args", [
    ("run", "{m}", "--prompt", "x", "--max-tokens", "0"),
    ("run", "{m}", "--prompt", "x", "--hardware", "cpu-only"),
    ("chat", "{m}", "--max-tokens", "-1"),
    ("chat", "{m}", "--hardware", "4xH100-80G"),
    ("serve", "{m}", "--hardware", "4xH100-80G"),
])
def test_bad_arguments_exit_2_without_loading(args):
    result = invoke(*(a.format(m="Qwen3-0.6B") for a in args))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("qwenhw: ")


def test_serve_on_a_taken_port_exits_2_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # a catalog model with no weights here: reaching the load would fail differently
        result = invoke("serve", "Qwen3-235B-A22B", "--port", port)
    assert result.exit_code == 2 and f"127.0.0.1:{port}" in result.output and "--port" in result.output
