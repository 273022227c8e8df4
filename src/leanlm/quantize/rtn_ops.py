"""Pure tensor math of round-to-nearest quantization (no modules, testable on random tensors)."""

from __future__ import annotations

import torch


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
    a finer grid (AWQ's clip search picks it)."""
    w = _grouped(weight.float(), group_size)
    qmin, qmax = quant_range(bits, symmetric)
    clip = 1.0 if clip is None else clip
    if symmetric:
        scale = w.abs().amax(-1) * clip / qmax
        return scale.clamp_min(1e-12), None
    lo = w.amin(-1).clamp(max=0) * clip
    hi = w.amax(-1).clamp(min=0) * clip
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
    zero = torch.round(-lo / scale).clamp(qmin, qmax)
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


def rtn(weight: torch.Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
        clip: torch.Tensor | float | None = None):
    """Round-to-nearest: returns (codes, scale, zero)."""
    scale, zero = compute_qparams(weight, bits, group_size, symmetric, clip)
    return quantize(weight, scale, zero, bits, group_size, symmetric), scale, zero


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """The float weight that the quantized one stands for (quantize, then dequantize)."""
    codes, scale, zero = rtn(weight, bits, group_size, symmetric, clip)
    return dequantize(codes, scale, zero, group_size)
