"""Runtime module of rotated activation sparsity: the norm in front of a group of sparse layers, followed
by the change of basis those layers now read (`rotation_ops`). One dense [d, d] product per group and
token, in float32 or as leanlm's int8 weight-only layer (a quarter of the bytes)."""

from __future__ import annotations

import torch
from torch import nn

from leanlm.core.packed import register_module, runtime_module


@register_module("norm_then_rotate")
class NormThenRotate(nn.Module):
    """z = norm(x) @ P. The wrapped norm keeps its own class (RMSNorm, LayerNorm, ...) and weights."""
    export_refusal = ("the layers after it read rotated inputs, which no other runtime computes; export the model "
                      "saved before the act_sparsity step, or sparsify with `rotation: none`")

    def __init__(self, norm: nn.Module, rotation: nn.Module):
        super().__init__()
        self.norm, self.rotation = norm, rotation

    @classmethod
    def wrap(cls, norm: nn.Module, hidden_size: int, rotation_dtype: str = "float32") -> "NormThenRotate":
        """An unfilled instance around the model's own norm, for loading a checkpoint (core.models)."""
        return cls(norm, nn.Linear(hidden_size, hidden_size, bias=False))

    @classmethod
    def build(cls, norm: nn.Module, basis: torch.Tensor, rotation_dtype: str) -> "NormThenRotate":
        linear = nn.Linear(len(basis), len(basis), bias=False, device=basis.device)
        linear.weight.data.copy_(basis.T)
        if rotation_dtype == "int8":  # leanlm's int8 layer, found by its scheme: sparsify does not import quantize
            linear = runtime_module("int8_weight_only").from_float(linear)
        return cls(norm, linear)

    def basis(self) -> torch.Tensor:
        """P as the runtime applies it (after int8 rounding), which the readers' weights must match."""
        rot = self.rotation
        weight = rot.dequantized_weight(torch.float32) if hasattr(rot, "dequantized_weight") else rot.weight.float()
        return weight.T

    def manifest(self) -> dict:
        return {"hidden_size": self.rotation.in_features,
                "rotation_dtype": "int8" if hasattr(self.rotation, "packed_params") else "float32"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.norm(x))
