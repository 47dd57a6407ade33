"""The HTTP layer: OpenAI's chat-completions API over the batcher (FastAPI; the extra ``ivcprune[serve]``).

    POST /v1/chat/completions   answers (JSON, or server-sent events with "stream": true)
    GET  /v1/models             the one model served
    GET  /health                liveness, no key needed
    GET  /metrics               Prometheus text, no key needed

Parsing and every limit live in :mod:`.protocol`; generation in :mod:`.batcher`. This file only moves
bytes: read the body (capped), check the key, parse off the event loop, queue, wait, answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, Job, QueueFull, Result, ShuttingDown
from .config import ServeConfig
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatJob,
    StreamText,
    bad,
    chunk,
    completion_body,
    count_prompt_tokens,
    delta,
    parse_chat,
    usage,
)

CHAT = "/v1/chat/completions"
ENDPOINTS = (CHAT, "/v1/models", "/health", "/metrics")


class RequestMetrics:
    """ASGI middleware: every response's status by endpoint; chat latency up to the last byte (streams too)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def record_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            seconds = time.monotonic() - start if path == CHAT and status[0] == 200 else None
            self.metrics.request(path, status[0], seconds)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Server:
    """The app's state: model, batcher, metrics, settings."""

    def __init__(self, model, processor, config: ServeConfig):
        self.model, self.config = model, config
        # The worker has the processor to itself; the HTTP side (token counts, streamed text) uses a copy:
        # a fast tokenizer shared by threads can fail with "Already borrowed" while one of them pads.
        self.processor, self._lock = copy.deepcopy(processor), threading.Lock()
        self.metrics = Metrics()
        self.batcher = Batcher(model, processor, max_batch_size=config.max_batch_size,
                               wait_s=config.batch_wait_ms / 1000, max_queue=config.limits.max_queue,
                               on_batch=self.metrics.batch)

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        """The body, refused with 413 past ``max_request_bytes`` (before reading it all where it says its size)."""
        cap = self.config.limits.max_request_bytes
        too_big = APIError(413, f"the request body is larger than this server's limit of {cap} bytes",
                           code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > cap:
                raise too_big
        try:
            return json.loads(body)
        except ValueError as e:
            raise bad(f"the request body is not valid JSON: {e}") from None

    def enqueue(self, chat: ChatJob) -> tuple[Job, asyncio.Queue]:
        """Queue the job; its events arrive on the returned queue (the worker hands them to this loop)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def notify(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(chat, notify)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", code="queue_full", kind="rate_limit_error") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down") from None
        return job, events

    async def next_event(self, job: Job, events: asyncio.Queue, deadline: float) -> tuple:
        try:
            event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.batcher.cancel(job)
            raise APIError(504, f"the request took longer than this server's timeout of "
                                f"{self.config.limits.timeout_s:g} s", code="timeout", kind="timeout") from None
        if event[0] == "error":
            raise APIError(500, f"generation failed: {event[1]}", code="generation_failed")
        return event

    def answered(self, result: Result) -> None:
        p = result.pruning
        self.metrics.answered(result.prompt_tokens, usage(result)["completion_tokens"], p["visual_tokens"],
                              p["visual_kept"])

    async def complete(self, request: Request):
        arrived = time.monotonic()
        self.check_key(request)
        body = await self.read_json(request)
        chat = await asyncio.to_thread(parse_chat, body, self.config, self.model, self.count_tokens)
        job, events = self.enqueue(chat)
        deadline = arrived + self.config.limits.timeout_s
        ids = {"ident": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.model_name}
        if chat.stream:
            return StreamingResponse(self.stream(job, events, deadline, ids), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await self.result(request, job, events, deadline)
        self.answered(result)
        return JSONResponse(completion_body(result, **ids))

    async def result(self, request: Request, job: Job, events: asyncio.Queue, deadline: float) -> Result:
        """The job's result; a client that leaves meanwhile cancels its job (its rows stop at the next step)."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(self.next_event(job, events, deadline))
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise APIError(499, "the client closed the connection", code="client_closed")
                if event.result()[0] == "done":
                    return event.result()[1]
        finally:
            gone.cancel()
            self.batcher.cancel(job)  # a no-op once answered

    async def stream(self, job: Job, events: asyncio.Queue, deadline: float, ids: dict[str, Any]):
        chat = job.chat
        texts = [StreamText(self._decode, chat.stop) for _ in range(chat.n)]
        try:
            yield _sse(chunk([delta(i, "", role="assistant") for i in range(chat.n)], **ids))
            while (event := await self.next_event(job, events, deadline))[0] == "token":
                piece = texts[event[1]].add(event[2])
                if piece:
                    yield _sse(chunk([delta(event[1], piece)], **ids))
            result: Result = event[1]
            self.answered(result)
            for i, (text, choice) in enumerate(zip(texts, result.choices)):
                last = {"usage": usage(result), "pruning": result.pruning} if i == chat.n - 1 else {}
                yield _sse(chunk([delta(i, text.rest(choice.text), finish_reason=choice.finish_reason)], **ids,
                                 **last))
            if chat.include_usage:  # OpenAI's convention: one more chunk, no choices, the usage
                yield _sse(chunk([], **ids, usage=usage(result), pruning=result.pruning))
            yield "data: [DONE]\n\n"
        except APIError as e:  # the status line is sent already: the error goes in the stream
            yield _sse(e.body())
        finally:
            self.batcher.cancel(job)

    def count_tokens(self, request) -> int:
        with self._lock:
            return count_prompt_tokens(self.processor, self.model, request)

    def _decode(self, tokens: list[int]) -> str:
        with self._lock:
            return self.processor.decode(tokens, skip_special_tokens=True)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "ivcprune"}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read already: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(model, processor, config: ServeConfig) -> FastAPI:
    """The ASGI app serving ``model``; its batcher's worker runs between the app's startup and shutdown
    (shutdown first answers every request still waiting)."""
    server = Server(model, processor, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.batcher.stop)

    app = FastAPI(title="ivcprune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(RequestMetrics, metrics=server.metrics)
    _add_error_handlers(app)
    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: Server) -> None:
    @app.post(CHAT)
    async def chat_completions(request: Request):
        return await server.complete(request)

    @app.get("/v1/models")
    async def list_models(request: Request):
        server.check_key(request)
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        server.check_key(request)
        if model_id != server.config.model_name:
            raise APIError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")
        return server.model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.config.model_name, "waiting": server.batcher.waiting}

    @app.get("/metrics")
    async def metrics():
        text = server.metrics.render(server.batcher.waiting, server.batcher.running)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                              str(error.detail))
        return error_response(APIError(error.status_code, message))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}"))
