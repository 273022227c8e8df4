"""Pure tensor math of weight pruning: masks from scores, N:M patterns, and SparseGPT's OBS update.

A mask is True where a weight is removed. Unstructured masks remove the lowest-scoring fraction
of each output row (Wanda's comparison group; magnitude uses the whole matrix); N:M masks remove
the N lowest of every M consecutive input weights of a row.
"""

from __future__ import annotations

import torch


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep 2 of every 4, i.e. prune n = m - keep of each m."""
    if pattern is None:
        return None
    try:
        keep, m = (int(x) for x in pattern.split(":"))
    except ValueError as err:
        raise ValueError(f"an N:M pattern looks like '2:4' (keep 2 of every 4), got {pattern!r}") from err
    if m < 2:
        raise ValueError(f"pattern {pattern!r}: M must be at least 2 (an N:M pattern keeps N of every M weights)")
    if not 0 < keep < m:
        raise ValueError(f"pattern {pattern!r} keeps {keep} of every {m}; N must be between 1 and M - 1 = {m - 1}")
    return keep, m


def nm_mask(scores: torch.Tensor, keep: int, m: int) -> torch.Tensor:
    """Remove all but the `keep` highest scores of every `m` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an {keep}:{m} pattern needs the input dimension ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    drop = groups.topk(m - keep, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest `sparsity` fraction of each row."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    return mask


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest `sparsity` fraction of the whole matrix."""
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    scores = weight.float().abs()
    return nm_mask(scores, *pattern) if pattern else matrix_mask(scores, sparsity)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float,
               pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda's score |W_ij| * ||X_j||_2, compared within each output row."""
    scores = weight.float().abs() * input_norm.float()[None, :]
    return nm_mask(scores, *pattern) if pattern else row_mask(scores, sparsity)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None,
              damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune with SparseGPT: column by column, choose the mask by w^2 / [H^-1]_jj^2 and spread each
    removed weight's error over the not-yet-visited columns through the inverse Hessian.

    Returns (pruned weight, mask)."""
    W = weight.float().clone()
    cols = W.shape[1]
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        err = torch.zeros_like(W1)
        diag = torch.diag(Hinv1)
        block_mask = None if pattern else matrix_mask(W1.pow(2) / diag[None, :].pow(2), sparsity)
        for i in range(end - start):
            if pattern and i % pattern[1] == 0:
                scores = W1[:, i : i + pattern[1]].pow(2) / diag[i : i + pattern[1]][None, :].pow(2)
                mask[:, start + i : start + i + pattern[1]] = nm_mask(scores, *pattern)
            col_mask = block_mask[:, i] if block_mask is not None else mask[:, start + i]
            w = W1[:, i]
            q = torch.where(col_mask, torch.zeros_like(w), w)
            err[:, i] = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, i : i + 1] @ Hinv1[i : i + 1, i:]
            W1[:, i] = q
        if block_mask is not None:
            mask[:, start:end] = block_mask
        W[:, start:end] = W1
        W[:, end:] -= err @ Hinv[start:end, end:]
    return W.to(weight.dtype), mask


def outlier_ratio(weight: torch.Tensor, input_norm: torch.Tensor, m: float = 5.0) -> tuple[int, int]:
    """OWL's outliers: Wanda scores above m times their layer mean; returns (outliers, weights)."""
    scores = weight.float().abs() * input_norm.float()[None, :]
    return int((scores > m * scores.mean()).sum()), scores.numel()


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity from outlier ratios (OWL, Yin et al.): blocks with more outliers keep more
    weights; the spread is 2 * lam and the mean stays at `target`."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    density = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    density = density - density.mean() + (1 - target)
    return (1 - density).clamp(0.0, 0.99).tolist()


@torch.no_grad()
def masked_refit(weight: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor, damp: float = 0.01,
                 start: torch.Tensor | None = None, iterations: int = 50) -> torch.Tensor:
    """The kept weights that best reproduce the dense layer's outputs for a fixed mask: each row solves
    H[K, K] w'[K] = H[K, :] w over its kept columns K (H = X^T X, damped). SparseGPT's sequential
    update approximates this optimum (Boža 2024 reaches it with ADMM). Rows keep different columns, so
    all rows are solved at once by conjugate gradients on the masked system, one [rows, in] x [in, in]
    product per iteration, preconditioned by H's diagonal and started from `start` (e.g. SparseGPT's
    weights) when given."""
    W, H = weight.float(), hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], device=H.device)
    keep = (~pruned.to(W.device)).float()
    inv_diag = keep / torch.diag(H)[None, :]

    def apply(v: torch.Tensor) -> torch.Tensor:
        return (v @ H) * keep

    x = (W if start is None else start.float()) * keep
    r = (W @ H) * keep - apply(x)
    z = r * inv_diag
    p, rz = z, (r * z).sum(1, keepdim=True)
    for _ in range(iterations):
        Ap = apply(p)
        alpha = rz / (p * Ap).sum(1, keepdim=True).clamp(min=1e-30)
        x, r = x + alpha * p, r - alpha * Ap
        z = r * inv_diag
        rz_next = (r * z).sum(1, keepdim=True)
        p, rz = z + (rz_next / rz.clamp(min=1e-30)) * p, rz_next
    return x.to(weight.dtype)
