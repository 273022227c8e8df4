"""What a cached answer is keyed on: the tenant, the served model's fingerprint (a hash of its files and
the leanlm version, so a changed model never serves the old one's answers) and the request with every
field that changes the output, normalized so the same request written two ways is one key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from leanlm.core.paths import leanlm_version

# fields that do not change the answer's content
NOT_KEYED = ("stream", "stream_options", "user")


def model_fingerprint(path: str | Path | None, name: str, extra: str = "") -> str:
    """SHA-256 over the model's files (names, sizes, contents) and the leanlm version."""
    h = hashlib.sha256(f"leanlm {leanlm_version()}\n{name}\n{extra}\n".encode())
    if path is not None:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name} {f.stat().st_size}\n".encode())
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:32]


def request_key(tenant: str, fingerprint: str, endpoint: str, request: dict) -> str:
    fields = {k: v for k, v in sorted(request.items()) if k not in NOT_KEYED}
    text = json.dumps([tenant, fingerprint, endpoint, fields], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def deterministic(request: dict) -> bool:
    """Greedy, or sampled from a seed: the same request gives the same answer, so a stored one is right."""
    return float(request.get("temperature", 1.0)) == 0.0 or request.get("seed") is not None
