"""What the server measures about itself, in Prometheus' format (GET /metrics) and as JSON for the page
(GET /stats): requests by status, queue depth, running sequences, batch sizes, time to first token,
inter-token latency, tokens in and out, and output tokens/s over the last 10 seconds.

Each server has its own registry, so several servers in one process (tests) do not collide."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, load=lambda: {"waiting": 0, "running": 0, "slots": 0}):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("leanlm_requests", "requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("leanlm_request_seconds", "time from request to last byte", ["endpoint"],
                                 buckets=LATENCY, registry=r)
        self.ttft = Histogram("leanlm_time_to_first_token_seconds", "time from request to its first token",
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("leanlm_inter_token_seconds", "time between two tokens of one sequence",
                             buckets=LATENCY, registry=r)
        self.prompt_tokens = Counter("leanlm_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated = Counter("leanlm_generated_tokens", "tokens generated", registry=r)
        self.batch = Histogram("leanlm_batch_size", "sequences in each decode step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.cache = Counter("leanlm_cache_lookups", "response-cache lookups by result (exact, semantic, miss)",
                             ["result"], registry=r)
        self.compressed_prompts = Counter("leanlm_compressed_prompts", "prompts compressed by --compress-context",
                                          registry=r)
        self.compressed_away = Counter("leanlm_compressed_away_tokens",
                                       "prompt tokens removed by --compress-context", registry=r)
        self.load = load
        self.speculation = None
        Gauge("leanlm_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: self.load()["waiting"])
        Gauge("leanlm_running", "sequences holding a slot", registry=r).set_function(lambda: self.load()["running"])
        Gauge("leanlm_tokens_per_second", "tokens generated per second, last 10 s", registry=r).set_function(self.rate)
        self._recent: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.started = time.time()

    def watch_speculation(self, spec) -> None:
        """Gauges over the engine's speculation (serve.speculative), read when scraped."""
        r = self.registry
        Gauge("leanlm_speculative_steps", "speculative steps run", registry=r).set_function(lambda: spec.stats.steps)
        Gauge("leanlm_speculative_drafted_tokens", "tokens drafted", registry=r).set_function(lambda: spec.stats.drafted)
        Gauge("leanlm_speculative_accepted_tokens", "drafted tokens the model agreed with",
              registry=r).set_function(lambda: spec.stats.accepted)
        Gauge("leanlm_speculative_enabled", "1 while speculation is on (measuring it, or measured faster)",
              registry=r).set_function(lambda: float(spec.wanted()))
        self.speculation = spec

    def cache_result(self, result: str) -> None:
        self.cache.labels(result).inc()

    def compressed(self, info: dict) -> None:
        self.compressed_prompts.inc()
        self.compressed_away.inc(max(0, info["before"] - info["after"]))

    def step(self, batch: int) -> None:
        self.batch.observe(batch)

    def token_event(self, stats: dict, event: dict, key: int = 0) -> None:
        """Called for each engine event of a request, on the server's loop; `stats` is that request's."""
        if event["type"] != "delta" or event.get("token") is None:
            return
        now = time.perf_counter()
        last = stats.setdefault("last_token", {})
        if "first_token" not in stats:
            stats["first_token"] = now
            self.ttft.observe(now - stats["start"])
        elif key in last:
            self.itl.observe(now - last[key])
        last[key] = now
        self.generated.inc()
        with self._lock:
            self._recent.append(time.monotonic())

    def rate(self) -> float:
        cutoff = time.monotonic() - 10
        with self._lock:
            while self._recent and self._recent[0] < cutoff:
                self._recent.popleft()
            return len(self._recent) / 10.0

    def done(self, endpoint: str, status: int, stats: dict) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - stats["start"])
        self.prompt_tokens.inc(stats.get("prompt_tokens", 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self) -> dict:
        """For the page: a few live numbers."""
        def total(metric):
            return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))

        def mean(hist):
            samples = {s.name: s.value for m in hist.collect() for s in m.samples if not s.labels.get("le")}
            count = next((v for k, v in samples.items() if k.endswith("_count")), 0)
            return next((v for k, v in samples.items() if k.endswith("_sum")), 0) / count if count else None
        return {**self.load(), "requests": total(self.requests), "generated_tokens": total(self.generated),
                "tokens_per_second": self.rate(), "mean_ttft_s": mean(self.ttft), "mean_itl_s": mean(self.itl),
                "uptime_s": time.time() - self.started,
                **({"speculative": self.speculation.summary()} if self.speculation is not None else {})}
