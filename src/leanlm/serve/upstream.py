"""`leanlm serve --upstream URL`: leanlm's front (keys, limits, checks, metrics, logs, and next its caches)
before any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, `transformers serve`).

Requests are checked by the same strict types as the local backends, then forwarded as the client sent
them; answers and event streams come back unchanged. At most `max_inflight` requests are forwarded at
once; past that the queue is refused with 429, as the local engines do."""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

import httpx

from leanlm.serve.errors import APIError
from leanlm.serve.protocol import ChatRequest


class UpstreamService:
    def __init__(self, url: str, metrics, api_key: str | None = None, max_inflight: int = 64,
                 request_timeout: float = 600.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(request_timeout, connect=10.0))
        self.metrics = metrics
        self.max_inflight, self.inflight = max_inflight, 0
        self._models: list[dict] | None = None

    def load(self) -> dict:
        return {"waiting": 0, "running": self.inflight, "slots": self.max_inflight}

    async def check(self) -> None:
        """Ask the upstream for its models (it must answer before leanlm says it is ready)."""
        try:
            reply = await self.client.get(f"{self.url}/models")
        except httpx.HTTPError as err:
            raise APIError(503, f"the upstream server {self.url} cannot be reached: {err}") from None
        if reply.status_code != 200:
            raise APIError(503, f"the upstream server {self.url} answered /models with {reply.status_code}")
        self._models = reply.json().get("data", [])

    def models(self) -> list[dict]:
        return self._models or []

    def cache_stats(self) -> dict:
        return {}

    async def handle(self, req, request, tenant: str, stats: dict):
        if self.inflight >= self.max_inflight:
            raise APIError(429, f"{self.inflight} requests are already forwarded (at most {self.max_inflight}); "
                                "retry shortly", headers={"Retry-After": "1"})
        path = "chat/completions" if isinstance(req, ChatRequest) else "completions"
        body = req.model_dump(exclude_unset=True)
        if req.stream:
            return self._stream(path, body, stats)
        self.inflight += 1
        try:
            reply = await self.client.post(f"{self.url}/{path}", json=body)
        except httpx.HTTPError as err:
            raise APIError(502, f"the upstream server failed: {type(err).__name__}: {err}") from None
        finally:
            self.inflight -= 1
        data = _json_or_error(reply)
        usage = data.get("usage") or {}
        stats["prompt_tokens"] = usage.get("prompt_tokens", 0)
        stats["completion_tokens"] = usage.get("completion_tokens", 0)
        stats.setdefault("first_token", time.perf_counter())
        return data

    async def _stream(self, path: str, body: dict, stats: dict) -> AsyncIterator[dict]:
        self.inflight += 1
        try:
            async with self.client.stream("POST", f"{self.url}/{path}", json=body) as reply:
                if reply.status_code != 200:
                    _json_or_error(httpx.Response(reply.status_code, content=await reply.aread()))
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    chunk = json.loads(payload)
                    for i, choice in enumerate(chunk.get("choices") or []):
                        text = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if text:
                            self.metrics.token_event(stats, {"type": "delta", "token": 0}, choice.get("index", i))
                    yield chunk
        except httpx.HTTPError as err:
            raise APIError(502, f"the upstream server failed mid-stream: {type(err).__name__}: {err}") from None
        except asyncio.CancelledError:
            raise
        finally:
            self.inflight -= 1

    async def close(self) -> None:
        await self.client.aclose()


def _json_or_error(reply: httpx.Response) -> dict:
    try:
        data = reply.json()
    except ValueError:
        raise APIError(502, f"the upstream server answered {reply.status_code} with a body that is not JSON") from None
    if reply.status_code != 200:
        message = (data.get("error") or {}).get("message") if isinstance(data.get("error"), dict) else data
        raise APIError(reply.status_code if reply.status_code < 500 else 502, f"upstream: {message}")
    return data
