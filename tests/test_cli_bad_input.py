"""Every bad input through every subcommand: exit 2 with one paragraph that says what to do, never a
traceback, never exit 1 (which means a bug). A new user's first hour, as a table."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest
from click.testing import CliRunner

from qwenhw import cli

PROFILES = {
    "not_a_profile": {"foo": 1},
    "string_memory": {"nodes": [{"accelerators": [{"index": 0, "vendor": "nvidia", "name": "H100",
                                                   "memory_bytes": "80G"}]}]},
    "negative_memory": {"nodes": [{"accelerators": [{"index": 0, "vendor": "nvidia", "name": "H100",
                                                     "memory_bytes": -5}]}]},
    "misspelt_field": {"nodes": [{"cpu": {"ram_byte": 5}}]},
    "nan_bandwidth": {"nodes": [{"cpu": {"memory_bandwidth_gbs": float("nan")}}]},
    "no_nodes": {"nodes": []},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_moe):
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for name, profile in PROFILES.items():
        out[name] = root / f"{name}.json"
        out[name].write_text(json.dumps(profile))
    out["a_file"] = tiny_moe / "config.json"
    out["empty_dir"] = root / "empty"
    out["empty_dir"].mkdir()
    out["no_weights"] = root / "no-weights"
    out["no_weights"].mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_moe / f, out["no_weights"] / f)
    out["truncated"] = root / "truncated"
    shutil.copytree(tiny_moe, out["truncated"])
    shard = next(out["truncated"].glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(int(shard.stat().st_size * 0.9))  # the header stays whole: only the data is cut short
    out["no_tokenizer"] = root / "no-tokenizer"
    shutil.copytree(tiny_moe, out["no_tokenizer"])
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (out["no_tokenizer"] / f).unlink()
    return out


H = ["--hardware", "1xH100-80G"]
CASES = [
    # (arguments; files' keys are put in with {key}), words the message must contain
    (["detect", "--hardware", "nope"], "bundled"),
    (["detect", "--hardware", "{not_a_profile}"], "unknown field 'foo'"),
    (["detect", "--hardware", "{string_memory}"], "memory_bytes is '80G'"),
    (["detect", "--hardware", "{negative_memory}"], "memory_bytes is -5"),
    (["detect", "--hardware", "{misspelt_field}"], "did you mean ram_bytes"),
    (["detect", "--hardware", "{nan_bandwidth}"], "memory_bandwidth_gbs is nan"),
    (["detect", "--hardware", "{no_nodes}"], "non-empty list"),
    (["detect", "--hardware", "{empty_dir}"], "directory"),
    (["backends", "--hardware", "{not_a_profile}"], "unknown field"),
    (["plan", "Qwen3-8B", *H, "--hardware", "{string_memory}"], "memory_bytes"),
    (["plan", "Qwen3-8B", *H, "--context", "-1"], "--context"),
    (["plan", "Qwen3-8B", *H, "--context", "abc"], "--context"),
    (["plan", "Qwen3-8B", *H, "--concurrency", "0"], "--concurrency"),
    (["plan", "Qwen3-8B", *H, "--gpu-memory-gib", "nan"], "finite"),
    (["plan", "Qwen3-8B", *H, "--gpu-memory-gib", "-1"], "finite"),
    (["plan", "Qwen3-8B", *H, "--cpu-memory-gib", "inf"], "finite"),
    (["plan", "Qwen3-8B", *H, "--dtype", "int3"], "int4"),
    (["plan", "Qwen3-8B", *H, "--kv-dtype", "q"], "--kv-dtype"),
    (["plan", "Qwen3-8B", *H, "--backend", "nope"], "No backend named"),
    (["plan", "Qwen3-8B", *H, "--engine", "nope"], "no engine of any registered backend"),
    (["plan", "Qwen3-8B", *H, "--backend", "vllm", "--engine", "deepspeed-zero3"], "offload backend"),
    (["plan", "Qwen3-8B", *H, "--emit", "/proc/qwenhw-x"], "Cannot write"),
    (["plan", "Qwen3-8B", *H, "--prompt-tokens", "0"], "--prompt-tokens"),
    (["plan", "Qwen3-8B", *H, "--goal", "fast"], "--goal"),
    (["plan", "Qwen3-8B", *H, "--load-format", "pt"], "--load-format"),
    (["plan", "Qwen3-8B", *H, "--context", "100", "--prompt-tokens", "200"], "--context 201"),
    (["plan", "Qwen3-8B", *H, "--prompt-tokens", "40000", "--output-tokens", "2000"], "40960"),
    (["plan", "Qwen3-8b-typo", *H], "Closest catalog names"),
    (["plan", "{a_file}", *H], "is a file, not a checkpoint directory"),
    (["plan", "{empty_dir}", *H], "has no config.json"),
    (["plan", "{no_weights}", *H], "no weights"),
    (["plan", "{truncated}", *H], "cut short"),
    (["plan", "{no_tokenizer}", *H], "no tokenizer"),
    (["run", "{no_weights}", "--prompt", "hi"], "--load-format dummy"),
    (["run", "Qwen3-8B", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["run", "Qwen3-8B", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["run", "Qwen3-8B", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["run", "Qwen3-8B", "--prompt", "hi", *H], "--hardware is for `qwenhw plan`"),
    (["chat", "Qwen3-8B", "--max-tokens", "0"], "--max-tokens"),
    (["serve", "Qwen3-8B", "--port", "99999"], "--port"),
    (["serve", "Qwen3-8B", "--port", "-1"], "--port"),
    (["serve", "Qwen3-8B", "--port", "abc"], "--port"),
    (["demo", "--path", "/proc/qwenhw-x", "--skip-chat"], "Cannot write"),
]


@pytest.mark.parametrize("args, words", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_exits_2_with_a_paragraph_and_no_traceback(args, words, files, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    result = CliRunner().invoke(cli.main, args)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert isinstance(result.exception, SystemExit) or result.exception is None, text
    assert result.exit_code == 2, (args, result.exit_code, text)
    assert "Traceback" not in text and words in text, text


def test_a_hub_id_not_in_the_cache_fails_at_once_without_the_network(monkeypatch, tmp_path):
    """`run Qwen/Qwen3-8B` with nothing downloaded: the download command, in well under a second, and no
    connection attempted (a backend trying the hub first cost 26 s of retries)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("qwenhw tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    result = CliRunner().invoke(cli.main, ["run", "Qwen/Qwen3-8B", "--prompt", "hi"])
    took = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    assert "hf download Qwen/Qwen3-8B" in result.output and took < 1.0, (took, result.output)


def test_an_unexpected_fault_is_one_paragraph_too(monkeypatch):
    """A bug still prints no traceback (QWENHW_DEBUG=1 shows it): exit 1, naming it a bug."""
    monkeypatch.delenv("QWENHW_DEBUG", raising=False)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli.api, "plan", broken)
    result = CliRunner().invoke(cli.main, ["plan", "Qwen3-8B", *H])
    assert result.exit_code == 1 and "internal error: ZeroDivisionError: boom" in result.output
    assert "Traceback" not in result.output
    assert os.environ.get("QWENHW_DEBUG") is None
