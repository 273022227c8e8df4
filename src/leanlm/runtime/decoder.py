"""The decoder interface that benchmarking, evaluation's generations and (next) serving and speculative
decoding build on: a KV cache per batch, a prefill that fills it, one decode step at a time.

`EagerDecoder` runs runtime.generate's eager loop over transformers' dynamic cache; `CompiledDecoder`
(runtime.compiled_decode) runs a static cache and a torch.compile'd step. Both take token ids
[batch, tokens] and return the next-token logits [batch, vocab].
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from leanlm.runtime.generate import decode_one_token, new_cache, prefill


class Decoder(Protocol):
    def new_cache(self, batch: int) -> Any:
        """An empty KV cache for `batch` sequences."""

    def prefill(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run the prompts [batch, tokens] into `cache`; the last position's logits."""

    def decode_one_token(self, token: torch.Tensor, cache: Any) -> torch.Tensor:
        """Feed one token per sequence [batch, 1]; the next-token logits."""


class EagerDecoder:
    """The default loop (runtime.generate) behind the Decoder interface."""

    def __init__(self, model: nn.Module):
        self.model = model

    def new_cache(self, batch: int):
        return new_cache(self.model)

    def prefill(self, ids, cache):
        return prefill(self.model, ids, cache)

    def decode_one_token(self, token, cache):
        return decode_one_token(self.model, token, cache)


def make_decoder(model: nn.Module, compile: bool = False, max_len: int | None = None) -> Decoder:
    """The eager decoder, or with `compile` the compiled one over a static cache of `max_len` tokens
    (its first call per batch size compiles: warm it up before timing)."""
    if not compile:
        return EagerDecoder(model)
    from leanlm.runtime.compiled_decode import CompiledDecoder

    if max_len is None:
        raise ValueError("a compiled decoder needs max_len, the longest prompt plus new tokens it will hold")
    return CompiledDecoder(model, max_len=max_len)
