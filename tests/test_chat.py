"""`qwenhw chat`: the REPL through a real pty (pexpect), and the session logic in-process."""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time

import pexpect
import pytest
from rich.console import Console

import qwenhw
from qwenhw.chat_repl import ChatSession, print_stream, run_chat
from qwenhw.engine.base import Completion, Engine

STATUS = r"\[(think|no_think) · [\d.]+ s\]"
PROMPT = ">>> "


def generating():
    return [t for t in threading.enumerate() if t.name.endswith("(run)") and t.is_alive()]


@pytest.mark.slow
def test_chat_in_a_pty(tiny_moe):
    """Mode switches, a soft switch, Ctrl-C stopping a long reply while the session goes on, Ctrl-D."""
    child = pexpect.spawn(sys.executable, ["-m", "qwenhw.cli", "chat", str(tiny_moe), "--backend", "offload",
                                           "--max-tokens", "6",
                                           "--temperature", "0"], encoding="utf-8", timeout=90,
                          dimensions=(40, 120), env={**os.environ, "QWENHW_QUIET": "1"})
    try:
        child.expect("ready")
        child.expect_exact(PROMPT)
        child.sendline("hello")  # Qwen3 hybrids think by default
        child.expect(STATUS)
        assert child.match.group(1) == "think"
        child.expect_exact(PROMPT)
        child.sendline("/no_think")
        child.expect("thinking off")
        child.sendline("hello again")
        child.expect(STATUS)
        assert child.match.group(1) == "no_think"
        child.sendline("/think")
        child.expect("thinking on")
        child.sendline("why is the sky blue? /no_think")  # a soft switch decides this turn only
        child.expect(STATUS)
        assert child.match.group(1) == "no_think"
        child.sendline("/set max_tokens 5000")  # ~a minute of tokens: Ctrl-C must cut it short
        child.expect("max_tokens = 5000")
        child.sendline("tell me a long story")
        child.expect(r"story\r\n.{20}")  # the reply is streaming
        start = time.perf_counter()
        child.sendintr()  # Ctrl-C through the terminal: SIGINT to the process
        child.expect("stopped")
        assert time.perf_counter() - start < 10
        child.expect_exact(PROMPT)
        child.sendline("/set max_tokens 4")
        child.sendline("still there?")  # the session continues, in thinking mode
        child.expect(STATUS)
        assert child.match.group(1) == "think"
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D ends the session cleanly
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


@pytest.fixture(scope="module")
def engine(tiny_moe):
    with qwenhw.load(str(tiny_moe), backend="offload") as e:
        yield e


@pytest.mark.slow
def test_session_modes_and_history(engine):
    s = ChatSession(engine, max_tokens=4, temperature=0)
    assert s.thinks("hi") and not s.thinks("hi /no_think")
    s.thinking = False  # what /no_think does
    assert not s.thinks("hi") and s.thinks("hi /think")
    prompt, thinks = engine.chat_prompt(s.messages("hi"), s.turn_thinking("hi"))
    assert not thinks and "<think>\n\n</think>" in prompt  # enable_thinking=False reached the template
    prompt, thinks = engine.chat_prompt(s.messages("hi /think"), s.turn_thinking("hi /think"))
    assert thinks and not prompt.endswith("</think>\n\n")
    answer = "".join(t for k, t in s.send("first") if k == "content")
    assert s.history == [{"role": "user", "content": "first"}, {"role": "assistant", "content": answer.strip()}]
    s.reset()
    assert s.history == []


@pytest.mark.slow
def test_stopping_a_reply_ends_the_generation(engine):
    s = ChatSession(engine, max_tokens=4000, temperature=0)
    stream = s.send("go on forever")
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # what Ctrl-C does in the REPL
    assert not generating(), "the model is still generating for nobody"
    assert s.history == [], "an interrupted turn is not kept"
    assert engine._lock.acquire(timeout=1)  # and the engine is free
    engine._lock.release()


class Scripted(Engine):
    """Replies with fixed text in pieces: shows how reasoning and answer are rendered and stored."""

    def __init__(self, text):
        super().__init__()
        self.text = text
        self.seen = []

    def render_chat(self, messages, enable_thinking):
        self.seen.append((messages, enable_thinking))
        return "prompt"

    def _complete(self, prompts, sampling):
        return [Completion(self.text)]

    def _stream(self, prompt, sampling):
        yield from re.findall(r"\s*\S+", self.text)


def test_repl_commands_and_reasoning_display(monkeypatch):
    engine = Scripted("<think>\nweigh it\n</think>\n\nforty-two")
    lines = iter(["what?", "/no_think", "/set max_tokens 0", "/set temperature 0.5", "/nope", "and now?",
                  "/reset", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", width=80, soft_wrap=True)
    session = ChatSession(engine, max_tokens=8)
    run_chat(engine, session, console)
    text = out.getvalue()
    assert "\x1b[2mweigh" in text  # reasoning dimmed
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "weigh it\n\nforty-two" in plain  # set apart from the answer
    assert "usage:" in plain and "temperature = 0.5" in plain and "unknown command /nope" in plain
    assert session.temperature == 0.5 and session.max_tokens == 8 and session.history == []
    # second turn: the earlier answer is in the history without its reasoning; the mode reached the template
    messages, enable_thinking = engine.seen[-1]
    assert messages[:2] == [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "forty-two"}]
    assert enable_thinking is False
    assert next(lines) == "never read"  # /exit ended the loop


def test_print_stream_plain_answer():
    out = io.StringIO()
    print_stream(Console(file=out, width=80, soft_wrap=True), [("content", "\n\nhi"), ("content", " there")])
    assert out.getvalue() == "hi there"


@pytest.mark.slow
def test_stopping_a_reply_from_a_worker_process_engine(engine):
    """Backends in another environment (vLLM, intel) run behind WorkerEngine: stopping must not leave stale
    deltas in the pipe, and must stop the worker's generation rather than wait for it."""
    from qwenhw.engine.worker import WorkerEngine

    with WorkerEngine(engine.plan, sys.executable, env={"QWENHW_QUIET": "1"}) as worker:
        stream = worker.stream("Once upon a time", max_tokens=4000, temperature=0)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        start = time.perf_counter()
        stream.close()
        assert time.perf_counter() - start < 10  # 4000 tokens would take about a minute
        assert worker.count_tokens("hello world") == engine.count_tokens("hello world")  # in step
        prompt = "The capital of France is"
        assert worker.generate(prompt, max_tokens=5, temperature=0)[0].text == \
            engine.generate(prompt, max_tokens=5, temperature=0)[0].text
