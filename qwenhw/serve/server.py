"""An OpenAI-compatible HTTP server over any Engine: Starlette routes served by uvicorn (the stack vLLM's own
server runs on), the engine driven by one scheduler thread (scheduler.py), which decodes concurrent requests
together where the engine batches (a plan for --concurrency N).

Each request is handled on uvicorn's event loop: the body is read within a size and a time limit and checked
(protocol.py), then queued as a Job whose pieces the handler awaits. A client that leaves, streaming or not,
leaves its job, and the engine drops its rows at its next step. Every error is an OpenAI-style JSON body.
`GET /metrics` has the Prometheus metrics (metrics.py).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import socket
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.base import Engine, Piece, Sampling
from ..engine.thinking import StreamSplitter, split_reasoning
from ..planning.workload import DUMMY_WARNING
from . import protocol as p
from .metrics import Metrics
from .protocol import APIError
from .scheduler import MAX_QUEUE, ClientGone, Job, Scheduler

log = logging.getLogger("qwenhw.serve")
MAX_BODY = 16 * 2**20  # bytes of a request body
BODY_TIMEOUT = 60.0  # seconds a client has to send its whole body
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
DISCONNECT_POLL = 0.1  # seconds between checks that a non-streaming request's client is still there


class OpenAIServer:
    """Bound at construction (port 0 picks a free one); `start()` serves in a thread, `serve_forever()` here."""

    def __init__(self, engine: Engine | None, host: str, port: int, api_key: str | None = None,
                 served_model_name: str | list[str] | None = None, max_context: int | None = None,
                 max_queue: int = MAX_QUEUE, access_log: bool = False):
        self.engine = engine  # may be attached after binding: the CLI binds first, then loads
        self.api_key = api_key or None
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
        self.names = names or ([engine.plan.model] if engine is not None and engine.plan else ["qwenhw"])
        self._max_context = max_context
        self.created = int(time.time())
        self.socket = _bind(host, port)  # OSError here: the port is taken or the address is not ours
        self.server_address = self.socket.getsockname()
        self.scheduler = Scheduler(self, max_queue)
        self.metrics = Metrics(self.scheduler)
        config = uvicorn.Config(_app(self), log_config=None, log_level="warning", access_log=access_log,
                                timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=5, lifespan="off",
                                h11_max_incomplete_event_size=64 * 1024)
        if access_log:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

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

    def serve_forever(self) -> None:
        """Serve until shutdown() or, in the main thread, Ctrl-C (raised again as KeyboardInterrupt)."""
        self._uvicorn.run(sockets=[self.socket])

    def start(self) -> threading.Thread:
        """Serve in a daemon thread, answering once this returns; stop with shutdown() then server_close()."""
        self._thread = threading.Thread(target=self.serve_forever, name="qwenhw-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._thread

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def server_close(self) -> None:
        self.scheduler.stop()
        self.socket.close()


def make_server(engine: Engine | None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                served_model_name: str | list[str] | None = None, **kwargs: Any) -> OpenAIServer:
    """A bound, not yet running server. `server.start()` runs it in a thread; `serve_forever()` blocks."""
    return OpenAIServer(engine, host, port, api_key, served_model_name, **kwargs)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits in the backlog instead of being reset
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


# --- the application -----------------------------------------------------------------------------------
Endpoint = Callable[[Request, OpenAIServer], Awaitable[Response]]


def _app(server: OpenAIServer) -> Starlette:
    def route(path: str, fn: Endpoint, method: str) -> Route:
        return Route(path, _endpoint(server, path, fn), methods=[method])

    routes = [route("/health", _health, "GET"), route("/metrics", _metrics, "GET"),
              route("/v1/models", _models, "GET"), route("/v1/chat/completions", _chat, "POST"),
              route("/v1/completions", _completions, "POST")]

    async def unrouted(request: Request, exc: Exception) -> Response:
        path = request.url.path
        status = getattr(exc, "status_code", 500)
        if status == 405:
            error = APIError(405, f"{request.method} is not allowed on {path}.", code="method_not_allowed")
        elif status == 404:
            known = ", ".join(sorted(r.path for r in routes))
            error = APIError(404, f"Unknown route {path}; this server has {known}.",
                             code="not_found")
        else:
            error = APIError(status, str(getattr(exc, "detail", exc)))
        server.metrics.requests.labels("unknown", str(error.status)).inc()
        return _error(error)

    return Starlette(routes=routes, exception_handlers={HTTPException: unrouted})


def _endpoint(server: OpenAIServer, path: str, fn: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """Authorization for /v1/, OpenAI-style errors, and the requests counter around an endpoint."""

    @functools.wraps(fn)
    async def handle(request: Request) -> Response:
        try:
            if path.startswith("/v1/"):
                _authorize(request, server.api_key)
            response = await fn(request, server)
        except APIError as exc:
            response = _error(exc)
        except ClientGone:
            server.metrics.cancelled.inc()
            response = Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        except Exception as exc:  # an engine fault: answer 500, keep serving
            log.exception("request failed")
            response = _error(APIError(500, f"{type(exc).__name__}: {exc}"))
        server.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    return handle


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                       code="invalid_api_key")


def _error(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _body(request: Request) -> Any:
    """The JSON body, refused past MAX_BODY bytes or BODY_TIMEOUT seconds."""
    too_large = APIError(413, f"The request body is over {MAX_BODY // 2**20} MiB.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large
    raw = bytearray()
    try:
        with anyio.fail_after(BODY_TIMEOUT):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_BODY:
                    raise too_large
    except TimeoutError as exc:
        raise APIError(408, f"The request body did not arrive within {BODY_TIMEOUT:.0f} s.",
                       code="request_timeout") from exc
    try:
        return json.loads(bytes(raw) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from exc


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _stream(job: Job, events: AsyncIterator[bytes], server: OpenAIServer) -> StreamingResponse:
    """Server-sent events from `events`; the job is left when they end or the client goes (Starlette closes
    the generator then), and its rows leave the engine's batch at the next step."""

    async def body() -> AsyncIterator[bytes]:
        with job:
            finished = False
            try:
                async for data in events:
                    yield data
                finished = True
            except Exception as exc:  # headers are gone: report in-band, as vLLM does
                log.exception("stream failed")
                yield _event(APIError(500, f"{type(exc).__name__}: {exc}").body())
                finished = True
            finally:
                if not finished:
                    server.metrics.cancelled.inc()
            yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _ready(job: Job) -> None:
    """Wait until the scheduler has prepared a streaming request's job; leave the job if that fails."""
    try:
        await job.ready()
    except BaseException:
        job.__exit__(None, None, None)
        raise


async def _collect(job: Job, request: Request) -> list[tuple[str, Piece]]:
    """Each row's whole text and its last piece (finish reason, completion tokens); ClientGone as soon as
    the client disconnects (checked every DISCONNECT_POLL s while the engine works)."""
    texts = [""] * len(job.rows)
    last: list[Any] = [None] * len(job.rows)

    async def read() -> None:
        async for piece in job.pieces():
            texts[piece.row] += piece.text
            if piece.finish:
                last[piece.row] = piece

    reader = asyncio.ensure_future(read())
    try:
        while True:
            done, _ = await asyncio.wait({reader}, timeout=DISCONNECT_POLL)
            if done:
                reader.result()
                return list(zip(texts, last))
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        reader.cancel()


# --- endpoints -----------------------------------------------------------------------------------------
async def _health(request: Request, server: OpenAIServer) -> Response:
    engine = server.engine
    if engine is None or engine.closed:
        return JSONResponse({"status": "loading"}, status_code=503)
    state = engine.health()  # a multi-node plan adds its cluster's nodes
    return JSONResponse(state, status_code=200 if state.get("status") == "ok" else 503)


async def _metrics(request: Request, server: OpenAIServer) -> Response:
    return Response(server.metrics.render(), media_type=server.metrics.content_type)


async def _models(request: Request, server: OpenAIServer) -> Response:
    plan = getattr(server.engine, "plan", None)
    dummy = getattr(plan, "config", {}).get("load_format") == "dummy"
    data = [{"id": name, "object": "model", "created": server.created, "owned_by": "qwenhw",
             "root": getattr(plan, "model", name), "max_model_len": server.context_limit,
             **({"load_format": "dummy", "warning": DUMMY_WARNING} if dummy else {})}
            for name in server.names]
    return JSONResponse({"object": "list", "data": data})


async def _chat(request: Request, server: OpenAIServer) -> Response:
    call = p.parse(await _body(request), True, server.names, server.context_limit)
    limit = server.context_limit
    seen: dict[str, Any] = {}

    def prepare(engine: Engine) -> list[tuple[str, Sampling]]:  # on the scheduler's thread
        try:
            prompt, thinks = engine.chat_prompt(call.messages, call.thinking)
        except Exception as exc:  # the chat template rejected the conversation (roles out of order, ...)
            raise APIError(400, f"The chat template rejected the messages: {exc}", "messages") from exc
        seen["prompt_tokens"] = p.count_prompt(engine.count_tokens, prompt, limit, "messages")
        # Thinking-2507 templates open <think> in the prompt: the answer starts inside the reasoning
        seen["in_reasoning"] = prompt.rstrip().endswith("<think>")
        max_tokens = p.check_length(seen["prompt_tokens"], call.max_tokens, limit, "messages")
        return [(prompt, engine.chat_sampling(thinks, max_tokens, **call.sampling))]

    arrived = time.monotonic()
    job = server.scheduler.submit(prepare, call.stream)
    rid = p.new_id("chatcmpl")
    if not call.stream:
        with job:
            await job.ready()
            text, last = (await _collect(job, request))[0]
        server.metrics.finished(arrived, job.first_piece, time.monotonic(), seen["prompt_tokens"], last.tokens)
        parts = split_reasoning(text)
        return JSONResponse(p.chat_response(call, rid, parts.content, parts.reasoning, last.finish,
                                            seen["prompt_tokens"], last.tokens))
    await _ready(job)

    async def events() -> AsyncIterator[bytes]:
        created = int(time.time())
        yield _event(p.chat_chunk(call, rid, created, {"role": "assistant", "content": ""}))
        splitter = StreamSplitter(in_reasoning=seen["in_reasoning"])
        last = None
        async for piece in job.pieces():
            for kind, text in splitter.feed(piece.text) + (splitter.flush() if piece.finish else []):
                delta = p.reasoning_fields(text) if kind == "reasoning" else {"content": text}
                yield _event(p.chat_chunk(call, rid, created, delta))
            last = piece
        server.metrics.finished(arrived, job.first_piece, time.monotonic(), seen["prompt_tokens"], last.tokens)
        yield _event(p.chat_chunk(call, rid, created, {}, last.finish))
        if call.include_usage:
            yield _event(p.chat_chunk(call, rid, created, usage_=p.usage(seen["prompt_tokens"], last.tokens)))

    return _stream(job, events(), server)


async def _completions(request: Request, server: OpenAIServer) -> Response:
    call = p.parse(await _body(request), False, server.names, server.context_limit)
    limit = server.context_limit
    n_prompts: list[int] = []

    def prepare(engine: Engine) -> list[tuple[str, Sampling]]:  # on the scheduler's thread
        n_prompts[:] = [p.count_prompt(engine.count_tokens, text, limit, "prompt") for text in call.prompts]
        # a batch shares one max_tokens: the longest prompt decides whether it fits
        max_tokens = min(p.check_length(n, call.max_tokens, limit, "prompt") for n in n_prompts)
        options = {k: v for k, v in call.sampling.items() if v is not None}
        sampling = Sampling(max_tokens=max_tokens, **{**options, "stop": tuple(options.get("stop") or ())})
        return [(prompt, sampling) for prompt in call.prompts]

    arrived = time.monotonic()
    job = server.scheduler.submit(prepare, call.stream)
    rid, created = p.new_id("cmpl"), int(time.time())
    if not call.stream:
        with job:
            await job.ready()
            outs = await _collect(job, request)
        tokens = sum(last.tokens for _, last in outs)
        server.metrics.finished(arrived, job.first_piece, time.monotonic(), sum(n_prompts), tokens)
        choices = [{"index": i, "text": (call.prompts[i] if call.echo else "") + text,
                    "finish_reason": last.finish, "logprobs": None} for i, (text, last) in enumerate(outs)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": call.model,
                             "choices": choices, "usage": p.usage(sum(n_prompts), tokens)})
    await _ready(job)

    async def events() -> AsyncIterator[bytes]:
        total = 0
        if call.echo:
            for i, prompt in enumerate(call.prompts):
                yield _event(p.completion_chunk(call, rid, created, i, prompt))
        async for piece in job.pieces():  # the prompts' pieces as they come (batched: interleaved)
            if piece.text:
                yield _event(p.completion_chunk(call, rid, created, piece.row, piece.text))
            if piece.finish:
                total += piece.tokens
                yield _event(p.completion_chunk(call, rid, created, piece.row, "", piece.finish))
        server.metrics.finished(arrived, job.first_piece, time.monotonic(), sum(n_prompts), total)
        if call.include_usage:
            yield _event(p.completion_chunk(call, rid, created, usage_=p.usage(sum(n_prompts), total)))

    return _stream(job, events(), server)
