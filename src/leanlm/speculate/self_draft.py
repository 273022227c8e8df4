"""Self-speculation (LayerSkip-style): the model's first K blocks and an exit head draft, the remaining
blocks verify, on one KV cache.

Drafting runs each draft token through blocks [0, K) and writes their cache; verifying runs only blocks
[K, N) on the hidden states drafting left, so the shared blocks never run twice for a token. The loop's
rollback (cache_ops.trim_cache) drops the rejected tokens from every block alike, which keeps the two
parts the same length between steps.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.speculate.accept_ops import draft_token
from leanlm.speculate.exit_ops import confidence
from leanlm.speculate.split import LayerSplit


class SelfDraft:
    """Draft with the first `split.layer` blocks and `head`; stop a draft early once the exit's confidence
    falls below `stop_below` (a guess the target will likely reject costs a shallow pass for nothing)."""

    name = "self"
    shares_cache = True

    def __init__(self, split: LayerSplit, head: nn.Module, stop_below: float = 0.0):
        self.split, self.head, self.stop_below = split, head, stop_below
        self._cache, self._hidden, self._last = None, [], None

    def start(self, prompt: list[int], cache=None) -> None:
        if cache is None:
            raise ValueError("self-speculation drafts into the target's own cache; the loop passes it")
        self._cache, self._hidden, self._last = cache, [], None

    def _exit(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, self.split.lm_head)[0, -1].float()

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, sampling=None) -> tuple[list[int], torch.Tensor | None]:
        token, draft, dists, self._hidden = context[-1], [], [], []
        for _ in range(k):
            hidden = self.split.shallow([token], self._cache)
            self._hidden.append(hidden)
            logits = self._exit(hidden)
            token, probs = draft_token(logits, sampling)
            if probs is not None:
                dists.append(probs)
            draft.append(token)
            if self.stop_below and float(confidence(logits)) < self.stop_below:
                break
        self._last = token if draft else None
        return draft, (torch.stack(dists).cpu() if dists else None)

    @torch.inference_mode()
    def verify(self, feed: list[int], cache) -> torch.Tensor:
        """The full model's logits after each of `feed` ([the step's first token] + the draft): the last
        draft token through the shallow blocks, then every fed token's hidden state through the deep ones."""
        if cache is not self._cache or len(feed) != len(self._hidden) + 1:
            raise RuntimeError("SelfDraft.verify must follow its own propose on the same cache")
        hidden = list(self._hidden)
        if self._last is not None:
            hidden.append(self.split.shallow([self._last], cache))
        else:  # nothing drafted: the step's token alone, through all blocks
            hidden = [self.split.shallow([feed[0]], cache)]
        return self.split.deep_logits(torch.cat(hidden, dim=1), cache).float().cpu()
