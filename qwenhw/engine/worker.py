"""Run a backend's engine in another Python environment and talk to it over a pipe.

vLLM and the pinned Intel stack cannot share one environment with each other (or with the base one), so a
backend whose engine is not importable here starts `<env python> -m qwenhw.engine.worker` with the plan,
and the `WorkerEngine` proxy below forwards the Engine protocol as JSON lines over stdin/stdout.
The worker environment needs qwenhw and the backend's plugin installed (both are pure Python).

Environments are found through QWENHW_<BACKEND>_PYTHON or <cache>/envs/<backend>/bin/python.
"""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from .. import settings
from .base import Completion, Engine, Piece, Sampling


def worker_python(backend: str) -> str | None:
    """The interpreter of the environment that holds `backend`'s engine, if one is configured."""
    explicit = settings.engine_python(backend)
    if explicit:
        return explicit if os.path.exists(explicit) else None
    candidate = settings.cache_root() / "envs" / backend / "bin" / "python"
    return str(candidate) if candidate.exists() else None


class WorkerError(RuntimeError):
    pass


class WorkerEngine(Engine):
    """Proxy for an engine living in a worker process. One request at a time (the base lock)."""

    def __init__(self, plan: Any, python: str, env: dict[str, str] | None = None, timeout: float = 600.0):
        super().__init__(plan)
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parents[2])  # qwenhw importable even when not installed there
        full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [python, "-m", "qwenhw.engine.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None, text=True, env=full_env, bufsize=1,
        )
        self._io = threading.Lock()
        reply = self._call({"op": "load", "plan": plan.to_dict()})
        self.info = reply.get("info", {})

    # --- transport --------------------------------------------------------------------------------
    def _send(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def _recv(self) -> dict:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise WorkerError(f"the worker process exited (code {self.proc.poll()}); see its output above")
            if line.startswith("@@qwenhw "):  # the worker's own prints go to stdout too: skip them
                reply = json.loads(line[len("@@qwenhw "):])
                if reply.get("error"):
                    kind = reply.get("type", "Error")
                    if kind in ("BadInput", "DoesNotFit"):  # the user's to fix: the same message as here
                        from ..errors import BadInput

                        raise BadInput(reply["error"])
                    exc = MemoryError if kind in ("MemoryError", "OutOfMemoryError") else WorkerError
                    raise exc(f"{kind} in worker: {reply['error']}")
                return reply
            sys.stderr.write(line)

    def _call(self, message: dict) -> dict:
        with self._io:
            self._send(message)
            return self._recv()

    # --- Engine protocol --------------------------------------------------------------------------
    def _complete(self, prompts: list[str], sampling: Sampling) -> list[Completion]:
        reply = self._call({"op": "complete", "prompts": prompts, "sampling": sampling.__dict__})
        return [Completion(c["text"], tuple(c["token_ids"]), c["prompt_tokens"], c["finish_reason"])
                for c in reply["completions"]]

    def _stream(self, prompt: str, sampling: Sampling) -> Iterator[str]:
        with self._io:
            self._send({"op": "stream", "prompt": prompt, "sampling": sampling.__dict__})
            try:
                while True:
                    reply = self._recv()
                    if reply.get("done"):
                        return
                    yield reply["delta"]
            except (WorkerError, MemoryError):
                raise  # the worker ended this request itself
            except BaseException:  # closed early (Ctrl-C, client gone): stop the worker, stay in step
                self._cancel_stream()
                raise

    @property
    def max_batch(self) -> int:
        return int(self.info.get("max_batch", 1))

    def _stream_batch(self, prompts: list[str], samplings: list[Sampling], alive: Any,
                      stream: bool) -> Iterator[Piece]:
        with self._io:
            self._send({"op": "stream_batch", "prompts": prompts, "samplings": [s.__dict__ for s in samplings],
                        "stream": stream})
            cancelled = False
            try:
                while True:
                    reply = self._recv()
                    if reply.get("done"):
                        return
                    row, text, finish, tokens = reply["piece"]
                    if alive(row):
                        yield Piece(row, text, finish, tokens)
                    elif not cancelled and not any(alive(r) for r in range(len(prompts))):
                        self._send({"op": "cancel"})  # nobody reads any row: stop; read on up to "done"
                        cancelled = True
            except (WorkerError, MemoryError):
                raise
            except BaseException:  # closed early: stop the worker and read up to its "done", as for a stream
                self._cancel_stream()  # a second "cancel" is harmless: the worker takes it as a no-op
                raise

    def _cancel_stream(self) -> None:
        # The worker checks for "cancel" between deltas and then answers "done"; the deltas already in the
        # pipe are read and dropped, so the next request does not take a stale delta for its reply.
        if self.proc.poll() is not None:
            return
        self._send({"op": "cancel"})
        while not self._recv().get("done"):
            pass

    def health(self) -> dict[str, Any]:
        """The worker's engine's health; while a request holds the pipe, the last one seen (marked busy)."""
        if self.proc.poll() is not None:
            return {"status": "down", "error": f"the worker process exited (code {self.proc.poll()})"}
        if not self._io.acquire(blocking=False):
            return {**getattr(self, "_health", {"status": "ok"}), "busy": True}
        try:
            self._send({"op": "health"})
            self._health = self._recv().get("health", {"status": "ok"})
        except (WorkerError, MemoryError) as exc:
            return {"status": "down", "error": str(exc)}
        finally:
            self._io.release()
        return dict(self._health)

    def render_chat(self, messages: list[dict], enable_thinking: bool | None) -> str:
        return self._call({"op": "render", "messages": messages, "enable_thinking": enable_thinking})["prompt"]

    def count_tokens(self, text: str) -> int:
        return self._call({"op": "count", "text": text})["count"]

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        try:
            self._call({"op": "close"})
        except Exception:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- the worker side -------------------------------------------------------------------------------
def _reply(message: dict, out) -> None:
    out.write("@@qwenhw " + json.dumps(message) + "\n")
    out.flush()


def serve(stdin=None, stdout=None) -> None:
    """Worker main loop: load the plan with its backend's in-process engine, then answer requests."""
    from .. import plugins
    from ..planning.plan import Plan

    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    engine: Engine | None = None
    for line in stdin:
        msg = json.loads(line)
        op = msg.get("op")
        try:
            if op == "load":
                plan = Plan.from_dict(msg["plan"])
                backend = plugins.load().backends[plan.backend]
                engine = backend.load_in_process(plan)
                info = {"python": sys.executable, "max_batch": engine.max_batch, **getattr(engine, "load_info", {})}
                _reply({"ok": True, "info": info}, out)
            elif op == "complete":
                assert engine is not None
                results = engine._complete(msg["prompts"], Sampling(**_sampling(msg["sampling"])))
                _reply({"completions": [{"text": c.text, "token_ids": list(c.token_ids), "prompt_tokens":
                        c.prompt_tokens, "finish_reason": c.finish_reason} for c in results]}, out)
            elif op == "stream":
                assert engine is not None
                stream = engine._stream(msg["prompt"], Sampling(**_sampling(msg["sampling"])))
                try:
                    for delta in stream:
                        _reply({"delta": delta}, out)
                        if _cancelled(stdin):
                            break
                finally:
                    stream.close()  # stops the generation
                _reply({"done": True}, out)
            elif op == "stream_batch":
                assert engine is not None
                samplings = [Sampling(**_sampling(d)) for d in msg["samplings"]]
                pieces = engine._stream_batch(msg["prompts"], samplings, lambda row: True, msg["stream"])
                try:
                    for piece in pieces:
                        _reply({"piece": [piece.row, piece.text, piece.finish, piece.tokens]}, out)
                        if _cancelled(stdin):
                            break
                finally:
                    pieces.close()
                _reply({"done": True}, out)
            elif op == "cancel":
                pass  # arrived after the stream had already ended: its "done" is on its way
            elif op == "render":
                assert engine is not None
                _reply({"prompt": engine.render_chat(msg["messages"], msg["enable_thinking"])}, out)
            elif op == "count":
                assert engine is not None
                _reply({"count": engine.count_tokens(msg["text"])}, out)
            elif op == "health":
                assert engine is not None
                _reply({"health": engine.health()}, out)
            elif op == "close":
                if engine is not None:
                    engine.close()
                _reply({"ok": True}, out)
                return
        except BaseException as exc:  # report, keep serving (the parent decides)
            _reply({"error": str(exc) or repr(exc), "type": type(exc).__name__}, out)
            if op == "load":
                return


def _cancelled(stdin) -> bool:
    """Whether the parent sent "cancel" (the only message it sends while a stream runs) or went away."""
    try:
        ready = select.select([stdin], [], [], 0)[0]
    except (ValueError, OSError, io.UnsupportedOperation):  # not a real pipe
        return False
    if not ready:
        return False
    line = stdin.readline()
    return not line or json.loads(line).get("op") == "cancel"


def _sampling(d: dict) -> dict:
    d = dict(d)
    d["stop"] = tuple(d.get("stop") or ())
    return d


if __name__ == "__main__":
    # keep the protocol channel clean: libraries that print go to stderr
    channel = sys.stdout
    sys.stdout = sys.stderr
    serve(sys.stdin, channel)
