"""An OpenAI-compatible HTTP server over any Engine, on the standard library's ThreadingHTTPServer.

Why the standard library: it has no dependencies (the core stays installable where no engine is), it runs
in-process in a thread (tests start it on port 0), and the engine is driven by one thread anyway, so an
async framework would buy nothing. Each connection gets a thread, which hands its request to the
scheduler (scheduler.py): the one thread that uses the engine and its tokenizer, and decodes concurrent
requests together where the engine batches (a plan for --concurrency N).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..engine.base import Engine, Piece, Sampling
from ..engine.thinking import StreamSplitter, split_reasoning
from ..planning.workload import DUMMY_WARNING
from . import protocol as p
from .protocol import APIError
from .scheduler import Job, Scheduler

log = logging.getLogger("qwenhw.serve")
MAX_BODY = 16 * 2**20


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive at exit
    # the listen backlog: socketserver's default of 5 reset connections when 16 clients connected at once
    request_queue_size = socket.SOMAXCONN

    def __init__(self, engine: Engine | None, host: str, port: int, api_key: str | None = None,
                 served_model_name: str | list[str] | None = None, max_context: int | None = None,
                 max_queue: int = 64, access_log: bool = False):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.engine = engine  # may be attached after binding: the CLI binds first, then loads
        self.api_key = api_key or None
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
        self.names = names or ([engine.plan.model] if engine is not None and engine.plan else ["qwenhw"])
        self._max_context = max_context
        self.access_log = access_log
        self.created = int(time.time())
        self.scheduler = Scheduler(self, max_queue)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"

    @property
    def context_limit(self) -> int | None:
        """Prompt + completion tokens per request: the context the plan was sized for (vLLM's max_model_len)."""
        if self._max_context:
            return self._max_context
        plan = getattr(self.engine, "plan", None)
        return (getattr(plan, "context", 0) or getattr(plan, "max_context", 0) or None) if plan else None

    def server_close(self) -> None:
        if hasattr(self, "scheduler"):  # not when binding failed (socketserver closes the socket itself)
            self.scheduler.stop()
        super().server_close()

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; stop with shutdown() then server_close()."""
        thread = threading.Thread(target=self.serve_forever, name="qwenhw-serve", daemon=True)
        thread.start()
        return thread


def make_server(engine: Engine | None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                served_model_name: str | list[str] | None = None, **kwargs: Any) -> OpenAIServer:
    """A bound, not yet running server. `server.start()` runs it in a thread; `serve_forever()` blocks."""
    return OpenAIServer(engine, host, port, api_key, served_model_name, **kwargs)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for plain responses; streams use chunked encoding
    server: OpenAIServer
    server_version = "qwenhw"

    # --- routing ---------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route({"/health": self._health, "/v1/models": self._models}, "GET")

    def do_POST(self) -> None:
        self._route({"/v1/chat/completions": self._chat, "/v1/completions": self._completions}, "POST")

    def _route(self, routes: dict, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._read = False  # one handler serves every request of a keep-alive connection
        try:
            handler = routes.get(path)
            if handler is None:
                known = {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions"}
                if path in known:
                    raise APIError(405, f"{method} is not allowed on {path}.", code="method_not_allowed")
                raise APIError(404, f"Unknown route {path}; this server has {', '.join(sorted(known))}.",
                               code="not_found")
            if path.startswith("/v1/"):
                self._authorize()
            handler()
        except APIError as exc:
            self._drain()
            self._send_json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; the gate and the generation are already released
        except Exception as exc:  # an engine fault: answer 500, keep serving
            log.exception("request failed")
            self._send_json(500, APIError(500, f"{type(exc).__name__}: {exc}").body())

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    # --- endpoints -------------------------------------------------------------------------------------
    def _health(self) -> None:
        engine = self.server.engine
        if engine is None or engine.closed:
            self._send_json(503, {"status": "loading"})
            return
        state = engine.health()  # a multi-node plan adds its cluster's nodes
        self._send_json(200 if state.get("status") == "ok" else 503, state)

    def _models(self) -> None:
        plan = getattr(self.server.engine, "plan", None)
        dummy = getattr(plan, "config", {}).get("load_format") == "dummy"
        data = [{"id": name, "object": "model", "created": self.server.created, "owned_by": "qwenhw",
                 "root": getattr(plan, "model", name), "max_model_len": self.server.context_limit,
                 **({"load_format": "dummy", "warning": DUMMY_WARNING} if dummy else {})}
                for name in self.server.names]
        self._send_json(200, {"object": "list", "data": data})

    def _chat(self) -> None:
        call = p.parse(self._body(), True, self.server.names, self.server.context_limit)
        limit = self.server.context_limit
        seen: dict[str, Any] = {}

        def prepare(engine: Engine) -> list[tuple[str, Sampling]]:
            try:
                prompt, thinks = engine.chat_prompt(call.messages, call.thinking)
            except Exception as exc:  # the chat template rejected the conversation (roles out of order, ...)
                raise APIError(400, f"The chat template rejected the messages: {exc}", "messages") from exc
            seen["prompt_tokens"] = engine.count_tokens(prompt)
            # Thinking-2507 templates open <think> in the prompt: the answer starts inside the reasoning
            seen["in_reasoning"] = prompt.rstrip().endswith("<think>")
            max_tokens = p.check_length(seen["prompt_tokens"], call.max_tokens, limit, "messages")
            return [(prompt, engine.chat_sampling(thinks, max_tokens, **call.sampling))]

        with self.server.scheduler.submit(prepare, call.stream) as job:
            job.ready()
            rid = p.new_id("chatcmpl")
            if not call.stream:
                text, last = _collect(job)[0]
                parts = split_reasoning(text)
                self._send_json(200, p.chat_response(call, rid, parts.content, parts.reasoning, last.finish,
                                                     seen["prompt_tokens"], last.tokens))
                return
            created = int(time.time())
            self._start_stream()
            self._event(p.chat_chunk(call, rid, created, {"role": "assistant", "content": ""}))
            splitter = StreamSplitter(in_reasoning=seen["in_reasoning"])
            try:
                last = None
                for piece in job.pieces():
                    for kind, text in splitter.feed(piece.text) + (splitter.flush() if piece.finish else []):
                        delta = p.reasoning_fields(text) if kind == "reasoning" else {"content": text}
                        self._event(p.chat_chunk(call, rid, created, delta))
                    last = piece
                self._event(p.chat_chunk(call, rid, created, {}, last.finish))
                if call.include_usage:
                    self._event(p.chat_chunk(call, rid, created,
                                             usage_=p.usage(seen["prompt_tokens"], last.tokens)))
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as exc:  # headers are gone: report in-band, as vLLM does
                log.exception("stream failed")
                self._event(APIError(500, f"{type(exc).__name__}: {exc}").body())
            self._end_stream()

    def _completions(self) -> None:
        call = p.parse(self._body(), False, self.server.names, self.server.context_limit)
        limit = self.server.context_limit
        n_prompts: list[int] = []

        def prepare(engine: Engine) -> list[tuple[str, Sampling]]:
            n_prompts[:] = [engine.count_tokens(text) for text in call.prompts]
            # a batch shares one max_tokens: the longest prompt decides whether it fits
            max_tokens = min(p.check_length(n, call.max_tokens, limit, "prompt") for n in n_prompts)
            options = {k: v for k, v in call.sampling.items() if v is not None}
            sampling = Sampling(max_tokens=max_tokens, **{**options, "stop": tuple(options.get("stop") or ())})
            return [(prompt, sampling) for prompt in call.prompts]

        with self.server.scheduler.submit(prepare, call.stream) as job:
            job.ready()
            rid, created = p.new_id("cmpl"), int(time.time())
            if not call.stream:
                outs = _collect(job)
                choices = [{"index": i, "text": (call.prompts[i] if call.echo else "") + text,
                            "finish_reason": last.finish, "logprobs": None} for i, (text, last) in enumerate(outs)]
                body = {"id": rid, "object": "text_completion", "created": created, "model": call.model,
                        "choices": choices, "usage": p.usage(sum(n_prompts), sum(last.tokens for _, last in outs))}
                self._send_json(200, body)
                return
            self._start_stream()
            total = 0
            try:
                if call.echo:
                    for i, prompt in enumerate(call.prompts):
                        self._event(p.completion_chunk(call, rid, created, i, prompt))
                for piece in job.pieces():  # the prompts' pieces as they come (batched: interleaved)
                    if piece.text:
                        self._event(p.completion_chunk(call, rid, created, piece.row, piece.text))
                    if piece.finish:
                        total += piece.tokens
                        self._event(p.completion_chunk(call, rid, created, piece.row, "", piece.finish))
                if call.include_usage:
                    self._event(p.completion_chunk(call, rid, created, usage_=p.usage(sum(n_prompts), total)))
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as exc:
                log.exception("stream failed")
                self._event(APIError(500, f"{type(exc).__name__}: {exc}").body())
            self._end_stream()

    # --- I/O -------------------------------------------------------------------------------------------
    def _body(self) -> Any:
        too_large = APIError(413, f"The request body is over {MAX_BODY // 2**20} MiB.", code="request_too_large")
        self._read = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = self._read_chunked(too_large)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True  # unread: this connection cannot be reused
                raise too_large
            raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from exc

    def _read_chunked(self, too_large: APIError) -> bytes:
        raw = b""
        while True:
            try:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            except ValueError as exc:
                self.close_connection = True
                raise APIError(400, "Malformed chunked request body.", code="invalid_body") from exc
            if size == 0:
                while self.rfile.readline().strip():  # trailers, up to the blank line
                    pass
                return raw
            raw += self.rfile.read(size)
            self.rfile.readline()
            if len(raw) > MAX_BODY:
                self.close_connection = True
                raise too_large

    def _drain(self) -> None:
        # an error before the body was read (auth, route): read it so keep-alive stays in step
        if self._read or self.command != "POST":
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, obj: Any) -> None:
        self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _end_stream(self) -> None:
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.access_log:
            log.info("%s %s", self.address_string(), format % args)


def _collect(job: Job) -> list[tuple[str, Piece]]:
    """Each row's whole text and its last piece (finish reason, completion tokens)."""
    texts = [""] * len(job.rows)
    last: list[Any] = [None] * len(job.rows)
    for piece in job.pieces():
        texts[piece.row] += piece.text
        if piece.finish:
            last[piece.row] = piece
    return list(zip(texts, last))
