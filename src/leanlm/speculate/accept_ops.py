"""Which drafted tokens the target keeps: the pure math of speculative decoding.

Greedy: the longest prefix of the draft that equals the target's argmax at each position, then the
target's own token at the first mismatch (or after the last draft token). The output is then exactly
plain greedy decoding's.

Sampling: the rejection rule of Leviathan et al. (2023) / Chen et al. (2023). Draft token x drawn from
q is kept with probability min(1, p(x)/q(x)); at the first rejection the replacement is drawn from
norm(max(p - q, 0)); when every draft token is kept, one more comes from p. Each emitted token is then
distributed exactly as the target's p. A deterministic drafter (prompt lookup) is the case q = one-hot.
"""

from __future__ import annotations

import torch


def warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling probabilities [..., vocab] after temperature and nucleus (top-p) truncation: the
    distribution plain sampling draws from, so speculation keeps exactly that one."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    # the smallest prefix whose mass reaches top_p (always at least the most likely token)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def draft_token(logits: torch.Tensor, sampling) -> tuple[int, torch.Tensor | None]:
    """A drafter's next token from its logits [vocab]: the argmax, or with `sampling` a draw from its warped
    distribution, which is returned too (the rejection rule needs q)."""
    if sampling is None:
        return int(logits.argmax()), None
    probs = warp(logits, sampling.temperature, sampling.top_p)
    return int(torch.multinomial(probs, 1, generator=sampling.generator)), probs


def accept_greedy(target_logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """(tokens of `draft` kept, the target's next token). `target_logits` [len(draft) + 1, vocab]:
    row i is the target's prediction after the context plus draft[:i]."""
    choice = target_logits.argmax(-1).tolist()
    kept = 0
    while kept < len(draft) and draft[kept] == choice[kept]:
        kept += 1
    return kept, choice[kept]


def accept_sampled(target_probs: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """(tokens of `draft` kept, the next token) under the rejection rule.

    target_probs [len(draft) + 1, vocab] are warped target distributions; draft_probs [len(draft), vocab]
    the distributions the draft tokens were drawn from, or None for a deterministic drafter (one-hot q)."""
    n = len(draft)
    if n:
        rows = torch.arange(n)
        ids = torch.tensor(draft)
        p = target_probs[rows, ids]
        q = draft_probs[rows, ids] if draft_probs is not None else torch.ones(n)
        u = torch.rand(n, generator=generator)
        rejected = (u * q >= p).nonzero()  # u < p/q keeps the token; q > 0 because x was drawn from q
        kept = int(rejected[0]) if len(rejected) else n
    else:
        kept = 0
    if kept == n:
        return n, _draw(target_probs[n], generator)
    p_row = target_probs[kept]
    if draft_probs is not None:
        residual = (p_row - draft_probs[kept]).clamp_min(0.0)
    else:
        residual = p_row.clone()
        residual[draft[kept]] = 0.0
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability ~0; p itself is exact
        residual = p_row
    return kept, _draw(residual / residual.sum(), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
