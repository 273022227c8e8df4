"""Pure tensor math of structured pruning: which blocks a model can lose, which FFN channels it can
lose, and the least-squares refit that lets the remaining channels stand in for the removed ones.

Hidden states come as a list of [tokens, hidden] samples, one per block boundary (entry 0 is the
first block's input, entry L the last block's output), taken at the same token positions.
"""

from __future__ import annotations

import torch


def boundary_cosines(hidden: list[torch.Tensor], span: int = 1) -> torch.Tensor:
    """Mean cosine similarity between the hidden states `span` blocks apart, per starting boundary."""
    return torch.stack([torch.nn.functional.cosine_similarity(hidden[i].float(), hidden[i + span].float(), dim=-1).mean()
                        for i in range(len(hidden) - span)])


def block_influence(hidden: list[torch.Tensor]) -> torch.Tensor:
    """ShortGPT's block influence, 1 - cos(input, output), per block: near 0 means the block barely
    changes the residual stream."""
    return 1 - boundary_cosines(hidden, 1)


def angular_distance(hidden: list[torch.Tensor], span: int) -> torch.Tensor:
    """Gromov et al.'s arccos(cos)/pi between boundary l and l + span, per start l."""
    return torch.arccos(boundary_cosines(hidden, span).clamp(-1, 1)) / torch.pi


def blocks_to_remove(hidden: list[torch.Tensor], count: int, method: str, keep_last: bool = True) -> list[int]:
    """Indices of the `count` blocks to drop: the least influential ones ('block_influence'), or the
    contiguous run whose ends are closest in angle ('angular'). The last block stays when `keep_last`,
    since it maps the residual stream onto the LM head's input space."""
    blocks = len(hidden) - 1
    if method == "angular":
        dist = angular_distance(hidden, count)
        if keep_last:
            dist = dist[: blocks - count]
        start = int(dist.argmin())
        return list(range(start, start + count))
    scores = block_influence(hidden)
    if keep_last:
        scores[-1] = float("inf")
    return sorted(scores.topk(count, largest=False).indices.tolist())


def kept_channels(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most important channels, in their original order."""
    return importance.topk(keep).indices.sort().values


@torch.no_grad()
def refit_down(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Least-squares weights for the kept input channels that best reproduce the full layer's output
    on the calibration inputs: W' = W H[:, k] (H[k, k])^-1, with H = X^T X."""
    H = hessian.float()
    Hkk = H[kept][:, kept]
    Hkk = Hkk + damp * torch.diag(Hkk).mean() * torch.eye(len(kept), device=H.device)
    rhs = weight.float() @ H[:, kept]
    return torch.linalg.solve(Hkk, rhs.T).T.to(weight.dtype)


def head_importance(o_weight: torch.Tensor, hessian: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each query head's output energy on the calibration inputs, tr(W_h H_hh W_h^T), where W_h are the
    output projection's columns that read head h and H = X^T X of that projection's input."""
    W, H = o_weight.float(), hessian.float()
    heads = W.shape[1] // head_dim
    scores = [(W[:, s] @ H[s, s] * W[:, s]).sum() for s in (slice(h * head_dim, (h + 1) * head_dim)
                                                         for h in range(heads))]
    return torch.stack(scores)


def kept_heads(scores: torch.Tensor, kv: int, keep_kv: int, per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, KV heads) to keep: the `keep_kv` groups whose best `per_group` heads carry the most
    energy, and those heads inside each kept group; both in their original order, so kept query head
    i still reads kept KV head i // per_group."""
    by_group = scores.reshape(kv, -1)
    best = by_group.topk(per_group, dim=1)
    groups = best.values.sum(1).topk(keep_kv).indices.sort().values
    inside = best.indices[groups].sort(dim=1).values
    return (groups[:, None] * by_group.shape[1] + inside).flatten(), groups
