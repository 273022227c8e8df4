"""Pure tensor math of activation sparsity (TEAL): per-layer magnitude thresholds and the batch-1
product that reads only the weight rows of the inputs that survive them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def threshold_for(samples: torch.Tensor, sparsity: float) -> float:
    """The |x| below which a `sparsity` fraction of the sampled input values fall."""
    flat = samples.detach().abs().flatten().float()
    k = max(1, int(round(flat.numel() * sparsity)))
    return flat.kthvalue(k).values.item()


def scores(x: torch.Tensor, column_norms: torch.Tensor | None) -> torch.Tensor:
    """How much each input moves the output: |x_j|, or |x_j| * ||W[:, j]|| when weighted by the
    layer's column norms (WINA), which ranks inputs by the error their removal causes."""
    return x.abs() if column_norms is None else x.abs() * column_norms


def sparsify(x: torch.Tensor, threshold: torch.Tensor, column_norms: torch.Tensor | None = None) -> torch.Tensor:
    return x.masked_fill(scores(x, column_norms) <= threshold, 0)


def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
                bias: torch.Tensor | None = None, column_norms: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T for one input row, touching only the rows of W^T ([in, out]) whose input scores above
    the threshold: an embedding-bag sum weighted by those inputs, one fused pass over the rows read."""
    v = x.reshape(-1)
    active = (scores(v, column_norms) > threshold).nonzero().squeeze(1)
    weights = v[active].to(weight_t.dtype)
    # torch parallelises embedding_bag over bags, so the rows are split into one bag per thread
    # (padded with zero-weight rows) and the partial sums added
    bags = max(2, torch.get_num_threads())
    pad = -len(active) % bags
    if pad:
        active = torch.cat([active, active.new_zeros(pad)])
        weights = torch.cat([weights, weights.new_zeros(pad)])
    out = F.embedding_bag(active.view(bags, -1), weight_t, per_sample_weights=weights.view(bags, -1), mode="sum").sum(0)
    out = out.reshape(*x.shape[:-1], weight_t.shape[1]).to(x.dtype)
    return out if bias is None else out + bias
