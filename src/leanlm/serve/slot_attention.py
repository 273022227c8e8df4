"""Attention for the engine's mixed step: every decoding row's next token and one prompt chunk in one pass.

A decode step and a prefill chunk each read every weight of the model once, and at the batch sizes a
server runs that read is much of a step's time. So, as vLLM's scheduler and transformers' continuous
batching do, the engine runs both as one flat sequence of tokens [1, n + L]: the linear layers, norms and
MLPs see one matrix, and only attention, which must keep each row to its own keys, is split by row: the n
decoding rows attend as one batch of single queries, the prompt chunk as one causal block.

The function is registered in transformers' AttentionInterface and reached through the model's
`attn_implementation` for the length of one forward pass; the layout rides down to it as a keyword
argument, which transformers passes from the model's forward through every decoder layer. Masks are built
once per pass (per window size), not once per layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAME = "leanlm_slots"


@dataclass
class SlotLayout:
    """Tokens [decode rows' one token each, then the chunk of row `decode`] and where each is written."""

    decode_positions: list[int]  # row r (< decode) writes its token at decode_positions[r]
    start: int = 0  # the chunk's positions in row `decode`: start .. stop - 1 (none when equal)
    stop: int = 0
    device: torch.device = torch.device("cpu")
    calls: int = 0  # attention layers this layout has served (checked once at the engine's start)
    _masks: dict = field(default_factory=dict)

    @property
    def decode(self) -> int:
        return len(self.decode_positions)

    @property
    def chunk(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> int:
        return self.decode + (1 if self.chunk else 0)

    @property
    def span(self) -> int:
        return max([self.stop, *(p + 1 for p in self.decode_positions)])

    def positions(self) -> torch.Tensor:
        return torch.tensor(self.decode_positions + list(range(self.start, self.stop)), device=self.device)[None]

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[n, 1, 1, span]: row r's query sees its keys at positions <= its own (the last `window` of them)."""
        key = ("decode", window, dtype)
        if key not in self._masks:
            pos = torch.tensor(self.decode_positions, device=self.device)[:, None]
            self._masks[key] = _additive(_allowed(pos, max(self.decode_positions) + 1, window), dtype)[:, None, None]
        return self._masks[key]

    def chunk_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[1, 1, L, stop], or None where the plain causal flag says the same (a chunk from position 0)."""
        if self.start == 0 and (window is None or window >= self.stop):
            return None
        key = ("chunk", window, dtype)
        if key not in self._masks:
            pos = torch.arange(self.start, self.stop, device=self.device)[:, None]
            self._masks[key] = _additive(_allowed(pos, self.stop, window), dtype)[None, None]
        return self._masks[key]


def _allowed(query_positions: torch.Tensor, span: int, window: int | None) -> torch.Tensor:
    keys = torch.arange(span, device=query_positions.device)[None]
    allowed = keys <= query_positions
    if window is not None:
        allowed &= keys > query_positions - window
    return allowed


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def slot_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                   scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                   slot_layout: SlotLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, heads, n + L, dim]; key, value [rows, kv_heads, span, dim] (the cache's rows in use).
    Returns [1, n + L, heads, dim], as transformers' attention functions do."""
    if slot_layout is None:
        raise RuntimeError("leanlm's slot attention ran without its layout: this model's forward does not pass "
                           "attention keyword arguments down to its layers; serve it with the engine's padded step")
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"leanlm's slot attention has no {name!r} (this model's attention needs it)")
    lay = slot_layout
    lay.calls += 1
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    parts = []
    if lay.decode:
        n = lay.decode
        # the query heads sharing a KV head become that head's queries: no copy of the keys per query head
        q = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, dim)
        span = max(lay.decode_positions) + 1
        out = F.scaled_dot_product_attention(q, key[:n, :, :span], value[:n, :, :span], scale=scaling,
                                             attn_mask=lay.decode_mask(sliding_window, query.dtype))
        parts.append(out.reshape(1, n, heads, dim))
    if lay.chunk:
        r = lay.decode
        mask = lay.chunk_mask(sliding_window, query.dtype)
        out = F.scaled_dot_product_attention(query[:, :, lay.decode:], key[r:r + 1, :, :lay.stop],
                                             value[r:r + 1, :, :lay.stop], attn_mask=mask, is_causal=mask is None,
                                             scale=scaling, enable_gqa=heads != kv_heads)
        parts.append(out.transpose(1, 2))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, slot_attention)


@contextlib.contextmanager
def slot_attention_on(model):
    """The model's attention implementation is the slot attention for the duration (a config attribute:
    cheap to set, and it leaves the model as it was for anything else that runs it)."""
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = old
