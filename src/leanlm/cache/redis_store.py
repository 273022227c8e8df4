"""The response cache in Redis (`--cache-store redis://HOST:PORT/DB`), so several servers share one cache.

Each entry is a hash (body, checksum, tenant, model, tier, meta) under `PREFIX:e:KEY` with Redis' own
expiry for the TTL; a sorted set `PREFIX:lru` orders keys by last use for the size limit, and
`PREFIX:i:TENANT:MODEL:TIER` lists a tier's keys so the semantic index can be rebuilt from Redis (this
Redis has no vector search). A server that loses Redis keeps answering, uncached and with a warning
once, and uses the cache again as soon as Redis answers: the store never raises on a lost connection."""

from __future__ import annotations

import json
import logging
import time

from leanlm.cache.sqlite_store import checksum
from leanlm.errors import ConfigError

log = logging.getLogger("leanlm.cache")


class RedisStore:
    kind = "redis"

    def __init__(self, url: str, max_entries: int = 100_000, prefix: str = "leanlm:cache"):
        try:
            import redis
        except ImportError:
            raise ConfigError("a Redis cache store needs the redis client: pip install 'leanlm[cache]'") from None
        self.redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, retry_on_timeout=False)
        self.url, self.prefix, self.max_entries = url, prefix, max_entries
        self.max_bytes = None
        self.down_since: float | None = None
        try:
            self.client.ping()
        except self.redis_errors as err:
            raise ConfigError(f"the cache store {url} cannot be reached ({err}); start Redis there or pass another "
                              "--cache-store") from None

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _call(self, fn, default=None):
        try:
            value = fn()
        except self.redis_errors as err:
            if self.down_since is None:
                self.down_since = time.time()
                log.warning("the cache store %s is unreachable (%s): answering uncached until it returns", self.url, err)
            return default
        if self.down_since is not None:
            log.warning("the cache store %s is back after %.0fs", self.url, time.time() - self.down_since)
            self.down_since = None
        return value

    def ping(self) -> bool:
        return bool(self._call(self.client.ping, False))

    def get(self, key: str) -> tuple[bytes, dict] | None:
        def fetch():
            data = self.client.hgetall(self._k("e", key))
            if not data:
                return None
            body = data[b"body"]
            if checksum(body) != data[b"checksum"].decode():
                self.client.delete(self._k("e", key))
                return None
            self.client.zadd(self._k("lru"), {key: time.time()})
            return body, json.loads(data.get(b"meta", b"{}"))
        return self._call(fetch)

    def put(self, key: str, body: bytes, *, tenant: str, model: str, tier: str, ttl: float | None,
            meta: dict | None = None) -> None:
        def write():
            pipe = self.client.pipeline(transaction=True)
            entry = self._k("e", key)
            pipe.hset(entry, mapping={"body": body, "checksum": checksum(body), "tenant": tenant, "model": model,
                                      "tier": tier, "meta": json.dumps(meta or {})})
            if ttl:
                pipe.pexpire(entry, int(ttl * 1000))
            pipe.zadd(self._k("lru"), {key: time.time()})
            pipe.sadd(self._k("i", tenant, model, tier), key)
            pipe.sadd(self._k("tenant", tenant), key)
            pipe.execute()
            self._evict()
        self._call(write)

    def _evict(self) -> None:
        over = self.client.zcard(self._k("lru")) - self.max_entries
        if over > 0:
            for key, _ in self.client.zpopmin(self._k("lru"), over):
                self.client.delete(self._k("e", key.decode()))

    def entries(self, tenant: str, model: str, tier: str, skip: set[str] | frozenset = frozenset()
                ) -> list[tuple[str, bytes, dict]]:
        """Every live entry of one tenant, model and tier whose key is not in `skip` (only those are read)."""
        def read():
            out = []
            index = self._k("i", tenant, model, tier)
            for raw in self.client.smembers(index):
                key = raw.decode()
                if key in skip:
                    continue
                data = self.client.hgetall(self._k("e", key))
                if not data:
                    self.client.srem(index, key)  # expired or evicted
                    continue
                if checksum(data[b"body"]) == data[b"checksum"].decode():
                    out.append((key, data[b"body"], json.loads(data.get(b"meta", b"{}"))))
            return out
        return self._call(read, [])

    def clear(self, tenant: str | None = None) -> int:
        def wipe():
            if tenant is None:
                keys = list(self.client.scan_iter(self._k("*")))
                entries = sum(1 for k in keys if k.startswith(self._k("e", "").encode()))
                for i in range(0, len(keys), 500):
                    self.client.delete(*keys[i:i + 500])
                return entries
            keys = [k.decode() for k in self.client.smembers(self._k("tenant", tenant))]
            for key in keys:
                self.client.delete(self._k("e", key))
                self.client.zrem(self._k("lru"), key)
            for index in self.client.scan_iter(self._k("i", tenant, "*")):
                self.client.delete(index)
            self.client.delete(self._k("tenant", tenant))
            return len(keys)
        return self._call(wipe, 0)

    def count(self) -> dict:
        return {"all": {"entries": self._call(lambda: self.client.zcard(self._k("lru")), 0), "bytes": None}}

    def add_counters(self, deltas: dict[str, float]) -> None:
        def add():
            pipe = self.client.pipeline()
            for name, value in deltas.items():
                pipe.hincrbyfloat(self._k("counters"), name, value)
            pipe.execute()
        self._call(add)

    def counters(self) -> dict[str, float]:
        data = self._call(lambda: self.client.hgetall(self._k("counters")), {}) or {}
        return {k.decode(): float(v) for k, v in data.items()}

    def close(self) -> None:
        self.client.close()
