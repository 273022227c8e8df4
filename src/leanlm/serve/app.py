"""The HTTP layer: OpenAI's routes, API keys, body limits, errors in OpenAI's format, server-sent events,
/metrics, /stats, /health and the playground page at /. What answers a request is a service (an
in-process engine, or an upstream server); this module only speaks HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from leanlm.serve.errors import APIError
from leanlm.serve.protocol import ChatRequest, CompletionRequest, parse_request

log = logging.getLogger("leanlm.serve")


class State:
    """What the routes read: the service once it is ready, the keys, the limits."""

    def __init__(self, metrics, keys: dict[str, str] | None, max_body: int):
        self.service = None
        self.metrics, self.keys, self.max_body = metrics, keys, max_body


def create_app(state: State, on_start=None) -> FastAPI:
    """`on_start`: an async function run as a task once the server listens (the engine's warm-up)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(on_start()) if on_start else None
        yield
        if task is not None and not task.done():
            task.cancel()

    app = FastAPI(title="leanlm serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.leanlm = state

    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        _tenant(state, request)
        return {"object": "list", "data": _service(state).models()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(state, request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(state, request, CompletionRequest, "completions")

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats():
        caches = await asyncio.to_thread(state.service.cache_stats) if state.service else {}
        return {**state.metrics.summary(), "ready": state.service is not None,
                "model": state.service.models()[0]["id"] if state.service else None, "cache": caches}

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files("leanlm.serve").joinpath("page.html").read_text())

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's format, whatever raised it."""
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(APIError(400, str(err)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}").body(), status_code=500)


def _service(state: State):
    if state.service is None:
        raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
    return state.service


def _tenant(state: State, request: Request) -> str:
    if not state.keys:
        return "default"
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not key:
        raise APIError(401, "this server needs an API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    tenant = state.keys.get(key)
    if tenant is None:
        raise APIError(401, "the API key is not valid for this server", code="invalid_api_key")
    return tenant


async def _body(state: State, request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > state.max_body:
        raise APIError(413, f"the request body is {int(declared)} bytes; this server takes at most {state.max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body:
            raise APIError(413, f"the request body is over this server's limit of {state.max_body} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _complete(state: State, request: Request, kind, endpoint: str):
    stats = {"start": time.perf_counter()}
    status, tenant = 500, "-"
    streaming = False
    try:
        tenant = _tenant(state, request)
        service = _service(state)
        req = parse_request(kind, await _body(state, request))
        result = await service.handle(req, request, tenant, stats)
        headers = {"X-LeanLM-Cache": stats["cache"]} if "cache" in stats else {}
        if isinstance(result, dict):
            status = 200
            return JSONResponse(result, headers=headers)
        streaming, status = True, 200
        return StreamingResponse(_sse(result, state, endpoint, tenant, stats), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    except APIError as err:
        status = err.status
        raise
    finally:
        if not streaming:
            _finish(state, endpoint, status, tenant, stats)


async def _sse(chunks: AsyncIterator[dict], state: State, endpoint: str, tenant: str, stats: dict):
    status = 200
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as err:  # after the headers went out, an error can only be an event
        status = err.status
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        await chunks.aclose()
        _finish(state, endpoint, status, tenant, stats)


def _finish(state: State, endpoint: str, status: int, tenant: str, stats: dict) -> None:
    state.metrics.done(endpoint, status, stats)
    ttft = stats.get("first_token")
    log.info("%s %d tenant=%s cache=%s prompt_tokens=%s completion_tokens=%s ttft_ms=%s total_ms=%.0f", endpoint,
             status, tenant, stats.get("cache", "-"), stats.get("prompt_tokens", "-"), stats.get("completion_tokens", "-"),
             f"{(ttft - stats['start']) * 1000:.0f}" if ttft else "-", (time.perf_counter() - stats["start"]) * 1000)
