"""The KV-cache manager of the leanlm backend: one row ("slot") per running sequence, each at its own length.

transformers' own caches keep every sequence of a batch at the same position, so a request could only
join a batch at its start. Here each layer's keys and values are one tensor [slots, kv_heads, capacity,
head_dim]; a forward pass writes each row at its own positions and attends through an explicit mask, so a
sequence joins or leaves between two decode steps (continuous batching). The rows in use are kept
contiguous (0..n-1: the decoding rows first, then the one being prefilled), so the attention reads views,
never gathers; a finished row is filled by moving the last one into it, copying only its used length.
Capacity grows by doubling, so memory follows the longest sequence, not the model's context.

The object is handed to the model as its `cache`: transformers' attention layers call `update()` with
each layer's new keys and values and attend over what it returns.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 256, max_len: int = 2048):
        self.layers, self.slots, self.max_len = layers, slots, max_len
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.capacity = min(capacity, max_len)
        self.keys = [self._empty(self.capacity) for _ in range(layers)]
        self.values = [self._empty(self.capacity) for _ in range(layers)]
        self.lengths = [0] * slots  # tokens held by each row
        self._rows: slice | None = None
        self._positions: torch.Tensor | None = None
        self._span = 0
        self._layout = None  # a slot_attention.SlotLayout during a mixed step

    @classmethod
    def for_model(cls, model, slots: int, max_len: int) -> SlotCache:
        """Sized from the model's config and its first parameter's dtype/device, for any decoder whose
        attention layers follow transformers' Cache protocol."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        param = next(p for p in model.parameters() if p.is_floating_point())
        return cls(cfg.num_hidden_layers, slots, kv_heads, head_dim, param.dtype, param.device, max_len=max_len)

    def _empty(self, capacity: int) -> torch.Tensor:
        return torch.zeros((self.slots, self.shape[0], capacity, self.shape[1]), dtype=self.dtype, device=self.device)

    def bytes_used(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def ensure(self, length: int) -> None:
        """Room for `length` tokens in every row (doubling, up to max_len)."""
        if length > self.max_len:
            raise ValueError(f"{length} tokens exceed the cache's {self.max_len}")
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, self.max_len)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._empty(capacity)
                new[:, :, : self.capacity] = old
                store[i] = new
        self.capacity = capacity

    def begin(self, rows: slice, positions: torch.Tensor) -> None:
        """The next forward writes rows `rows` at `positions` [rows, tokens] (one row's are consecutive)."""
        self._rows, self._positions = rows, positions
        self._span = int(positions.max()) + 1
        self.ensure(self._span)

    def begin_mixed(self, layout) -> None:
        """The next forward is a mixed step (slot_attention.SlotLayout): the decoding rows' tokens, then a chunk."""
        self._layout, self._span = layout, layout.span
        self.ensure(self._span)

    def mask(self, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """[rows, 1, tokens, span]: a query at position p sees keys at positions <= p of its own row (and,
        for a sliding-window layer, only the last `window` of them)."""
        keys = torch.arange(self._span, device=self.device)
        allowed = keys[None, None, :] <= self._positions[:, :, None]
        if window is not None:
            allowed &= keys[None, None, :] > self._positions[:, :, None] - window
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def finish(self) -> None:
        if self._layout is not None:
            lay, self._layout = self._layout, None
            for r, p in enumerate(lay.decode_positions):
                self.lengths[r] = max(self.lengths[r], p + 1)
            if lay.chunk:
                self.lengths[lay.decode] = max(self.lengths[lay.decode], lay.stop)
            return
        rows, positions = self._rows, self._positions
        for r, row_positions in zip(range(rows.start, rows.stop), positions):
            self.lengths[r] = max(self.lengths[r], int(row_positions.max()) + 1)
        self._rows = self._positions = None

    # transformers' Cache protocol, as its attention layers and models call it
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k_store, v_store = self.keys[layer_idx], self.values[layer_idx]
        if self._layout is not None:
            return self._update_mixed(key, value, k_store, v_store)
        rows, positions = self._rows, self._positions
        if positions.shape[1] == 1:  # decode: each row writes one position of its own
            index = torch.arange(rows.start, rows.stop, device=self.device)
            k_store[index, :, positions[:, 0]] = key[:, :, 0].to(self.dtype)
            v_store[index, :, positions[:, 0]] = value[:, :, 0].to(self.dtype)
        else:  # a prefill chunk: one row, consecutive positions
            start, stop = int(positions[0, 0]), int(positions[0, -1]) + 1
            k_store[rows, :, start:stop] = key.to(self.dtype)
            v_store[rows, :, start:stop] = value.to(self.dtype)
        return k_store[rows, :, : self._span], v_store[rows, :, : self._span]

    def _update_mixed(self, key, value, k_store, v_store):
        """key, value [1, kv_heads, n + L, dim]: token r < n goes to row r at its position, the rest to row n."""
        lay = self._layout
        n = lay.decode
        if n:
            index = torch.arange(n, device=self.device)
            at = torch.tensor(lay.decode_positions, device=self.device)
            k_store[index, :, at] = key[0, :, :n].transpose(0, 1).to(self.dtype)
            v_store[index, :, at] = value[0, :, :n].transpose(0, 1).to(self.dtype)
        if lay.chunk:
            k_store[n, :, lay.start:lay.stop] = key[0, :, n:].to(self.dtype)
            v_store[n, :, lay.start:lay.stop] = value[0, :, n:].to(self.dtype)
        return k_store[: lay.rows, :, : self._span], v_store[: lay.rows, :, : self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._span, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.layers

    # row bookkeeping, between forward passes
    def move(self, src: int, dst: int) -> None:
        """Row `src` takes row `dst`'s place (its used length only); `src` becomes free."""
        if src != dst:
            length = self.lengths[src]
            for store in (self.keys, self.values):
                for t in store:
                    t[dst, :, :length] = t[src, :, :length]
            self.lengths[dst] = length
        self.lengths[src] = 0

    def clear(self, row: int) -> None:
        self.lengths[row] = 0
