"""A load generator on the async `openai` client: a chat workload replayed at fixed concurrency levels.

The workload: a shared system prompt (as a support bot or tutor has), questions written like a user's
plus passages of the built-in corpus to explain, and output lengths drawn from a log-normal distribution
(most answers short, a few long), all from a seed so two servers see the same requests. Each request
streams, so time to first token and the gaps between tokens are what the client saw."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass

SYSTEM = ("You are a concise assistant for a Python documentation help desk. Answer in plain words, "
          "with a short example when it helps.")
QUESTIONS = ["How do I reverse a list?", "What does a with statement do?", "Why is my dict ordered?",
             "How do I read a file line by line?", "What is the difference between a tuple and a list?",
             "How do I format a float to two decimals?", "When should I use a generator?",
             "How do I catch two exceptions in one except?", "What does `yield from` do?",
             "How do I sort a list of dicts by a key?", "What is a decorator?", "How do I merge two dicts?"]


@dataclass
class Workload:
    requests: int = 64
    seed: int = 0
    mean_tokens: int = 64
    max_tokens: int = 256

    def build(self) -> list[dict]:
        from leanlm.data.corpus import default_corpus

        rng = random.Random(self.seed)
        text = default_corpus().eval
        out = []
        for _ in range(self.requests):
            if rng.random() < 0.5:
                question = rng.choice(QUESTIONS)
            else:
                start = rng.randrange(0, max(1, len(text) - 800))
                question = "Explain this passage briefly:\n" + text[start:start + rng.randint(200, 800)]
            # log-normal lengths: median ~0.8x the mean, a long tail, capped
            tokens = int(min(self.max_tokens, max(4, rng.lognormvariate(math.log(self.mean_tokens) - 0.2, 0.6))))
            out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                        "max_tokens": tokens})
        return out


async def _one(client, model: str, req: dict, record: list) -> None:
    import openai

    start = time.perf_counter()
    times, tokens, status = [], None, 200
    try:
        stream = await client.chat.completions.create(model=model, stream=True, temperature=0.0,
                                                      stream_options={"include_usage": True}, **req)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as err:
        status = err.status_code
    except openai.APIConnectionError:
        status = 0  # no HTTP answer at all
    # a server that sends no usage (llama_cpp.server ignores include_usage): one content chunk per token
    record.append({"status": status, "start": start, "end": time.perf_counter(), "times": times,
                   "tokens": tokens if tokens is not None else len(times)})


async def _level(url: str, model: str, api_key: str, work: list[dict], concurrency: int, timeout: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1" if not url.rstrip("/").endswith("/v1") else url,
                                api_key=api_key or "none", max_retries=0, timeout=timeout)
    record: list = []
    queue = list(work)
    start = time.perf_counter()

    async def worker():
        while queue:
            await _one(client, model, queue.pop(0), record)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return summarize(record, wall, concurrency)


def summarize(record: list, wall: float, concurrency: int) -> dict:
    ok = [r for r in record if r["status"] == 200]
    ttft = sorted(r["times"][0] - r["start"] for r in ok if r["times"])
    gaps = sorted(b - a for r in ok for a, b in zip(r["times"], r["times"][1:]))
    errors: dict[str, int] = {}
    for r in record:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return {"concurrency": concurrency, "requests": len(record), "ok": len(ok), "seconds": wall,
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "itl_p50_s": _pct(gaps, 50),
            "itl_p99_s": _pct(gaps, 99), "errors": errors}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else values[-1]


def loadtest(url: str, model: str | None = None, concurrency: list[int] = (1, 8), requests: int = 32,
             mean_tokens: int = 64, max_tokens: int = 256, seed: int = 0, api_key: str | None = None,
             timeout: float = 600.0, warmup: int = 2) -> list[dict]:
    """Run the workload at each concurrency level; one summary row per level."""
    import httpx

    base = url.rstrip("/")
    if model is None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = httpx.get(f"{base.removesuffix('/v1')}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    work = Workload(requests, seed, mean_tokens, max_tokens).build()
    if warmup:
        asyncio.run(_level(base, model, api_key, work[:warmup], 1, timeout))
    return [asyncio.run(_level(base, model, api_key, work, c, timeout)) for c in concurrency]


def format_table(rows: list[dict]) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"
    lines = [f"{'conc':>4} {'ok/req':>9} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
             f"{'ITL p50':>8} {'ITL p99':>8}  errors"]
    for r in rows:
        lines.append(f"{r['concurrency']:>4} {r['ok']:>4}/{r['requests']:<4} {r['requests_per_s']:>7.2f} "
                     f"{r['output_tokens_per_s']:>9.1f} {ms(r['ttft_p50_s']):>7}ms {ms(r['ttft_p99_s']):>7}ms "
                     f"{ms(r['itl_p50_s']):>6}ms {ms(r['itl_p99_s']):>6}ms  {r['errors'] or '-'}")
    return "\n".join(lines)
