"""The response cache's default store: one SQLite file (WAL) in the cache directory.

An entry is written in one committed transaction before the answer that produced it is acknowledged, so a
server killed mid-burst loses nothing it answered; WAL lets readers run beside the writer. Each body
carries its SHA-256: an entry that does not match is deleted and never served. A file SQLite cannot read
(or whose integrity check fails) is refused at startup with its path."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

from leanlm.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, tier TEXT NOT NULL,
    created REAL NOT NULL, accessed REAL NOT NULL, expires REAL, size INTEGER NOT NULL,
    body BLOB NOT NULL, checksum TEXT NOT NULL, meta TEXT
);
CREATE INDEX IF NOT EXISTS entries_accessed ON entries (accessed);
CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant, tier);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
"""


def checksum(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class SQLiteStore:
    kind = "sqlite"

    def __init__(self, directory: str | Path, max_entries: int = 100_000, max_bytes: int = 1 << 30):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".leanlm-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"the cache directory {self.dir} is not writable ({err.strerror}); pass another "
                              "with --cache-dir") from None
        self.path = self.dir / "responses.sqlite"
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._lock = threading.Lock()
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed write survives the process dying
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"the cache file {self.path} is corrupt or not a SQLite database ({err}); it is not "
                              "served from. Move it aside or delete it, and the cache starts empty") from None
        return db

    def get(self, key: str) -> tuple[bytes, dict] | None:
        now = time.time()
        with self._lock:
            row = self.db.execute("SELECT body, checksum, expires, meta FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            body, digest, expires, meta = row
            if (expires is not None and expires < now) or checksum(body) != digest:
                self.db.execute("DELETE FROM entries WHERE key = ?", (key,))
                return None
            self.db.execute("UPDATE entries SET accessed = ? WHERE key = ?", (now, key))
        import json

        return body, json.loads(meta or "{}")

    def put(self, key: str, body: bytes, *, tenant: str, model: str, tier: str, ttl: float | None,
            meta: dict | None = None) -> None:
        import json

        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, tenant, model, tier, now, now, now + ttl if ttl else None, len(body), body,
                     checksum(body), json.dumps(meta or {})))
                self._evict()
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _evict(self) -> None:
        count, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        if count <= self.max_entries and size <= self.max_bytes:
            return
        self.db.execute("DELETE FROM entries WHERE expires IS NOT NULL AND expires < ?", (time.time(),))
        while True:
            count, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
            over = max(count - self.max_entries, 0)
            if not over and size <= self.max_bytes:
                return
            self.db.execute("DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY accessed LIMIT ?)",
                            (max(over, max(1, count // 100)),))

    def entries(self, tenant: str, model: str, tier: str, skip: set[str] | frozenset = frozenset()
                ) -> list[tuple[str, bytes, dict]]:
        """Every live entry of one tenant, model and tier whose key is not in `skip` (the semantic index is
        rebuilt from these, and refreshed with the entries it does not hold yet: only their rows are read)."""
        import json

        with self._lock:
            keys = [k for (k,) in self.db.execute("SELECT key FROM entries WHERE tenant = ? AND model = ? AND tier = ?",
                                                  (tenant, model, tier)) if k not in skip]
            rows = []
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                rows += self.db.execute("SELECT key, body, checksum, meta, expires FROM entries WHERE key IN ("
                                        + ",".join("?" * len(chunk)) + ")", chunk).fetchall()
        now = time.time()
        return [(k, b, json.loads(m or "{}")) for k, b, c, m, e in rows if checksum(b) == c and (e is None or e >= now)]

    def clear(self, tenant: str | None = None) -> int:
        with self._lock:
            cur = self.db.execute("DELETE FROM entries" + (" WHERE tenant = ?" if tenant else ""),
                                  (tenant,) if tenant else ())
            return cur.rowcount

    def count(self) -> dict:
        with self._lock:
            rows = self.db.execute("SELECT tier, COUNT(*), COALESCE(SUM(size), 0) FROM entries GROUP BY tier").fetchall()
        return {tier: {"entries": n, "bytes": b} for tier, n, b in rows}

    def add_counters(self, deltas: dict[str, float]) -> None:
        with self._lock:
            for name, value in deltas.items():
                self.db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                                (name, value, value))

    def counters(self) -> dict[str, float]:
        with self._lock:
            return dict(self.db.execute("SELECT name, value FROM counters").fetchall())

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self.db.close()
