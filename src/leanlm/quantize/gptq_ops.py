"""GPTQ (Frantar et al., 2022) as pure tensor math: quantize one weight matrix column by column,
spreading each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian of the layer's inputs (H = sum x x^T over the calibration tokens).
"""

from __future__ import annotations

import torch

from leanlm.quantize.rtn_ops import compute_qparams, quant_range


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
         block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Returns (codes [out, in] int32, scale [out, groups], zero [out, groups] or None, loss).

    With `act_order`, columns are processed by decreasing Hessian diagonal; groups then have to be
    fixed before the pass (`static_groups`, or per-channel) so that they stay contiguous on disk.
    """
    if act_order and group_size is not None and not static_groups:
        raise ValueError("act_order with a group size needs static_groups=True (groups fixed before reordering)")
    W = weight.detach().float().clone()
    n_out, n_in = W.shape
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    dynamic = group_size is not None and not static_groups
    scale, zero = (torch.zeros(n_out, n_in // group_size), torch.zeros(n_out, n_in // group_size)) if dynamic \
        else compute_qparams(W, bits, group_size, symmetric)
    if dynamic and symmetric:
        zero = None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in)
    W, H = W[:, perm], H[perm][:, perm]
    hinv = _inverse_hessian_factor(H, damp)
    if group_size:
        block_size = max(group_size, block_size // group_size * group_size)  # groups never straddle blocks
    qmin, qmax = quant_range(bits, symmetric)
    codes = torch.zeros(n_out, n_in, dtype=torch.int32)
    loss = 0.0
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, h1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % group_size == 0:
                s, z = compute_qparams(W1[:, i : i + group_size], bits, None, symmetric)
                scale[:, col // group_size] = s[:, 0]
                if zero is not None:
                    zero[:, col // group_size] = z[:, 0]
            g = 0 if group_size is None else (col if dynamic else int(perm[col])) // group_size
            s, z = scale[:, g], (zero[:, g] if zero is not None else 0.0)
            w, d = W1[:, i], h1[i, i]
            q = torch.clamp(torch.round(w / s + z), qmin, qmax)
            codes[:, col] = q.to(torch.int32)
            err = (w - (q - z) * s) / d
            loss += float((err * d).pow(2).sum()) / 2
            W1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero, loss


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; more damping if H is numerically singular."""
    eye = torch.eye(H.shape[0])
    mean_diag = torch.mean(torch.diag(H))
    for factor in (1, 10, 100):
        try:
            L = torch.linalg.cholesky(H + damp * factor * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with 100x damping")
