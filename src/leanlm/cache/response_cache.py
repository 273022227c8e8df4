"""The response cache: whole answers reused. The exact tier serves a stored answer only for the same
tenant, the same model files and the same request, and only requests whose answer is determined
(temperature 0, or a seed). Counters (hits, misses, tokens and seconds saved) live in memory and are
added to the store, so `leanlm cache stats` reads them across restarts and servers."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from leanlm.cache.keys import deterministic, request_key
from leanlm.errors import ConfigError


@dataclass
class CacheConfig:
    tiers: tuple[str, ...] = ("exact",)
    ttl_s: float | None = 7 * 24 * 3600
    max_entries: int = 100_000
    max_bytes: int = 1 << 30


TIERS = ("exact", "semantic", "prefix")


def parse_tiers(text: str | list[str]) -> tuple[str, ...]:
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in items if t not in TIERS]
    if unknown:
        raise ConfigError(f"--cache {','.join(unknown)}: unknown tier; the tiers are {', '.join(TIERS)}")
    return tuple(dict.fromkeys(items))


def open_store(url: str | None, cache_dir: str, config: CacheConfig):
    """SQLite in `cache_dir` by default; `redis://...` for a shared one."""
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        from leanlm.cache.redis_store import RedisStore

        return RedisStore(url, config.max_entries)
    if url and url not in ("sqlite", "sqlite://"):
        raise ConfigError(f"--cache-store {url!r}: use sqlite (the default, in --cache-dir) or redis://HOST:PORT/DB")
    from leanlm.cache.sqlite_store import SQLiteStore

    return SQLiteStore(cache_dir, config.max_entries, config.max_bytes)


class ResponseCache:
    def __init__(self, store, fingerprint: str, config: CacheConfig, semantic=None):
        self.store, self.fingerprint, self.config = store, fingerprint, config
        self.semantic = semantic
        self._counts: dict[str, float] = {}
        self._lock = threading.Lock()
        self._flushed = time.monotonic()

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0.0) + value
            due = time.monotonic() - self._flushed > 5
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            self._flushed = time.monotonic()
        if counts:
            self.store.add_counters(counts)

    def cacheable(self, request: dict) -> bool:
        return deterministic(request) and not request.get("logprobs")

    def lookup(self, tenant: str, endpoint: str, request: dict) -> tuple[dict | None, str]:
        """(the stored answer or None, which tier answered or "miss")."""
        key = request_key(tenant, self.fingerprint, endpoint, request)
        found = self.store.get(key)
        if found is not None:
            body, meta = found
            self._saved("exact", meta)
            return json.loads(body), "exact"
        if self.semantic is not None and endpoint == "chat":
            answer = self.semantic.lookup(tenant, self.fingerprint, request)
            if answer is not None:
                body, meta = answer
                self._saved("semantic", meta)
                return json.loads(body), "semantic"
        self.count("misses")
        return None, "miss"

    def _saved(self, tier: str, meta: dict) -> None:
        self.count(f"hits_{tier}")
        self.count("tokens_saved", meta.get("completion_tokens", 0))
        self.count("seconds_saved", meta.get("seconds", 0.0))

    def remember(self, tenant: str, endpoint: str, request: dict, response: dict, seconds: float) -> None:
        key = request_key(tenant, self.fingerprint, endpoint, request)
        meta = {"completion_tokens": (response.get("usage") or {}).get("completion_tokens", 0), "seconds": seconds}
        body = json.dumps(response, separators=(",", ":")).encode()
        self.store.put(key, body, tenant=tenant, model=self.fingerprint, tier="exact", ttl=self.config.ttl_s, meta=meta)
        if self.semantic is not None and endpoint == "chat":
            self.semantic.remember(tenant, self.fingerprint, request, body, meta, self.config.ttl_s)
        self.count("stored")

    def stats(self) -> dict:
        self.flush()
        return {"store": self.store.kind, "entries": self.store.count(), "counters": self.store.counters()}
