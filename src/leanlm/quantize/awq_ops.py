"""Pure tensor math of AWQ (activation-aware weight quantization): the per-input-channel scale
candidates of the grid search and the clip-ratio search, testable on random tensors."""

from __future__ import annotations

from typing import Callable

import torch

from leanlm.quantize.rtn_ops import _grouped, fake_quantize


def weight_channel_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Mean over output rows of |w| relative to its group's max, per input channel."""
    w = torch.cat([x.float() for x in weights])
    g = _grouped(w, group_size)
    rel = g.abs() / g.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    return rel.reshape(w.shape).mean(0)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool = True) -> torch.Tensor:
    """s = x^a / w^(1-a) (duo) or x^a, normalised so that max(s) * min(s) = 1."""
    s = x_mean.float().clamp_min(1e-4).pow(alpha)
    if duo:
        s = s / w_mean.float().clamp_min(1e-4).pow(1 - alpha)
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(x_mean: torch.Tensor, w_mean: torch.Tensor, loss: Callable[[torch.Tensor], float],
                 grid: int = 20, duo: bool = True) -> tuple[torch.Tensor, float, float]:
    """The scale from the grid a = 0, 1/grid, ... (and no scaling at all) with the lowest `loss(s)`.

    Returns (scale, alpha, loss); alpha is -1 when no scaling won."""
    best_s = torch.ones_like(x_mean, dtype=torch.float32)
    best_alpha, best_loss = -1.0, loss(best_s)
    for i in range(grid):
        alpha = i / grid
        s = candidate_scale(x_mean, w_mean, alpha, duo)
        value = loss(s)
        if value < best_loss:
            best_s, best_alpha, best_loss = s, alpha, value
    return best_s, best_alpha, best_loss


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                grid: int = 20, max_shrink: float = 0.5, chunk: int = 512) -> torch.Tensor:
    """Per [out, group] clip ratio in (1 - max_shrink, 1] minimising ||(Q(w) - w) x|| on the rows of `x`."""
    out, inp = weight.shape
    size = inp if group_size is None else group_size
    xg = x.float().reshape(x.shape[0], inp // size, size).transpose(0, 1)  # [groups, rows, size]
    ratios = []
    for start in range(0, out, chunk):
        w = weight[start : start + chunk].float()
        best_err = torch.full((w.shape[0], inp // size), float("inf"), device=w.device)
        best = torch.ones_like(best_err)
        for i in range(max(1, int(max_shrink * grid))):
            r = 1 - i / grid
            diff = _grouped(fake_quantize(w, bits, group_size, symmetric, r) - w, group_size).transpose(0, 1)
            err = torch.bmm(xg, diff.transpose(1, 2)).pow(2).sum(1).T  # [out, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
        ratios.append(best)
    return torch.cat(ratios)
