"""The HTTP layer: FastAPI routes over a `router.server.Router` (OpenAI-compatible API,
health, metrics, Prometheus service discovery, the admin API) and the limits every request
passes first (`_Guard`: header and body sizes, API and admin keys).

Every error, ours or the framework's (404, 405, an unexpected exception), is answered with
the OpenAI-style body `{"error": {"message", "type", "param", "code"}}`. The routes parse their
raw bodies themselves (so a bad body is our 400, never FastAPI's 422); the OpenAPI schema at
/openapi.json still describes the bodies, generated from the pydantic models in `router.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.engine.messages import StepItem
from pdserve.router import protocol as P
from pdserve.router import tools as T

if TYPE_CHECKING:
    from pdserve.engine.config import ServeConfig
    from pdserve.router.server import Router

logger = logging.getLogger(__name__)


def _worker_failed(e: BaseException) -> P.APIError:
    logger.warning("request failed in a worker: %s", e)
    return P.unavailable(f"a worker failed while serving the request ({type(e).__name__}); retry")


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _error_bytes(err: P.APIError) -> bytes:
    return json.dumps(err.body(), separators=(",", ":")).encode()  # ASCII-escaped: any message encodes


def _error_response(err: P.APIError) -> Response:
    return Response(_error_bytes(err), status_code=err.status, headers=err.headers, media_type="application/json")


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 405: "MethodNotAllowed", 413: "RequestTooLarge",
                431: "RequestHeaderFieldsTooLarge"}


# Paths outside /v1/ that the API key guards too: they spend the tokenizer's time.
_KEYED = ("/tokenize", "/detokenize")


class BodyTooLarge(P.APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes",
                         type="RequestTooLarge", headers={"Connection": "close"})


class _Guard:
    """Pure ASGI middleware, outermost, run before any route reads anything, in this order:

    - a request line and headers over `max_header_bytes` -> 431 (a header block still incomplete
      past uvicorn's `h11_max_incomplete_event_size` never gets here: h11 answers its own 400);
    - /v1/*, /tokenize and /detokenize without `Authorization: Bearer <api_key>` (when one is set) -> 401;
    - /admin/*: 403 while `admin_key` is unset, 401 without `Authorization: Bearer <admin_key>`;
    - a body over `max_request_body_bytes` -> 413: refused unread when Content-Length says so, else
      (chunked) counted while the route reads it; the read fails once over, so nothing is buffered
      past the limit, and the 413 closes the connection so the rest is never read either.

    Keys are compared in constant time (`hmac.compare_digest`)."""

    def __init__(self, app: ASGIApp, serve: ServeConfig):
        self.app = app
        self.max_body = serve.max_request_body_bytes
        self.max_headers = serve.max_header_bytes
        self.api_key = serve.api_key.encode() if serve.api_key else None
        self.admin_key = serve.admin_key.encode() if serve.admin_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        # what the HTTP server buffered: "METHOD target HTTP/1.1\r\n" and "name: value\r\n" per header
        size = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
        size += sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self.max_headers:
            return await self._refuse(send, P.APIError(
                431, f"the request line and headers total {size} bytes; this server's limit is {self.max_headers}",
                type="RequestHeaderFieldsTooLarge"))
        path = scope["path"]
        if path.startswith("/admin/") or path == "/admin":
            if self.admin_key is None:
                return await self._refuse(send, P.APIError(
                    403, "the admin API is disabled: set serve.admin_key", type="PermissionDeniedError"))
            if not _key_matches(headers, self.admin_key):
                return await self._refuse(send, P.APIError(401, "invalid or missing admin key",
                                                           type="AuthenticationError",
                                                           headers={"WWW-Authenticate": "Bearer"}))
        elif self.api_key is not None and (path.startswith("/v1/") or path in _KEYED) and \
                not _key_matches(headers, self.api_key):
            return await self._refuse(send, P.APIError(401, "invalid or missing API key", type="AuthenticationError",
                                                       headers={"WWW-Authenticate": "Bearer"}))
        length = _content_length(headers)
        if length is not None and length > self.max_body:
            return await self._refuse(send, BodyTooLarge(self.max_body))

        received = 0
        limit = self.max_body

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # the route's read fails; the exception handler answers 413
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # read outside a route (the exception handlers did not see it)
            if started:
                raise
            await self._refuse(send, e)

    @staticmethod
    async def _refuse(send: Send, err: P.APIError) -> None:
        body = _error_bytes(err)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _key_matches(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """`Authorization: Bearer <key>` (the scheme is case-insensitive); the key is compared in constant time."""
    scheme, _, token = next((v for k, v in headers if k == b"authorization"), b"").partition(b" ")
    return hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    raw = next((v for k, v in headers if k == b"content-length"), None)
    try:
        return int(raw) if raw is not None else None
    except ValueError:  # the HTTP server validates it; unparsable here means no usable length
        return None


async def _json_body(request: Request):
    raw = await request.body()  # bounded by _Guard
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, too deep, an int of > 4300 digits
        raise P.bad_request(f"the request body is not valid JSON: {e}") from None


def _json_content(schema: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _openapi(body: str | None, *errors: int) -> dict:
    """An operation's request body and error responses, for `openapi_extra`."""
    extra: dict = {"responses": {str(s): {"description": _ERROR_TYPES.get(s, "error"), "content": _json_content(
        "ErrorResponse")} for s in errors}}
    if body:
        extra["requestBody"] = {"required": True, "content": _json_content(body)}
    return extra


_RAW_SEND = "pdserve.raw_send"  # the scope key under which `serve_app` leaves the HTTP server's own `send`


def serve_app(router: Router) -> ASGIApp:
    """The ASGI app the HTTP server runs: `build_app`'s, with the server's own `send` left in the scope
    for `_SSEResponse`, which writes a stream's chunks past the framework's per-message wrappers."""
    app = build_app(router)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RAW_SEND] = send
        await app(scope, receive, send)

    return asgi


class _SSEResponse(Response):
    """A text/event-stream response over an async iterator of byte chunks, for the router's hottest path.

    Starlette's StreamingResponse, made cheaper per chunk: the response start goes through the framework's
    `send` (its middleware sees the response begin), the chunks straight to the HTTP server's (`serve_app`),
    past four wrapper coroutines per chunk that only watch for the start; and instead of a task group per
    response (AnyIO's), one plain task listens for the client's disconnect and then cancels the stream (whose
    `finally` aborts the request on the workers), as StreamingResponse does."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes]):
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no body: no content-length
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        raw = scope.get(_RAW_SEND, send)
        streaming = asyncio.current_task()
        sending, gone = True, False

        async def listen() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if sending:  # (after the last chunk, the server itself reports the response over as a disconnect)
                gone = True
                streaming.cancel()

        listener = asyncio.create_task(listen())
        try:
            try:
                async for chunk in self.chunks:
                    await raw({"type": "http.response.body", "body": chunk, "more_body": True})
                sending = False
                await raw({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                sending = False
                listener.cancel()
                await self.chunks.aclose()  # client gone: the stream's `finally` frees the request everywhere
        except asyncio.CancelledError:
            if not gone:
                raise
            streaming.uncancel()  # the client went away: this response is over, the server is not


def build_app(router: Router) -> FastAPI:
    serve = router.serve
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)  # /openapi.json stays on

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible completions and chat, health, metrics, admin")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(P.openapi_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(_Guard, serve=serve)

    @app.exception_handler(P.APIError)
    async def _api_error_handler(request: Request, exc: P.APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error_handler(request: Request, exc: StarletteHTTPException):
        return _error_response(P.APIError(exc.status_code, str(exc.detail), type=_ERROR_TYPES.get(
            exc.status_code, "error"), headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error_handler(request: Request, exc: RequestValidationError):
        return _error_response(P.bad_request(str(exc)))  # no route declares parameters; never FastAPI's 422

    @app.exception_handler(Exception)
    async def _unexpected_error_handler(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error_response(P.APIError(500, f"internal error ({type(exc).__name__})", type="InternalServerError"))

    @app.get("/health")
    async def health():
        ok = router.healthy()
        status = "ok" if ok else "draining" if not router.accepting else "unavailable"
        return JSONResponse({"status": status, "workers": router.status()},
                            status_code=200 if ok else 503)

    @app.get("/version")
    async def version():
        from pdserve.engine import pdserve_version

        return {"version": pdserve_version()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": router.model_name, "object": "model", "created": 0,
                                            "owned_by": "pdserve", "max_model_len": router.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/targets")
    async def targets(request: Request):
        """Prometheus http_sd: every router replica (this one as the client reached it) and every live worker's
        own endpoint."""
        host = request.url.netloc
        others = sorted({u.split("://", 1)[-1] for u in router.workers.replicas} - {router.advertised})
        groups = [{"targets": [host, *others], "labels": {"role": "router"}}]
        for role, pool in router.pools.items():
            for w in pool.values():
                groups.append({"targets": [w.info.metrics_url], "labels": {"role": role, "engine": w.worker_id}})
        return groups

    async def handle(request: Request, kind: str):
        call = await _admit(router, request, kind)
        first = await _first_item(router, call)
        if call.parsed.stream:
            return _SSEResponse(_sse_stream(router, call, first))
        return await _whole_response(router, request, call, first)

    v1_errors = (400, 401, 404, 413, 431, 503)

    @app.post("/v1/completions", openapi_extra=_openapi("CompletionRequest", *v1_errors))
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=_openapi("ChatCompletionRequest", *v1_errors))
    async def chat(request: Request):
        return await handle(request, "chat")

    def check_model(model: str | None) -> None:
        if model is not None and model != router.model_name:
            raise P.APIError(404, f"the model {model!r} does not exist; this server serves {router.model_name!r}",
                             type="NotFoundError", param="model")

    @app.post("/tokenize", openapi_extra=_openapi("TokenizeRequest", 400, 404, 413, 431))
    async def tokenize(request: Request):
        """vLLM's: a prompt's token ids (chat messages through the chat template), tokenized off the event loop."""
        req = P.parse_tokenize(await _json_body(request))
        check_model(req.model)
        ids = await router.tokenize_only(req)
        return {"count": len(ids), "max_model_len": router.max_model_len, "tokens": ids}

    @app.post("/detokenize", openapi_extra=_openapi("DetokenizeRequest", 400, 404, 413, 431))
    async def detokenize(request: Request):
        req = P.validate(P.DetokenizeRequest, await _json_body(request))
        check_model(req.model)
        return {"prompt": await router.detokenize(req.tokens)}

    @app.post("/admin/scale", openapi_extra=_openapi("ScaleRequest", 400, 401, 403, 413, 431))
    async def admin_scale(request: Request):
        """Grow or shrink the pools (`Authorization: Bearer <serve.admin_key>`); answers the new status."""
        req = P.validate(P.ScaleRequest, await _json_body(request))
        try:
            return await router.scale(req.prefill, req.decode)
        except ValueError as e:  # a size the mode cannot run with
            raise P.bad_request(str(e)) from None

    @app.get("/admin/status", openapi_extra=_openapi(None, 401, 403, 431))
    async def admin_status():
        return router.status()

    return app


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Call:
    """One completion call on its way through the router."""

    kind: str  # "completion" or "chat"
    parsed: P.ParsedRequest
    ids: list[int]
    # The router's stream for it: `StepItem`s of its one choice (n = 1: `Router.generate`, one async generator
    # fewer per token), else (choice index, item) (`Router.generate_choices`); `_next` reads either.
    events: AsyncIterator
    rid: str
    created: int
    echo_text: str | None = None  # completions' echo: the prompt's text, before each choice's

    @property
    def indexed(self) -> bool:
        return self.parsed.n > 1


async def _next(call: _Call) -> tuple[int, StepItem]:
    """The call's next (choice index, item); StopAsyncIteration at its end."""
    got = await call.events.__anext__()
    return got if call.indexed else (0, got)


async def _items(call: _Call, first: tuple[int, StepItem]):
    """`first`, then the rest of the call's (choice index, item)s."""
    yield first
    if call.indexed:
        async for got in call.events:
            yield got
    else:
        async for item in call.events:
            yield 0, item


class _LogprobsBody:
    """A call's logprobs in OpenAI's shape, piece by piece as they stream (completions' `text_offset` runs on
    across pieces). A token's text is its own decoding, as in vLLM."""

    def __init__(self, router: Router, call: _Call):
        self.kind = call.kind
        self.asked = call.parsed.params.logprobs is not None
        self.tokenizer = router.tokenizer
        self.offset = 0

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def of(self, entries) -> dict | None:
        if not self.asked:
            return None
        entries = list(entries or ())
        if self.kind == "chat":
            return P.chat_logprobs(entries, self.token_text)
        body = P.completion_logprobs(entries, self.token_text, self.offset)
        self.offset += sum(len(t) for t in body["tokens"])
        return body

    def with_echo(self, prompt_ids: list[int], prompt_entries, entries) -> dict | None:
        """`of(entries)` after the echoed prompt's logprobs (the first piece of a choice that echoes)."""
        if not self.asked:
            return None
        head = P.echo_logprobs(prompt_ids, list(prompt_entries or ()), self.token_text)
        self.offset = sum(len(t) for t in head["tokens"])
        tail = self.of(entries)
        return {k: head[k] + tail[k] for k in head}


class _ToolOutput:
    """A chat call's text split into content and tool calls (`router.tools`), piece by piece as it streams:
    "auto" parses Hermes `<tool_call>` blocks, "forced" holds the whole output and parses it at the end."""

    def __init__(self, parsed: P.ParsedRequest):
        self.mode, self.name = parsed.tool_mode, parsed.tool_name
        self.stream = T.ToolCallStream() if self.mode == "auto" else None
        self.held: list[str] = []
        self.num_calls = 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict]]:
        """(content, tool call deltas with their `index`) for the next piece of text."""
        if self.mode == "none":
            return text, []
        if self.stream is not None:
            content, calls = self.stream.feed(text)
            if finished:
                more, last = self.stream.finish()
                content, calls = content + more, calls + last
        else:
            self.held.append(text)
            content, calls = "", []
            if finished:
                whole = "".join(self.held)
                calls = T.parse_forced(whole, self.name)
                content = "" if calls else whole  # cut short (max_tokens): the text as it is
        deltas = [{"index": self.num_calls + i, **c} for i, c in enumerate(calls)]
        self.num_calls += len(calls)
        return content, deltas

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.num_calls and reason in ("stop", "length", None) else reason


async def _admit(router: Router, request: Request, kind: str) -> _Call:
    """The checks before a call runs (draining, the queue bound, the body, the model), then tokenizing."""
    arrival = time.monotonic()
    serve, m = router.serve, router.metrics
    if not router.accepting:  # draining for shutdown
        m.rejected.labels(router.model_name, "draining").inc()
        raise P.unavailable("the server is shutting down; retry on another replica")
    if serve.max_num_queued_requests is not None and router.queued >= serve.max_num_queued_requests:
        m.rejected.labels(router.model_name, "queue_full").inc()
        raise P.unavailable(f"the server is at its limit of {serve.max_num_queued_requests} queued requests; "
                            "retry later", router.drain_rate.retry_after(router.queued))
    # Queued from the check on, across the awaits below (the body, tokenizing on its own thread): requests
    # arriving meanwhile see it, so the bound holds under a burst. `_first_item` ends its stay.
    router.queued += 1
    try:
        parsed = P.parse_request(await _json_body(request), kind, serve.default_max_tokens,
                                 (serve.min_client_priority, serve.max_client_priority), serve.max_n)
        if parsed.model is not None and parsed.model != router.model_name:
            raise P.APIError(404, f"the model {parsed.model!r} does not exist; this server serves "
                             f"{router.model_name!r}", type="NotFoundError", param="model")
        ids = await router.tokenize(parsed)
        echo = None
        if parsed.echo:  # the prompt as sent, or its ids decoded (on the tokenizer's thread)
            echo = parsed.prompt if isinstance(parsed.prompt, str) else await router.detokenize(ids)
    except BaseException:  # refused (4xx), or the client went away while it was being read or tokenized
        router.queued -= 1
        raise
    events = router.generate(parsed, ids, arrival) if parsed.n == 1 else router.generate_choices(parsed, ids, arrival)
    return _Call(kind, parsed, ids, events, P.new_id(kind), P.now(), echo)


async def _first_item(router: Router, call: _Call) -> tuple[int, StepItem]:
    """The call's first item: an error before it still gets a proper HTTP status. The call leaves the
    router's queue (counted since `_admit`) when it comes."""
    try:
        return await _next(call)
    except StopAsyncIteration:
        return 0, StepItem(finished=True, finish_reason="stop")
    except P.APIError as e:
        if e.status >= 500:
            router.metrics.rejected.labels(router.model_name, "unavailable").inc()
        raise
    except Exception as e:  # a worker died or vanished before the first token
        router.metrics.rejected.labels(router.model_name, "worker_failed").inc()
        raise _worker_failed(e) from e
    finally:
        router.queued -= 1
        router.drain_rate.departed()


async def _whole_response(router: Router, request: Request, call: _Call, first: tuple[int, StepItem]) -> Response:
    """A non-streaming answer; a client that disconnects meanwhile stops the generation everywhere."""
    n = call.parsed.n
    text, reason = [""] * n, [None] * n
    logprobs: list[list] = [[] for _ in range(n)]
    n_out = 0
    prompt_logprobs = None

    async def collect() -> None:
        nonlocal n_out, prompt_logprobs
        async for i, item in _items(call, first):
            prompt_logprobs = prompt_logprobs or item.prompt_logprobs
            text[i] += item.text
            n_out += len(item.token_ids)
            reason[i] = item.finish_reason
            logprobs[i].extend(item.logprobs or ())

    consume = asyncio.create_task(collect())
    gone = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait({consume, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not consume.done():  # the client went away: stop generating, free the KV everywhere
            consume.cancel()
            with contextlib.suppress(BaseException):
                await consume
            await call.events.aclose()
            router.metrics.failed.labels(router.model_name, "client_disconnected").inc()
            return Response(status_code=499)
        consume.result()
    except P.APIError:
        router.metrics.failed.labels(router.model_name, "worker_error").inc()
        raise
    except Exception as e:
        router.metrics.failed.labels(router.model_name, "worker_failed").inc()
        raise _worker_failed(e) from e
    finally:
        gone.cancel()
    body, reasons = None, []
    for i in range(n):  # one body per choice, merged: choice i at index i, usage over all of them
        lp = _LogprobsBody(router, call)
        tools = _ToolOutput(call.parsed)
        content, calls = tools.feed(text[i], True)
        why = tools.finish_reason(reason[i])
        reasons.append(why)
        for c in calls:
            del c["index"]
        if call.echo_text is None:
            one = P.full_response(call.kind, call.rid, router.model_name, call.created,
                                  None if calls and not content.strip() else content, why, len(call.ids), n_out,
                                  lp.of(logprobs[i]), calls)
        else:  # completions' echo (no tools there)
            one = P.full_response(call.kind, call.rid, router.model_name, call.created, call.echo_text + text[i],
                                  why, len(call.ids), n_out, lp.with_echo(call.ids, prompt_logprobs, logprobs[i]))
        one["choices"][0]["index"] = i
        if body is None:
            body = one
        else:
            body["choices"].append(one["choices"][0])
    router.metrics.success.labels(router.model_name, reasons[0] or "stop").inc()
    return JSONResponse(body)


async def _sse_stream(router: Router, call: _Call, first: tuple[int, StepItem]):
    """The SSE body: a chunk per item with text (and each choice's first and last), usage if asked, an
    error chunk if a worker fails mid-stream, then [DONE]. Choices interleave, each chunk naming its index."""
    n_out = 0
    reason = None
    model = router.model_name
    n = call.parsed.n
    logprobs = [_LogprobsBody(router, call) for _ in range(n)]
    tools = [_ToolOutput(call.parsed) for _ in range(n)]
    plain = [P.TextChunks(call.kind, call.rid, model, call.created, index=i) for i in range(n)]
    prompt_logprobs = None
    events, pending, indexed, i = call.events, first, call.indexed, 0
    try:
        is_first = [True] * n
        while True:  # as `async for i, item in _items(call, first)`, without its async generator per chunk
            if pending is not None:
                (i, item), pending = pending, None
            else:
                try:
                    item = await events.__anext__()
                except StopAsyncIteration:
                    break
                if indexed:
                    i, item = item
            n_out += len(item.token_ids)
            if tools[i].mode == "none" and not (item.finished or is_first[i] or item.logprobs):
                if item.text:  # the common chunk: text only
                    yield plain[i](item.text)
                continue
            text, calls = tools[i].feed(item.text, item.finished)
            reason = tools[i].finish_reason(item.finish_reason) if item.finished else None
            prompt_logprobs = prompt_logprobs or item.prompt_logprobs
            if is_first[i] and call.echo_text is not None:  # the echoed prompt leads each choice
                chunk = P.stream_chunk(call.kind, call.rid, model, call.created, call.echo_text + text, reason,
                                       first=True, logprobs=logprobs[i].with_echo(call.ids, prompt_logprobs,
                                                                                  item.logprobs))
            elif text or calls or item.finished or is_first[i] or item.logprobs:
                chunk = P.stream_chunk(call.kind, call.rid, model, call.created, text, reason, first=is_first[i],
                                       logprobs=logprobs[i].of(item.logprobs), tool_calls=calls)
            else:
                chunk = None
            if chunk is not None:
                chunk["choices"][0]["index"] = i
                yield _sse(chunk)
                is_first[i] = False
        router.metrics.success.labels(model, reason or "stop").inc()
        if call.parsed.include_usage:
            yield _sse(P.usage_chunk(call.kind, call.rid, model, call.created, len(call.ids), n_out))
    except P.APIError as e:
        router.metrics.failed.labels(model, "worker_error").inc()
        yield _sse(e.body())
    except Exception as e:  # a worker died mid-stream: the client gets an explicit error chunk
        router.metrics.failed.labels(model, "worker_failed").inc()
        yield _sse(_worker_failed(e).body())
    finally:
        await call.events.aclose()  # client gone: cancels the Ray calls, frees the KV everywhere
    yield b"data: [DONE]\n\n"
