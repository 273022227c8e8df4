"""Rolling a KV cache back past the draft tokens the target rejected."""

from __future__ import annotations

import functools
import inspect

from leanlm.errors import UnsupportedModelError


def check_croppable(cache, who: str) -> None:
    """Speculation writes draft tokens into the cache and removes the rejected ones; a cache that
    cannot drop its last entries (sliding-window or recurrent layers) cannot be rolled back."""
    if getattr(cache, "is_croppable", True) is False:
        raise UnsupportedModelError(f"{who}'s KV cache cannot drop its last entries (sliding-window or recurrent "
                                    "layers), which speculative decoding needs; decode without --speculative")


def trim_cache(cache, tokens: int) -> None:
    """Remove the last `tokens` entries of every layer of a transformers cache."""
    if tokens <= 0:
        return
    if _crop_takes_count(type(cache)):
        cache.crop(-tokens)
    else:  # transformers < 5: crop(max_length) keeps the first max_length entries
        cache.crop(cache.get_seq_length() - tokens)


@functools.cache
def _crop_takes_count(cls: type) -> bool:
    return "tokens_to_remove" in inspect.signature(cls.crop).parameters
