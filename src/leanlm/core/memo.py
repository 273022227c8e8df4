"""Costly intermediate results a step may reuse across the runs of one process: the per-weight sensitivity
that mixed precision measures, say, which a search computes again for every mixed-precision trial on the same
model although only the bit budget changed.

Off by default: a single `leanlm optimize` frees such a result when its step ends. A driver that runs many
candidates on one model (`leanlm auto`'s trial runner) holds a `Store` and runs each candidate inside
`using(store)`; the results go when the driver drops its store. Entries are keyed by
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

class Store:
    """Up to `entries` results, least recently used out first."""

    def __init__(self, entries: int):
        self.entries = max(0, entries)
        self.items: OrderedDict[str, Any] = OrderedDict()


_current: Store | None = None


@contextmanager
def using(store: Store) -> Iterator[Store]:
    """Steps run inside the block keep their results in `store` (which outlives the block, so the next
    block using it finds them); outside any block nothing is kept."""
    global _current
    previous, _current = _current, store
    try:
        yield store
    finally:
        _current = previous


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
    """`compute()`, or the result kept from an earlier call with the same kind and key in the store in use."""
    store = _current
    if store is None or store.entries < 1:
        return compute()
    key = f"{kind}:{fingerprint(key_parts)}"
    if key in store.items:
        store.items.move_to_end(key)
        return store.items[key]
    value = compute()
    store.items[key] = value
    while len(store.items) > store.entries:
        store.items.popitem(last=False)
    return value
