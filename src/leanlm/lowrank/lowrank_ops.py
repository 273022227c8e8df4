"""The math of low-rank factorization: whitened truncated SVD and rank allocation under a parameter budget.

For a linear layer y = W x with calibration inputs X (rows) and H = X^T X = S S^T (S the lower Cholesky
factor), the output error of any replacement W' is ||(W - W') S||_F^2. Truncating the SVD of W S to rank r
(SVD-LLM, Wang et al. 2024) minimizes exactly that, and its error is the sum of the squared dropped
singular values; W' = A B with A = U_r sqrt(sigma_r), B = sqrt(sigma_r) V_r^T S^-1 (the square roots split
the scale evenly between the factors, so either quantizes as well as the other). Plain SVD is S = I;
ASVD (Yuan et al. 2023) is S = diag(mean |x|)^alpha.
"""

from __future__ import annotations

import torch

from leanlm.errors import LeanLMError


def cholesky_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular S with S S^T = H + damp * mean(diag H) * I, in float64 (Cholesky of a near-singular
    covariance in float32 fails on real activations). Dampening grows until the factorization succeeds."""
    H = H.double()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    scale = float(H.diagonal().mean()) or 1.0
    for extra in [damp] + [max(damp, 1e-6) * 10**k for k in range(1, 7)]:
        S, info = torch.linalg.cholesky_ex(H + extra * scale * eye)
        if int(info) == 0:
            return S
    raise LeanLMError("the calibration inputs' covariance is not positive definite even with 1e6x dampening; "
                      "check the calibration data (too few tokens?) and the model (NaN activations?)")


def whitener(kind: str, H: torch.Tensor | None, mean_abs: torch.Tensor | None, damp: float,
             alpha: float) -> torch.Tensor | None:
    """S for a method: the Cholesky factor (svd_llm), a diagonal of activation magnitudes (asvd), None (svd)."""
    if kind == "svd_llm":
        return cholesky_factor(H, damp)
    if kind == "asvd":
        return torch.diag(mean_abs.double().clamp_min(1e-6) ** alpha)
    return None


def spectrum(weight: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    """Singular values of W S (descending): their squares are the output errors of dropping them."""
    w = weight.double()
    return torch.linalg.svdvals(w if S is None else w @ S)


def loss_costs(weight: torch.Tensor, S: torch.Tensor | None, fisher: torch.Tensor) -> torch.Tensor:
    """The loss each singular direction of W S costs when dropped, to second order: sigma_i^2 times
    u_i^T diag(fisher) u_i. Directions are uncorrelated over the whitened inputs, so the costs add."""
    w = weight.double()
    U, sigma, _ = torch.linalg.svd(w if S is None else w @ S, full_matrices=False)
    return sigma.pow(2) * (fisher.double()[:, None] * U.pow(2)).sum(0) / 2


def factorize(weight: torch.Tensor, S: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [out, rank], B [rank, in]) with A @ B the rank-`rank` W' of least whitened error."""
    w = weight.double()
    U, sigma, Vh = torch.linalg.svd(w if S is None else w @ S, full_matrices=False)
    root = sigma[:rank].sqrt()
    A = U[:, :rank] * root
    B = root[:, None] * Vh[:rank]
    if S is not None:  # B S^-1: solve X S = B for X, S lower triangular (or diagonal)
        B = torch.linalg.solve_triangular(S, B, upper=False, left=False)
    return A.to(weight.dtype), B.to(weight.dtype)


def max_saving_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense weight."""
    return (out_features * in_features - 1) // (out_features + in_features)


def allocate_ranks(costs: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int,
                   multiple: int = 1, relative: bool = False) -> dict[str, int | None]:
    """Per layer a rank (None: stay dense) so that the layers' parameters total at most `budget`, with the
    least total cost: `costs[name][i]` is what dropping the layer's i-th singular direction costs (its
    loss, `loss_costs`; or with `relative`, squared singular values, each layer's over its total). Solved by a
    Lagrangian search over the price of a parameter: at price lam each layer picks the option (dense or
    rank r) minimizing error + lam * parameters, and lam is bisected to the smallest price that meets the
    budget. Ranks are multiples of `multiple` (matmul kernels run faster on round shapes)."""
    options = {name: _options(costs[name], *shapes[name], multiple, relative) for name in costs}
    dense = sum(o * i for o, i in shapes.values())
    if budget >= dense:
        return dict.fromkeys(costs)
    smallest = sum(min(p for _, p, _ in opts) for opts in options.values())
    if budget < smallest:
        raise LeanLMError(f"a budget of {budget:,} parameters is below what rank {multiple} everywhere keeps "
                          f"({smallest:,}); remove a smaller share")
    lo, hi = 0.0, 1.0
    while _pick(options, hi)[1] > budget:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _pick(options, mid)[1] > budget else (lo, mid)
    return _fill(options, _pick(options, hi)[0], budget)


def _fill(options: dict[str, list[tuple]], chosen: dict[str, int | None], budget: int) -> dict[str, int | None]:
    """Spend what the Lagrangian's discrete choice left of the budget: repeatedly move the layer whose next
    larger option buys the most error per parameter and still fits."""
    index = {name: next(i for i, o in enumerate(opts) if o[2] == chosen[name]) for name, opts in options.items()}
    spent = sum(options[name][i][1] for name, i in index.items())
    while True:
        best, best_gain = None, 0.0
        for name, i in index.items():
            opts = options[name]
            up = 0 if i == len(opts) - 1 else i + 1  # the dense option (index 0) is above the largest rank
            if up == i or (i == 0):
                continue
            extra = opts[up][1] - opts[i][1]
            if spent + extra <= budget and extra > 0:
                gain = (opts[i][0] - opts[up][0]) / extra
                if gain > best_gain:
                    best, best_gain = (name, up, extra), gain
        if best is None:
            return {name: options[name][i][2] for name, i in index.items()}
        name, up, extra = best
        index[name], spent = up, spent + extra


def _options(costs: torch.Tensor, out_features: int, in_features: int, multiple: int,
             relative: bool) -> list[tuple]:
    """(error, parameters, rank or None) for dense and every rank that saves parameters."""
    energy = costs.double()
    total = (float(energy.sum()) or 1.0) if relative else 1.0
    tail = (energy.sum() - energy.cumsum(0)) / total  # tail[r - 1]: the error of keeping r directions
    top = max_saving_rank(out_features, in_features)
    opts = [(0.0, out_features * in_features, None)]
    for r in range(multiple, top + 1, multiple):
        opts.append((float(tail[r - 1]), r * (out_features + in_features), r))
    return opts


def _pick(options: dict[str, list[tuple]], lam: float) -> tuple[dict[str, int | None], int]:
    chosen, params = {}, 0
    for name, opts in options.items():
        err, p, r = min(opts, key=lambda o: o[0] + lam * o[1])
        chosen[name], params = r, params + p
    return chosen, params


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float, multiple: int = 1) -> dict[str, int]:
    """The same share `keep` of each layer's parameters, as a rank (SVD-LLM's uniform compression ratio)."""
    ranks = {}
    for name, (o, i) in shapes.items():
        r = round(keep * o * i / (o + i) / multiple) * multiple
        if r < 1:
            raise LeanLMError(f"keeping {keep:.0%} of layer {name} ({o}x{i}) leaves rank 0; remove a smaller share")
        ranks[name] = r
    return ranks
