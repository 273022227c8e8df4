"""Pure tensor math of MoE-fication: group FFN channels that fire together into equal-sized experts
(the most important ones into always-on shared experts), fit a router that predicts, from the FFN
input, how much each expert will contribute, and refit the down projection for the experts the router
leaves out."""

from __future__ import annotations

import torch

from leanlm.core.anatomy import channel_importance


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
        # the matmul form: the direct one runs ~100x slower when there are fewer than 25 centres
        new = balanced_assign(torch.cdist(x, centers, compute_mode="use_mm_for_euclid_dist"), n // experts)
        if torch.equal(new, assign):
            break
        assign = new
        centers = torch.zeros_like(centers).index_add_(0, assign, x) / (n // experts)
    return assign


def assign_experts(h: torch.Tensor, down_weight: torch.Tensor, experts: int, shared: int = 0,
                   seed: int = 0) -> torch.Tensor:
    """The expert of each channel of `h` ([tokens, channels]): the shared experts (0 .. shared-1) take
    the channels contributing most (||h_j|| * ||W_down[:, j]||); the others are balanced k-means
    clusters of the remaining channels' firing patterns."""
    n = h.shape[1]
    if n % experts:
        raise ValueError(f"{n} channels do not split into {experts} equal experts")
    size = n // experts
    order = channel_importance(h.float().pow(2).sum(0), down_weight).argsort(descending=True)
    assign = torch.empty(n, dtype=torch.long)
    assign[order[: shared * size]] = torch.arange(shared * size) // size
    rest = order[shared * size:]
    assign[rest] = cluster_channels(h[:, rest].abs().T, experts - shared, seed=seed) + shared
    return assign


def routed_channels(scores: torch.Tensor, assign: torch.Tensor, shared: int, top_k: int) -> torch.Tensor:
    """0/1 mask [tokens, channels] of the channels that run: the shared experts' and those of the
    top_k routed experts by router score ([tokens, experts - shared])."""
    on = torch.zeros(scores.shape[0], scores.shape[1] + shared, dtype=torch.float32)
    on[:, :shared] = 1
    on.scatter_(1, scores.topk(top_k, dim=1).indices + shared, 1)
    return on[:, assign]


def refit_down(h: torch.Tensor, down_weight: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Down-projection weights that best reproduce the dense FFN output from only the channels that run:
    argmin_W' sum_t ||W' (keep_t * h_t) - W h_t||^2 (ridge `damp` relative to the mean diagonal).
    A channel the router often drops gets weights that also stand in for it from the ones that run."""
    kept = h.float() * keep
    gram = kept.T @ kept
    gram += damp * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0])
    return torch.linalg.solve(gram, (kept.T @ h.float()) @ down_weight.float().T).T.contiguous()


def expert_contributions(h: torch.Tensor, down_weight: torch.Tensor, assign: torch.Tensor, experts: int) -> torch.Tensor:
    """||W_down[:, e] h_e|| per token and expert: what removing the expert would change. Computed as
    sqrt(h_e^T (W_e^T W_e) h_e), which costs channels-per-expert instead of hidden per channel."""
    out = torch.empty(h.shape[0], experts)
    for e in range(experts):
        cols = (assign == e).nonzero().squeeze(1)
        part, weight = h[:, cols].float(), down_weight[:, cols].float()
        out[:, e] = ((part @ (weight.T @ weight)) * part).sum(1).clamp_min(0).sqrt()
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


def expert_groups(chosen: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (row, expert) pairs of `chosen` ([rows, top_k], ids in [0, experts)) by expert, for a
    grouped product: (rows, ids, ends) per pair, ends[e] the int32 end of expert e's run."""
    pairs = chosen.reshape(-1)
    order = pairs.argsort(stable=True)
    ends = torch.bincount(pairs, minlength=experts).cumsum(0).to(torch.int32)
    return order // chosen.shape[1], pairs[order], ends
