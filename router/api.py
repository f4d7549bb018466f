"""The HTTP layer: FastAPI routes over a `router.server.Router` (OpenAI-compatible API,
health, metrics, Prometheus service discovery)."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from router import protocol as P

if TYPE_CHECKING:
    from router.server import Router

logger = logging.getLogger(__name__)


def _worker_failed(e: BaseException) -> P.APIError:
    logger.warning("request failed in a worker: %s", e)
    return P.APIError(503, f"a worker failed while serving the request ({type(e).__name__}); retry",
                      type="ServiceUnavailable", headers={"Retry-After": "1"})


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def build_app(router: Router) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    serve = router.serve

    @app.exception_handler(P.APIError)
    async def _api_error_handler(request: Request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if serve.api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {serve.api_key}".encode()):
                err = P.APIError(401, "invalid or missing API key", type="AuthenticationError")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        ok = router.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "workers": router.status()},
                            status_code=200 if ok else 503)

    @app.get("/version")
    async def version():
        from kv_transfer.protocol import pdserve_version

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
        """Prometheus http_sd: the router and every live worker's own endpoint."""
        host = request.url.netloc
        groups = [{"targets": [host], "labels": {"role": "router"}}]
        for role, pool in router.pools.items():
            for w in pool.values():
                groups.append({"targets": [w.info["metrics"]], "labels": {"role": role, "engine": w.worker_id}})
        return groups

    async def handle(request: Request, kind: str):
        arrival = time.monotonic()
        if serve.max_num_queued_requests is not None and router.queued >= serve.max_num_queued_requests:
            router.metrics.rejected.labels(router.model_name, "queue_full").inc()
            raise P.APIError(503, f"the server is at its limit of {serve.max_num_queued_requests} queued "
                             "requests; retry later", type="ServiceUnavailable", headers={"Retry-After": "1"})
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.bad_request(f"the request body is not valid JSON: {e}") from None
        parsed = P.parse_request(body, kind, serve.default_max_tokens)
        if parsed.model is not None and parsed.model != router.model_name:
            raise P.APIError(404, f"the model {parsed.model!r} does not exist; this server serves "
                             f"{router.model_name!r}", type="NotFoundError", param="model")
        ids = router.encode(parsed)
        router.queued += 1
        rid, created = P.new_id(kind), P.now()
        events = router.generate(parsed, ids, arrival)
        try:
            first = await anext(events)  # errors before the first token get a proper status
        except StopAsyncIteration:
            first = {"text": "", "token_ids": [], "finished": True, "finish_reason": "stop"}
        except P.APIError as e:
            if e.status >= 500:
                router.metrics.rejected.labels(router.model_name, "unavailable").inc()
            raise
        except Exception as e:  # a worker died or vanished before the first token
            router.metrics.rejected.labels(router.model_name, "worker_failed").inc()
            raise _worker_failed(e) from e
        finally:
            router.queued -= 1

        if not parsed.stream:
            text, n_out, reason = first["text"], len(first["token_ids"]), first["finish_reason"]
            try:
                async for item in events:
                    text += item["text"]
                    n_out += len(item["token_ids"])
                    reason = item["finish_reason"]
            except P.APIError:
                router.metrics.failed.labels(router.model_name, "worker_error").inc()
                raise
            except Exception as e:
                router.metrics.failed.labels(router.model_name, "worker_failed").inc()
                raise _worker_failed(e) from e
            router.metrics.success.labels(router.model_name, reason or "stop").inc()
            return JSONResponse(P.full_response(kind, rid, router.model_name, created, text, reason, len(ids),
                                                n_out))

        async def sse():
            n_out = 0
            reason = None
            try:
                is_first = True
                items = _chain(first, events)
                async for item in items:
                    n_out += len(item["token_ids"])
                    reason = item["finish_reason"] if item["finished"] else None
                    if item["text"] or item["finished"] or is_first:
                        yield _sse(P.stream_chunk(kind, rid, router.model_name, created, item["text"], reason,
                                                  first=is_first))
                        is_first = False
                router.metrics.success.labels(router.model_name, reason or "stop").inc()
                if parsed.include_usage:
                    yield _sse(P.usage_chunk(kind, rid, router.model_name, created, len(ids), n_out))
            except P.APIError as e:
                router.metrics.failed.labels(router.model_name, "worker_error").inc()
                yield _sse(e.body())
            except Exception as e:  # a worker died mid-stream: the client gets an explicit error chunk
                router.metrics.failed.labels(router.model_name, "worker_failed").inc()
                yield _sse(_worker_failed(e).body())
            finally:
                await events.aclose()  # client gone: cancels the Ray calls, frees the KV everywhere
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    return app


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item
