"""Pure tensor math of round-to-nearest quantization (no modules, testable on random tensors)."""

from __future__ import annotations

import warnings

import torch

_COMPILED: dict[str, object] = {}


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:  # the symmetric grid drops -2^(b-1) so that +/- scale is exact
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out, inp = weight.shape
    size = inp if group_size is None else group_size
    if inp % size:
        raise ValueError(f"group size {size} does not divide input dimension {inp}")
    return weight.reshape(out, inp // size, size)


def compute_qparams(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    clip: torch.Tensor | float | None = None):
    """Scales (and zero points when asymmetric) per output channel and group: [out, groups].

    `clip` (<= 1, per [out, groups] or one number) shrinks the range, trading clipped outliers for
    a finer grid (AWQ's clip search picks it); above 1 it widens it (`search_clip`)."""
    return qparams_from_range(*weight_range(weight, group_size, symmetric), bits, symmetric, clip)


def weight_range(weight: torch.Tensor, group_size: int | None, symmetric: bool):
    """(lo, hi) per output channel and group; symmetric: (None, max |w|)."""
    w = _grouped(weight.float(), group_size)
    if symmetric:
        return None, w.abs().amax(-1)
    return w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)


def qparams_from_range(lo: torch.Tensor | None, hi: torch.Tensor, bits: int, symmetric: bool,
                       clip: torch.Tensor | float | None = None):
    qmin, qmax = quant_range(bits, symmetric)
    clip = 1.0 if clip is None else clip
    if symmetric:
        return (hi * clip / qmax).clamp_min(1e-12), None
    scale = ((hi - lo) * clip / (qmax - qmin)).clamp_min(1e-12)
    zero = torch.round(-lo * clip / scale).clamp(qmin, qmax)
    return scale, zero


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
             group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Integer codes [out, in] (int8 storage) for the given scales/zeros."""
    w = _grouped(weight.float(), group_size)
    qmin, qmax = quant_range(bits, symmetric)
    q = w / scale[..., None]
    if zero is not None:
        q = q + zero[..., None]
    return torch.round(q).clamp(qmin, qmax).reshape(weight.shape).to(torch.int8 if symmetric or bits < 8 else torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    q = _grouped(codes.float(), group_size)
    if zero is not None:
        q = q - zero[..., None]
    return (q * scale[..., None]).reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes in 0..15 -> [out, in/2] bytes, even column in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def rtn(weight: torch.Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
        clip: torch.Tensor | float | None = None):
    """Round-to-nearest: returns (codes, scale, zero)."""
    scale, zero = compute_qparams(weight, bits, group_size, symmetric, clip)
    return quantize(weight, scale, zero, bits, group_size, symmetric), scale, zero


def _rounding_error(w, scale, offset, qmin: int, qmax: int) -> torch.Tensor:
    """w minus its round trip through the grid (scale, offset: broadcast over w's last dimension)."""
    return w - (torch.round(w / scale + offset).clamp(qmin, qmax) - offset) * scale


def _error_cost(w, d, scale, offset, qmin: int, qmax: int) -> torch.Tensor:
    return (_rounding_error(w, scale, offset, qmin, qmax) ** 2 * d).sum(-1)


def _candidate_cost(w, d, scale, offset, qmin: int, qmax: int) -> torch.Tensor:
    """`_error_cost`, compiled into one fused loop (about 10x faster on CPU: a search evaluates it hundreds
    of times per layer); if compiling fails, it says so once and runs eagerly (same numbers, slower)."""
    fn = _COMPILED.get("cost")
    if fn is None:
        try:
            compiled = torch.compile(_error_cost, dynamic=True)
            out = compiled(w, d, scale, offset, qmin, qmax)
            _COMPILED["cost"] = compiled
            return out
        except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager path, which is exact
            warnings.warn(f"could not compile the scale search's cost ({type(exc).__name__}: {exc}); "
                          "running it eagerly, about 10x slower", stacklevel=2)
            fn = _COMPILED["cost"] = _error_cost
    return fn(w, d, scale, offset, qmin, qmax)


@torch.no_grad()
def search_clip(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                ratios: torch.Tensor, refine: int = 8) -> torch.Tensor:
    """Per output channel and group, the range ratio (`clip` of `compute_qparams`) among `ratios` whose
    round-to-nearest error e causes the least output error e H e^T, H the layer's input second moments
    X^T X / n ([in, in], or only its diagonal [in]).

    Every ratio is scored with the diagonal of H (cheap); the `refine` best per channel and group are
    scored again with H's block for that group, cross terms included, when the full H is given.
    A ratio above 1 widens the grid: a slightly coarser step that puts the weights of the inputs with
    the largest activations (nearly) on the grid can beat the max-abs scale."""
    w = _grouped(weight.float(), group_size)
    diag = hessian.diagonal() if hessian.dim() == 2 else hessian
    d = diag.float().to(w.device).reshape(1, *w.shape[1:])
    qmin, qmax = quant_range(bits, symmetric)
    lo, hi = weight_range(weight, group_size, symmetric)
    costs = []
    for ratio in ratios.tolist():
        scale, zero = qparams_from_range(lo, hi, bits, symmetric, ratio)
        offset = torch.zeros_like(scale) if zero is None else zero
        costs.append(_candidate_cost(w, d, scale[..., None], offset[..., None], qmin, qmax))
    costs = torch.stack(costs)
    ratios = ratios.to(w.device, torch.float32)
    if hessian.dim() == 1:
        return ratios[costs.argmin(0)]
    return _refine_with_hessian(w, hessian, ratios, costs, bits, symmetric, refine, lo, hi)


def _refine_with_hessian(w, hessian, ratios, costs, bits, symmetric, refine, lo, hi) -> torch.Tensor:
    groups, size = w.shape[1:]
    blocks = torch.stack([hessian[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(groups)]).float()
    qmin, qmax = quant_range(bits, symmetric)
    blocks = blocks.to(w.device)

    def full_cost(clip: torch.Tensor) -> torch.Tensor:
        scale, zero = qparams_from_range(lo, hi, bits, symmetric, clip)
        err = _rounding_error(w, scale[..., None], 0.0 if zero is None else zero[..., None], qmin, qmax)
        return torch.einsum("ogs,gst,ogt->og", err, blocks, err)

    # the plain range (ratio 1) is the starting point, so the result is never worse than it
    best = torch.ones(w.shape[:2], device=w.device)
    best_cost = full_cost(best)
    for index in costs.topk(min(refine, len(ratios)), dim=0, largest=False).indices:
        clip = ratios[index]
        cost = full_cost(clip)
        better = cost < best_cost
        best, best_cost = torch.where(better, clip, best), torch.where(better, cost, best_cost)
    return best


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """The float weight that the quantized one stands for (quantize, then dequantize)."""
    codes, scale, zero = rtn(weight, bits, group_size, symmetric, clip)
    return dequantize(codes, scale, zero, group_size)
