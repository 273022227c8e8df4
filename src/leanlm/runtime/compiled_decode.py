"""A decode loop without per-token Python overhead: static KV cache + a torch.compile'd step.

At batch 1 a small model's eager decode step is mostly Python and kernel launches, which hides what
a faster matmul (int4, int8, sparsity) buys. `CompiledDecoder` keeps one preallocated cache and one
compiled step per batch size; on CUDA the step is captured as a CUDA graph ("reduce-overhead"), on CPU
inductor fuses the elementwise work around the matmuls. The first decode step of each new shape runs
eagerly, so that lazily built kernel layouts (int4 tiles, cached scales) exist before tracing.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from leanlm.runtime.generate import _cache_kwarg, prefill


def _mark_static(model: nn.Module) -> None:
    """CUDA graphs copy every non-static tensor input on each replay; kernel layouts cached outside
    the module's buffers (int4 tiles, int8 scales) must be marked, or each token re-copies the weights."""
    for module in model.modules():
        for value in vars(module).values():
            tensors = tuple(value.values()) if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    torch._dynamo.mark_static_address(t)


GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def native_gqa(enabled: bool):
    """Let SDPA read grouped KV heads as they are. Without it, transformers (for masked attention)
    copies every layer's whole static cache out to each query head on every token, which on CPU costs
    more than the attention itself; torch's CPU SDPA kernel handles the grouping natively."""
    if not enabled:
        yield
        return
    old = os.environ.get(GQA_SWITCH)
    os.environ[GQA_SWITCH] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(GQA_SWITCH, None)
        else:
            os.environ[GQA_SWITCH] = old


def _guard_stance(skip: bool):
    if not skip or not hasattr(torch.compiler, "set_stance"):  # torch < 2.6 checks every call
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


class CompiledDecoder:
    """prefill (eager) and decode_one_token (compiled) over a reusable static cache of `max_len` tokens."""

    def __init__(self, model: nn.Module, max_len: int, mode: str | None = None):
        self.model, self.max_len = model, max_len
        device = next(model.parameters()).device
        self.mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        self._caches: dict[int, object] = {}
        self._warm: set[int] = set()
        self._compiled: set[int] = set()
        self._gqa = device.type == "cpu"  # on CUDA a masked GQA call would fall back to the math kernel
        self._cache_kwarg = _cache_kwarg(model)  # resolved here: dynamo does not trace functools.cache
        self._step = torch.compile(self._forward, mode=self.mode, fullgraph=True, dynamic=False)

    def _forward(self, token: torch.Tensor, cache) -> torch.Tensor:
        out = self.model(input_ids=token, use_cache=True, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :]

    @torch.inference_mode()  # the cache's tensors are created under inference mode, so reset there too
    def new_cache(self, batch: int):
        """The one cache for this batch size, emptied: reusing it keeps CUDA graph addresses valid."""
        from transformers import StaticCache

        if batch not in self._caches:
            self._caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        cache = self._caches[batch]
        cache.reset()
        return cache

    def prefill(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        if input_ids.shape[1] >= self.max_len:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens leaves no room in a {self.max_len}-token cache")
        with native_gqa(self._gqa):
            return prefill(self.model, input_ids, cache)

    @torch.inference_mode()
    def decode_one_token(self, token: torch.Tensor, cache) -> torch.Tensor:
        batch = token.shape[0]
        with native_gqa(self._gqa):
            if batch not in self._warm:
                self._warm.add(batch)
                logits = self._forward(token, cache)
                _mark_static(self.model)
                return logits
            # Once every batch size seen has its graph, checking each call's guards (one per weight,
            # ~2 ms a token on CPU) only repeats what the first call of that size established;
            # with several graphs, the guards that tell them apart are still checked.
            skip = batch in self._compiled
            self._compiled.add(batch)
            with _guard_stance(skip):
                return self._step(token, cache).clone()  # a CUDA graph's output is overwritten by its next replay
