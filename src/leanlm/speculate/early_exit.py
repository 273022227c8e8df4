"""Early exit (lossy, CALM-style): a token leaves after block K when the exit head is confident enough,
and the remaining blocks run only for the tokens that need them.

CALM fills a skipped token's upper-layer KV by copying its exit state; here the skipped tokens' hidden
states wait, and the next token that needs the whole model takes them through the deep blocks in the
same pass, so every later token attends to true upper-layer keys and values, and the deep blocks run
on several tokens at once (one weight read for all, where decoding is memory-bound). Given the same
text so far, what leaves early is then exactly what `exit_ops.sweep` scores on held-out text, so the
threshold chosen there for a KL budget is the one generation runs with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanlm.runtime.generate import new_cache, prefill
from leanlm.speculate.cache_ops import check_croppable
from leanlm.speculate.exit_head import ExitHead, exit_logits_on
from leanlm.speculate.exit_ops import confidence, pick_threshold, sweep, token_stats
from leanlm.speculate.split import LayerSplit

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01)


@dataclass
class ExitStats:
    tokens: int = 0  # decoded after the prefill's token
    exited: int = 0  # of which left after block K
    deep_passes: int = 0

    @property
    def exit_share(self) -> float:
        return self.exited / self.tokens if self.tokens else 0.0


@torch.inference_mode()
def early_exit_generate(model: nn.Module, head: ExitHead, split: LayerSplit, input_ids: torch.Tensor,
                        max_new_tokens: int, threshold: float, eos_token_id: int | None = None,
                        stats: ExitStats | None = None) -> torch.Tensor:
    """Greedy new tokens [1, <= max_new_tokens]: the exit's when its confidence >= threshold, else the model's."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"early exit decodes one sequence at a time; got a batch of {input_ids.shape[0]}")
    stats = stats if stats is not None else ExitStats()
    cache = new_cache(model)
    check_croppable(cache, "the model")
    token = int(prefill(model, input_ids, cache)[0].argmax())
    out, waiting = [token], []
    while len(out) < max_new_tokens and token != eos_token_id:
        hidden = split.shallow([token], cache)
        waiting.append(hidden)
        logits = head(hidden, split.lm_head)[0, -1]
        if float(confidence(logits)) >= threshold:
            token = int(logits.argmax())
            stats.exited += 1
        else:
            token = int(split.deep_logits(torch.cat(waiting, dim=1), cache)[-1].argmax())
            waiting = []
            stats.deep_passes += 1
        stats.tokens += 1
        out.append(token)
    return torch.tensor([out], device=input_ids.device)


def exit_quality(model: nn.Module, head: ExitHead, split: LayerSplit, windows: torch.Tensor,
                 thresholds=THRESHOLDS) -> list[dict]:
    """`exit_ops.sweep` over token windows [n, tokens], one window at a time (the logits are vocab-wide)."""
    parts = []
    for ids in windows:
        full, exit_ = exit_logits_on(model, head, split, ids[None].to(split.lm_head.weight.device))
        parts.append(token_stats(full[0, :-1], exit_[0, :-1], ids[1:].to(full.device)))
    return sweep({k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}, list(thresholds))


def calibrate(model: nn.Module, head: ExitHead, split: LayerSplit, windows: torch.Tensor, kld_budget: float,
              thresholds=THRESHOLDS) -> tuple[dict | None, list[dict]]:
    """(the threshold row that exits most within the budget on `windows`, every row)."""
    rows = exit_quality(model, head, split, windows, thresholds)
    return pick_threshold(rows, kld_budget), rows
