"""The response cache in front of a service (local engine or upstream): a hit is answered without the
model (as JSON, or replayed as the same event stream a generation would send); a miss goes through, and
its complete answer is stored before it is acknowledged.

`Cache-Control: no-cache` on a request skips the lookup (the fresh answer is still stored);
`no-store` skips both. Requests whose answer is not determined (temperature > 0 without a seed) and
requests for logprobs are never cached. The store runs in a worker thread, off the event loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from leanlm.serve.protocol import ChatRequest


class CachedService:
    def __init__(self, inner, cache, metrics):
        self.inner, self.cache, self.metrics = inner, cache, metrics
        self.engine = getattr(inner, "engine", None)

    def models(self) -> list[dict]:
        return self.inner.models()

    def cache_stats(self) -> dict:
        return {**self.inner.cache_stats(), "response": self.cache.stats()}

    async def handle(self, req, request, tenant: str, stats: dict):
        endpoint = "chat" if isinstance(req, ChatRequest) else "completions"
        key_fields = req.model_dump(exclude_none=True)
        control = (request.headers.get("cache-control", "") if request is not None else "").lower()
        read = "no-cache" not in control and "no-store" not in control
        write = "no-store" not in control
        if not self.cache.cacheable(key_fields):
            stats["cache"] = "bypass"
            return await self.inner.handle(req, request, tenant, stats)
        if read:
            answer, tier = await asyncio.to_thread(self.cache.lookup, tenant, endpoint, key_fields)
            self.metrics.cache_result(tier)
            if answer is not None:
                stats["cache"] = f"hit-{tier}"
                usage = answer.get("usage") or {}
                stats["prompt_tokens"] = usage.get("prompt_tokens", 0)
                stats["completion_tokens"] = usage.get("completion_tokens", 0)
                stats["first_token"] = time.perf_counter()
                answer = {**answer, "id": _fresh_id(answer), "created": int(time.time())}
                return _replay(answer, req) if req.stream else answer
        stats["cache"] = "miss"
        start = time.perf_counter()
        result = await self.inner.handle(req, request, tenant, stats)
        if not write:
            return result
        if isinstance(result, dict):
            if all(c.get("finish_reason") in ("stop", "length") for c in result["choices"]):
                await asyncio.to_thread(self.cache.remember, tenant, endpoint, key_fields, result,
                                        time.perf_counter() - start)
            return result
        return self._store_stream(result, req, tenant, endpoint, key_fields, start)

    async def _store_stream(self, chunks: AsyncIterator[dict], req, tenant, endpoint, key_fields, start):
        """Pass the stream on; once it ended well, store the whole answer it spelled out."""
        chat = isinstance(req, ChatRequest)
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        usage, last = None, None
        async for chunk in chunks:
            last = chunk
            for c in chunk.get("choices") or []:
                i = c["index"]
                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                texts[i] = texts.get(i, "") + (piece or "")
                if c.get("finish_reason"):
                    reasons[i] = c["finish_reason"]
            usage = chunk.get("usage") or usage
            yield chunk
        if last is None or not reasons or any(r not in ("stop", "length") for r in reasons.values()):
            return
        if len(reasons) < req.n:
            return
        choices = [({"index": i, "message": {"role": "assistant", "content": texts.get(i, "")}, "logprobs": None,
                     "finish_reason": reasons[i]} if chat else
                    {"index": i, "text": texts.get(i, ""), "logprobs": None, "finish_reason": reasons[i]})
                   for i in sorted(reasons)]
        answer = {"id": last["id"], "object": "chat.completion" if chat else "text_completion",
                  "created": last["created"], "model": last["model"], "choices": choices,
                  "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
        await asyncio.to_thread(self.cache.remember, tenant, endpoint, key_fields, answer, time.perf_counter() - start)


def _fresh_id(answer: dict) -> str:
    prefix = "chatcmpl-" if answer.get("object") == "chat.completion" else "cmpl-"
    return prefix + uuid.uuid4().hex[:24]


async def _replay(answer: dict, req) -> AsyncIterator[dict]:
    """A stored answer as the stream a generation would have sent."""
    chat = answer["object"] == "chat.completion"
    kind = "chat.completion.chunk" if chat else "text_completion"
    usage_wanted = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices, usage=None):
        out = {"id": answer["id"], "object": kind, "created": answer["created"], "model": answer["model"],
               "choices": choices}
        if usage_wanted:
            out["usage"] = usage
        return out
    for c in answer["choices"]:
        i = c["index"]
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": i, "delta": {"content": c["message"]["content"]}, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}])
        else:
            yield chunk([{"index": i, "text": c["text"], "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}])
    if usage_wanted:
        yield chunk([], answer.get("usage"))
