"""Choosing the next token from a row of logits: greedy, temperature and nucleus (top-p) sampling with a
per-request generator (the same seed gives the same tokens), and the log-probabilities OpenAI returns."""

from __future__ import annotations

import torch


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from `logits` [vocab]."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model and the `top` most likely alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top > 0:
        values, ids = torch.topk(logp, top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(logp[token]), alternatives
