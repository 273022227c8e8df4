"""Pure tensor math of rotated activation sparsity: the input basis in which the inputs a layer group
can skip cost it the least.

A group of layers reading the same tensor x computes y = W x. In a new basis z = P^T x (P invertible)
it computes the same y as (W P^-T) z, and zeroing a coordinate z_j now costs ||W P^-T e_j|| |z_j|.
TEAL zeroes the smallest |x_j| in the standard basis, where the inputs are correlated and spread their
energy over many coordinates. Here P whitens the layers' output metric M = sum W^T W and then takes
the principal axes of the inputs in that metric (eigenvectors of M^1/2 C M^1/2, with C = E[x x^T]):
in that basis the output error of dropping a set of coordinates is just the sum of their squares,
and the energy of a typical input sits in as few coordinates as a fixed basis allows.
"""

from __future__ import annotations

import torch

DAMP = 1e-3  # of the metric's mean eigenvalue: keeps M^-1/2 finite when the group has fewer outputs than inputs


def output_basis(weights: list[torch.Tensor], covariance: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """P ([in, in]) such that z = x @ P is the basis described above, columns by decreasing variance."""
    metric = sum(w.double().T @ w.double() for w in weights)
    metric = metric + damp * metric.diagonal().mean() * torch.eye(len(metric), dtype=torch.float64)
    eigval, eigvec = torch.linalg.eigh(metric)
    root = eigvec @ torch.diag(eigval.clamp_min(0).sqrt()) @ eigvec.T
    cov = covariance.double()
    _, axes = torch.linalg.eigh(root @ cov @ root)
    return (root @ axes.flip(1)).float()


def fold_into_readers(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """W P^-T: the reader's weight for inputs z = x @ P, computed in float64 (P need not be orthogonal)."""
    return torch.linalg.solve(basis.double(), weight.double().T).T.to(weight.dtype)
