"""Sparse weights on disk: a pruned linear's weight is stored as a bitmask (1 bit per weight) plus its
nonzero values, so a 50%-sparse float checkpoint takes about 53% of the dense bytes. Loading restores
the dense tensor; the in-memory model is unchanged."""

from __future__ import annotations

import torch
from torch import nn

from leanlm.core.structure import is_linear

MIN_SPARSITY = 0.25  # below this the bitmask and index overhead is not worth it
_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def sparse_weights(model: nn.Module, min_sparsity: float = MIN_SPARSITY) -> list[str]:
    """State-dict names of linear weights with at least `min_sparsity` zeros."""
    names = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if is_linear(module) and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
            if (weight == 0).float().mean().item() >= min_sparsity:
                names.append(f"{name}.weight")
    return names


def pack(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask as uint8, nonzero values in row-major order)."""
    mask = (tensor != 0).flatten()
    padded = torch.cat([mask, mask.new_zeros(-mask.numel() % 8)]).view(-1, 8).to(torch.uint8)
    return (padded * _BITS).sum(1, dtype=torch.uint8), tensor.flatten()[mask].contiguous()


def unpack(bitmask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    mask = ((bitmask[:, None] & _BITS) != 0).flatten()[:numel]
    dense = values.new_zeros(numel)
    dense[mask] = values
    return dense.view(shape)


def pack_state(state: dict[str, torch.Tensor], names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Replace each named weight by `<name>.bitmask` and `<name>.values`; returns the new state and the
    shapes the manifest records."""
    out, shapes = dict(state), {}
    for name in names:
        if name not in out:
            continue  # a tied alias, stored under its other name
        tensor = out.pop(name)
        out[f"{name}.bitmask"], out[f"{name}.values"] = pack(tensor)
        shapes[name] = list(tensor.shape)
    return out, shapes


def unpack_state(state: dict[str, torch.Tensor], shapes: dict) -> dict[str, torch.Tensor]:
    for name, shape in shapes.items():
        state[name] = unpack(state.pop(f"{name}.bitmask"), state.pop(f"{name}.values"), shape)
    return state
