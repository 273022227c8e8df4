"""Speculative decoding over leanlm's generation loop (runtime.generate): draft, verify in one forward
pass, keep what the target agrees with, roll the KV cache back past the rest.

Lossless by construction: greedy output equals plain greedy decoding token for token (up to the
floating-point differences between a one-token and a several-token forward, which flip only exact
ties); sampled output follows the target's distribution by the rejection rule (accept_ops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from leanlm.runtime.generate import _cache_kwarg, new_cache, prefill
from leanlm.speculate.accept_ops import accept_greedy, accept_sampled, warp
from leanlm.speculate.cache_ops import check_croppable, trim_cache


@dataclass
class Sampling:
    """Temperature and nucleus sampling with a generator (the same seed, the same tokens)."""

    temperature: float
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class DraftLength:
    """How many tokens to draft next: grows by 2 after a step whose whole draft was kept, shrinks by 1
    after one with a rejection (the schedule transformers' assisted generation uses), within [1, most]."""

    start: int = 4
    most: int = 10
    now: int = 0

    def __post_init__(self):
        self.now = min(self.start, self.most)

    def update(self, drafted: int, kept: int) -> None:
        if drafted == 0:
            return
        self.now = min(self.most, self.now + 2) if kept == drafted else max(1, self.now - 1)


@dataclass
class SpecStats:
    steps: int = 0  # target forward passes after the prefill
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced, the prefill's first one included
    step_tokens: int = 0  # tokens produced by the steps (the kept draft plus the target's own token)
    accepted_lengths: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.step_tokens / max(1, self.steps)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step}


def _verify(model: nn.Module, feed: list[int], cache, device) -> torch.Tensor:
    """The target's logits after each fed token, [len(feed), vocab]."""
    ids = torch.tensor([feed], device=device)
    out = model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache})
    return out.logits[0].float().cpu()


@torch.inference_mode()
def speculative_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, drafter,
                         eos_token_id: int | None = None, sampling: Sampling | None = None,
                         length: DraftLength | None = None, stats: SpecStats | None = None) -> torch.Tensor:
    """New tokens [1, <= max_new_tokens] for one prompt [1, tokens], greedy unless `sampling` is given."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time; got a batch of {input_ids.shape[0]}")
    device = input_ids.device
    length = length or DraftLength()
    stats = stats if stats is not None else SpecStats()
    cache = new_cache(model)
    check_croppable(cache, "the target model")
    context = input_ids[0].tolist()
    first = prefill(model, input_ids, cache)[0].float().cpu()
    drafter.start(context, cache)
    verify = getattr(drafter, "verify", None)  # self-speculation verifies with the blocks it did not run
    token = _choose(first, sampling)
    out = [token]
    while len(out) < max_new_tokens and token != eos_token_id:
        room = max_new_tokens - len(out)
        draft, draft_probs = drafter.propose(context + out, min(length.now, room), sampling)
        feed = [token] + draft
        logits = verify(feed, cache) if verify is not None else _verify(model, feed, cache, device)
        if sampling is None:
            kept, token = accept_greedy(logits, draft)
        else:
            kept, token = accept_sampled(warp(logits, sampling.temperature, sampling.top_p), draft, draft_probs,
                                         sampling.generator)
        trim_cache(cache, len(draft) - kept)  # the cache now ends at the last kept draft token
        new = draft[:kept] + [token]
        if eos_token_id is not None and eos_token_id in new:
            new = new[:new.index(eos_token_id) + 1]
        out.extend(new[:room])
        stats.step_tokens += len(new[:room])
        token = out[-1]
        length.update(len(draft), kept)
        stats.steps += 1
        stats.drafted += len(draft)
        stats.accepted += kept
        stats.accepted_lengths.append(kept)
    stats.emitted += len(out)
    return torch.tensor([out], device=device)


def _choose(logits: torch.Tensor, sampling: Sampling | None) -> int:
    if sampling is None:
        return int(logits.argmax())
    return int(torch.multinomial(warp(logits, sampling.temperature, sampling.top_p), 1, generator=sampling.generator))
