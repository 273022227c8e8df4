"""Costly intermediate results a step may reuse across the runs of one process: the per-weight sensitivity
that mixed precision measures, say, which a search computes again for every mixed-precision trial on the same
model although only the bit budget changed.

Off by default: a single `leanlm optimize` frees such a result when its step ends. A driver that runs many
candidates on one model (`leanlm auto`'s trial worker) turns it on with `keeping(n)`. Entries are keyed by
content, never by object identity: the key includes a fingerprint of the weights and of the data the result
was computed from, so a changed model (pruned, fine-tuned) or other calibration text never reads another's
result.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_store: OrderedDict[str, Any] = OrderedDict()
_capacity = 0


def keep(entries: int) -> None:
    """From now on keep up to `entries` results (least recently used out first); 0 turns keeping off."""
    global _capacity
    _capacity = max(0, entries)
    while len(_store) > _capacity:
        _store.popitem(last=False)


@contextmanager
def keeping(entries: int) -> Iterator[None]:
    """`keep(entries)` inside the block, then back to what it was (dropping what no longer fits)."""
    previous = _capacity
    keep(entries)
    try:
        yield
    finally:
        keep(previous)


def fingerprint(parts: Iterable[Any]) -> str:
    """A digest of tensors (their bytes, dtype and shape) and plain values, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


def cached(kind: str, key_parts: Iterable[Any], compute: Callable[[], Any]) -> Any:
    """`compute()`, or the result kept from an earlier call with the same kind and key, when keeping is on."""
    if _capacity < 1:
        return compute()
    key = f"{kind}:{fingerprint(key_parts)}"
    if key in _store:
        _store.move_to_end(key)
        return _store[key]
    value = compute()
    _store[key] = value
    while len(_store) > _capacity:
        _store.popitem(last=False)
    return value
