"""The math of an early exit: how far its distribution is from the full model's, how sure it is, and
which confidence threshold keeps a quality budget."""

from __future__ import annotations

import torch


def token_kl(full_logits: torch.Tensor, exit_logits: torch.Tensor) -> torch.Tensor:
    """KL(full || exit) per position [...]: what the exit loses, weighted where the full model puts mass."""
    full = torch.log_softmax(full_logits.float(), dim=-1)
    return (full.exp() * (full - torch.log_softmax(exit_logits.float(), dim=-1))).sum(-1)


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """The exit's top probability per position: CALM's softmax confidence, cheap and calibratable."""
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def token_stats(full_logits: torch.Tensor, exit_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per position [n] (logits [n, vocab], next tokens [n]): the exit's confidence, its KL to the full
    model, whether their top-1 agree, and both negative log-likelihoods."""
    ce = torch.nn.functional.cross_entropy
    return {"conf": confidence(exit_logits), "kl": token_kl(full_logits, exit_logits),
            "agree": exit_logits.argmax(-1) == full_logits.argmax(-1),
            "nll_full": ce(full_logits.float(), targets, reduction="none"),
            "nll_exit": ce(exit_logits.float(), targets, reduction="none")}


def sweep(stats: dict, thresholds: list[float]) -> list[dict]:
    """Quality of exiting wherever the exit's confidence reaches each threshold, else running the full
    model (`stats` from token_stats, concatenated over windows): the share of tokens that exit, mean KL
    against the full model, top-1 agreement with it, and the perplexity of the mixed distribution."""
    rows = []
    for t in thresholds:
        out = stats["conf"] >= t
        rows.append({"threshold": t, "exit_share": float(out.float().mean()),
                     "kld": float(torch.where(out, stats["kl"], 0.0).mean()),
                     "top1": float(torch.where(out, stats["agree"], True).float().mean()),
                     "perplexity": float(torch.where(out, stats["nll_exit"], stats["nll_full"]).mean().exp())})
    return rows


def pick_threshold(rows: list[dict], kld_budget: float) -> dict | None:
    """The row that exits most while its KL stays within the budget (of equal shares, the higher threshold:
    it exits less on text unlike the calibration's); None if no threshold does."""
    within = [r for r in rows if r["kld"] <= kld_budget]
    return max(within, key=lambda r: (r["exit_share"], r["threshold"])) if within else None
