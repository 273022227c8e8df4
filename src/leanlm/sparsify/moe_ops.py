"""Pure tensor math of MoE-fication: group FFN channels that fire together into equal-sized experts,
and fit a router that predicts, from the FFN input, how much each expert will contribute."""

from __future__ import annotations

import torch


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Give each row (a channel) a column (an expert), cheapest pairs first, no expert over capacity."""
    n, k = dist.shape
    order = dist.flatten().argsort()
    assign = torch.full((n,), -1, dtype=torch.long)
    load = [0] * k
    done = 0
    for flat in order.tolist():
        row, col = divmod(flat, k)
        if assign[row] >= 0 or load[col] >= capacity:
            continue
        assign[row], load[col] = col, load[col] + 1
        done += 1
        if done == n:
            break
    return assign


def cluster_channels(features: torch.Tensor, experts: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Balanced k-means of channels ([channels, dims] features) into `experts` equal groups; returns
    the expert of each channel."""
    n = features.shape[0]
    if n % experts:
        raise ValueError(f"{n} channels do not split into {experts} equal experts")
    x = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=gen)[:experts]]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = balanced_assign(torch.cdist(x, centers), n // experts)
        if torch.equal(new, assign):
            break
        assign = new
        centers = torch.stack([x[assign == e].mean(0) for e in range(experts)])
    return assign


def expert_contributions(h: torch.Tensor, down_weight: torch.Tensor, assign: torch.Tensor, experts: int) -> torch.Tensor:
    """||W_down[:, e] h_e|| per token and expert: what removing the expert would change."""
    out = torch.empty(h.shape[0], experts)
    for e in range(experts):
        cols = (assign == e).nonzero().squeeze(1)
        out[:, e] = (h[:, cols].float() @ down_weight[:, cols].float().T).norm(dim=1)
    return out


def fit_router(x: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression from the FFN input to each expert's contribution: (weight [experts, hidden], bias)."""
    xa = torch.cat([x.float(), torch.ones(x.shape[0], 1)], 1)
    gram = xa.T @ xa
    gram += ridge * torch.diag(gram).mean() * torch.eye(gram.shape[0])
    sol = torch.linalg.solve(gram, xa.T @ targets.float())
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


def top_recall(predicted: torch.Tensor, actual: torch.Tensor, top_k: int) -> float:
    """Fraction of each token's truly top-k experts that the router also picks."""
    pick = predicted.topk(top_k, dim=1).indices
    true = actual.topk(top_k, dim=1).indices
    hits = (pick[:, :, None] == true[:, None, :]).any(-1).float().sum(1)
    return (hits / top_k).mean().item()
