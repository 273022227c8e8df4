"""Drafters: cheap guesses at the next tokens, which the target then checks in one forward pass.

`PromptLookup` copies what followed the latest earlier occurrence of the text's last n-gram (for
summarizing, extracting and quoting, where the answer repeats its input). `DraftModel` runs a smaller
model sharing the target's tokenizer (leanlm's own int8/int4 or pruned model of the target), with its
own KV cache kept in step with the accepted text.

A drafter's `propose(context, k, sampling)` returns up to k token ids and, when sampling with a drafter
that samples, the distributions it drew them from (for the rejection rule); None means deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from leanlm.errors import ConfigError
from leanlm.runtime.generate import decode_one_token, new_cache, prefill
from leanlm.speculate.accept_ops import draft_token
from leanlm.speculate.cache_ops import trim_cache


class PromptLookup:
    """Draft the continuation of the longest suffix n-gram (max_ngram down to min_ngram tokens) that
    occurred earlier in the prompt or the text generated so far; the most recent occurrence wins."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"prompt lookup needs 1 <= min_ngram <= max_ngram; got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt: list[int], cache=None) -> None:
        pass

    def propose(self, context: list[int], k: int, sampling=None) -> tuple[list[int], None]:
        arr = np.asarray(context, dtype=np.int64)
        for n in range(min(self.max_ngram, len(arr) - 1), self.min_ngram - 1, -1):
            # windows starting at 0 .. len-n-1: each occurrence before the suffix itself, with >= 1 token after it
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return arr[start:start + k].tolist(), None
        return [], None


class DraftModel:
    """A smaller model sharing the target's vocabulary drafts greedily (or, when sampling, by sampling
    its own warped distribution, whose probabilities the rejection rule needs)."""

    name = "draft"

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self._cache, self._seen = None, []

    def start(self, prompt: list[int], cache=None) -> None:
        self._cache, self._seen = new_cache(self.model), []  # its own cache: the target's is not its to fill

    def _sync(self, context: list[int]) -> torch.Tensor:
        """Bring the draft's cache to `context` (dropping what the target rejected); the logits after it."""
        common = 0
        limit = min(len(self._seen), len(context) - 1)  # the last context token is always fed anew
        while common < limit and self._seen[common] == context[common]:
            common += 1
        trim_cache(self._cache, len(self._seen) - common)
        fresh = torch.tensor([context[common:]], device=self.device)
        self._seen = list(context)
        return prefill(self.model, fresh, self._cache)[0]

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, sampling=None) -> tuple[list[int], torch.Tensor | None]:
        logits = self._sync(context)
        draft, dists = [], []
        for i in range(k):
            token, probs = draft_token(logits, sampling)
            if probs is not None:
                dists.append(probs)
            draft.append(token)
            if i + 1 < k:  # the last draft token is fed next round, if the target keeps it
                logits = decode_one_token(self.model, torch.tensor([[token]], device=self.device), self._cache)[0]
                self._seen.append(token)
        return draft, (torch.stack(dists).cpu() if dists else None)

