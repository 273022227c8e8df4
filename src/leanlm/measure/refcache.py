"""On-disk cache of a reference model's next-token distributions, for KL divergence and top-1.

As in llama.cpp's KLD method, the reference's log-probabilities over the whole vocabulary are
computed once and stored, so a quantized model is compared without holding both models, or
all logits, in memory. Log-probs are kept as float16 (renormalised on read, which makes the
rounding error second order in the KL) and the reference's argmax token is kept exactly, so
top-1 agreement is not disturbed by float16 ties.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from leanlm.core.paths import cache_dir

KEEP = 4  # logit caches kept; each is windows x length x vocab x 2 bytes


class LogitCache:
    def __init__(self, path: Path, shape: tuple[int, int, int], mode: str):
        self.path = path
        self.shape = shape
        self.logprobs = np.memmap(path / "logprobs.f16", dtype=np.float16, mode=mode, shape=shape)
        self.argmax = np.memmap(path / "argmax.i32", dtype=np.int32, mode=mode, shape=shape[:2])

    @classmethod
    def create(cls, key: str, shape: tuple[int, int, int]) -> "LogitCache":
        path = cache_root() / key
        shutil.rmtree(path, ignore_errors=True)
        _evict(keep=KEEP - 1)  # before the new entry exists: without meta.json it would rank oldest
        path.mkdir(parents=True)
        return cls(path, shape, "w+")

    @classmethod
    def open(cls, key: str) -> "LogitCache | None":
        path = cache_root() / key
        meta = path / "meta.json"
        if not meta.is_file():
            return None
        shape = tuple(json.loads(meta.read_text())["shape"])
        meta.touch()  # most recently used survives eviction
        return cls(path, shape, "r")

    def write(self, index: int, logprobs: torch.Tensor) -> None:
        self.logprobs[index] = logprobs.to(torch.float16).cpu().numpy()
        self.argmax[index] = logprobs.argmax(-1).to(torch.int32).cpu().numpy()

    def read(self, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 renormalisation: float16 rounding then only enters the KL at second order
        logprobs = torch.from_numpy(np.asarray(self.logprobs[index], dtype=np.float64)).to(device)
        logprobs = logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)
        return logprobs, torch.from_numpy(np.array(self.argmax[index], dtype=np.int64)).to(device)

    def finish(self, info: dict) -> None:
        self.logprobs.flush()
        self.argmax.flush()
        (self.path / "meta.json").write_text(json.dumps({"shape": list(self.shape), **info}))


def cache_root() -> Path:
    root = cache_dir() / "logits"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_key(identity: str, windows: torch.Tensor) -> str:
    digest = hashlib.sha256(identity.encode())
    digest.update(windows.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def _evict(keep: int) -> None:
    entries = [p for p in cache_root().iterdir() if p.is_dir()]
    entries.sort(key=lambda p: (p / "meta.json").stat().st_mtime if (p / "meta.json").exists() else 0)
    for old in entries[: max(0, len(entries) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
