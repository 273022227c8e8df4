"""OpenAI's chat and text completions answered by an in-process engine (leanlm's batching one or llama.cpp):
the request checked and tokenized, its sequences submitted, the engine's events turned into one JSON
response or into server-sent-event chunks exactly as the official clients parse them.

The response cache (the next layer) sits in front of `LocalService.handle`: it sees the parsed request
and either answers it or lets it through."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from leanlm.serve.errors import APIError
from leanlm.serve.protocol import ChatRequest, CompletionRequest
from leanlm.serve.sequence import SamplingParams, Sequence
from leanlm.serve.text import message_text, render_chat


@dataclass
class Limits:
    max_n: int = 8
    request_timeout: float = 600.0


class LocalService:
    def __init__(self, engine, model_name: str, limits: Limits, metrics, compressor=None):
        self.engine, self.model_name, self.limits, self.metrics = engine, model_name, limits, metrics
        self.tokenizer = engine.tokenizer
        self.compressor = compressor  # serve.compress_context.ContextCompressor, with --compress-context

    def models(self) -> list[dict]:
        return [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "leanlm"}]

    def cache_stats(self) -> dict:
        prefix = getattr(self.engine, "prefix", None)
        return {"prefix": prefix.stats()} if prefix is not None else {}

    # the request, checked and tokenized
    def prepare(self, req: ChatRequest | CompletionRequest, stats: dict | None = None) -> tuple[list[list[int]], SamplingParams]:
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {self.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        if req.n > self.limits.max_n:
            raise APIError(400, f"n is {req.n}; this server returns at most {self.limits.max_n} choices", param="n")
        prompts = self._prompts(req, stats if stats is not None else {})
        longest = max(len(p) for p in prompts)
        room = self.engine.max_len - longest
        limit = req.token_limit()
        if room < 1 or (limit is not None and limit > room):
            asked = f" plus max_tokens {limit}" if limit is not None else ""
            raise APIError(400, f"the prompt is {longest} tokens{asked}, more than this model's context of "
                                f"{self.engine.max_len} tokens allows; shorten the prompt or ask for fewer tokens",
                           param="messages" if isinstance(req, ChatRequest) else "prompt", code="context_length_exceeded")
        top = (req.top_logprobs or 0) if isinstance(req, ChatRequest) else (req.logprobs or 0)
        wants = bool(req.logprobs) if isinstance(req, ChatRequest) else req.logprobs is not None
        params = SamplingParams(max_tokens=limit or room, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                stop=req.stop_list(), logprobs=wants, top_logprobs=top)
        return prompts, params

    def _prompts(self, req, stats: dict) -> list[list[int]]:
        if isinstance(req, ChatRequest):
            messages = [{"role": m.role, "content": message_text(m.content or "", i)} for i, m in enumerate(req.messages)]
            if self.compressor is not None:
                messages, stats["compressed"] = self.compressor.chat(messages, self.model_name)
            text = render_chat(self.tokenizer, messages, self.model_name)
            return [self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"prompt holds token ids outside this model's vocabulary (0..{vocab - 1})", param="prompt")
            return [list(prompt)]
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not texts or any(not t for t in texts):
            raise APIError(400, "prompt is empty", param="prompt")
        if self.compressor is not None:
            texts, infos = zip(*(self.compressor.text(t) for t in texts))
            done = [i for i in infos if i]
            if done:
                stats["compressed"] = {k: sum(i[k] for i in done) for k in ("before", "after")}
        return [self.tokenizer(t)["input_ids"] for t in texts]

    # running it
    def start(self, prompts: list[list[int]], params: SamplingParams, n: int) -> tuple[list[Sequence], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs = []
        for p, ids in enumerate(prompts):
            for k in range(n):
                index = p * n + k

                def sink(event, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                seqs.append(Sequence(ids, params, self.tokenizer, self.engine.eos_ids, sink, index=index))
        self.engine.submit(seqs)
        return seqs, queue

    async def events(self, seqs: list[Sequence], queue: asyncio.Queue, request) -> AsyncIterator[tuple[int, dict]]:
        """The sequences' events until all are done; cancels them if the client leaves or the time runs out."""
        open_ = len(seqs)
        deadline = time.monotonic() + self.limits.request_timeout
        try:
            while open_:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(504, f"the request ran past this server's limit of {self.limits.request_timeout:g}s")
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=min(left, 1.0))
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if event["type"] == "error":
                    raise APIError(500, event["message"])
                if event["type"] == "done":
                    open_ -= 1
                yield index, event
        finally:
            if open_:
                self.engine.cancel(seqs)

    async def handle(self, req, request, tenant: str, stats: dict):
        if self.compressor is None:
            prompts, params = self.prepare(req, stats)
        else:  # compressing is a forward pass: off the event loop, so other requests keep streaming
            prompts, params = await asyncio.to_thread(self.prepare, req, stats)
        if stats.get("compressed"):
            self.metrics.compressed(stats["compressed"])
        seqs, queue = self.start(prompts, params, req.n)
        stats["prompt_tokens"] = sum(len(p) for p in prompts)
        if req.stream:
            return self._stream(req, seqs, queue, request, stats)
        return await self._collect(req, seqs, queue, request, stats)

    async def _collect(self, req, seqs, queue, request, stats) -> dict:
        chat = isinstance(req, ChatRequest)
        choices = [{"text": "", "finish_reason": None, "tokens": []} for _ in seqs]
        completion = 0
        async for index, event in self.events(seqs, queue, request):
            self.metrics.token_event(stats, event, index)
            c = choices[index]
            if event["type"] == "delta":
                c["text"] += event["text"]
                if "logprob" in event:
                    c["tokens"].append(event)
            else:
                c["finish_reason"] = event["finish_reason"]
                completion += event["completion_tokens"]
        stats["completion_tokens"] = completion
        usage = {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": completion,
                 "total_tokens": stats["prompt_tokens"] + completion}
        rid, created = _id(chat), int(time.time())
        if chat:
            body = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                     "logprobs": {"content": [self._chat_logprob(t) for t in c["tokens"]]} if req.logprobs else None,
                     "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": body, "usage": usage, "system_fingerprint": None}
        body = [{"index": i, "text": c["text"], "logprobs": self._text_logprobs(c["tokens"]) if req.logprobs is not None else None,
                 "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)]
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": body, "usage": usage}

    async def _stream(self, req, seqs, queue, request, stats) -> AsyncIterator[dict]:
        chat = isinstance(req, ChatRequest)
        rid, created = _id(chat), int(time.time())
        usage_wanted = bool(req.stream_options and req.stream_options.include_usage)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, usage=None):
            out = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices}
            if usage_wanted:
                out["usage"] = usage
            return out
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(seqs))])
        completion = 0
        async for index, event in self.events(seqs, queue, request):
            self.metrics.token_event(stats, event, index)
            if event["type"] == "delta":
                if not event["text"] and "logprob" not in event:
                    continue  # held back (an incomplete character or a possible stop string)
                yield chunk([self._delta(req, chat, index, event)])
            else:
                completion += event["completion_tokens"]
                end = {"index": index, "finish_reason": event["finish_reason"], "logprobs": None}
                end.update({"delta": {}} if chat else {"text": ""})
                yield chunk([end])
        stats["completion_tokens"] = completion
        if usage_wanted:
            yield chunk([], {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": completion,
                             "total_tokens": stats["prompt_tokens"] + completion})

    def _delta(self, req, chat: bool, index: int, event: dict) -> dict:
        if chat:
            logprobs = {"content": [self._chat_logprob(event)]} if req.logprobs and "logprob" in event else None
            return {"index": index, "delta": {"content": event["text"]}, "logprobs": logprobs, "finish_reason": None}
        logprobs = self._text_logprobs([event]) if req.logprobs is not None and "logprob" in event else None
        return {"index": index, "text": event["text"], "logprobs": logprobs, "finish_reason": None}

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat_logprob(self, event: dict) -> dict:
        piece = self._piece(event["token"])
        return {"token": piece, "logprob": event["logprob"], "bytes": list(piece.encode()),
                "top_logprobs": [{"token": self._piece(t), "logprob": lp, "bytes": list(self._piece(t).encode())}
                                 for t, lp in event.get("top", [])]}

    def _text_logprobs(self, events: list[dict]) -> dict:
        return {"tokens": [self._piece(e["token"]) for e in events], "token_logprobs": [e["logprob"] for e in events],
                "top_logprobs": [{self._piece(t): lp for t, lp in e.get("top", [])} for e in events],
                "text_offset": []}


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
