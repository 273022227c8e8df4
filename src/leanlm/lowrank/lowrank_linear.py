"""Runtime module for a factorized linear layer: y = up(down(x)), two plain nn.Linear children.

Being plain linears, the factors are what later steps see: a quantization step after `lowrank` packs
each factor (`targets: ["*"]` matches `...q_proj.down` and `...q_proj.up`), LoRA healing adapts them.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.core.packed import register_module


@register_module("low_rank")
class LowRankLinear(nn.Module):
    # llama.cpp's graphs multiply by one weight per projection; a factorized one has no tensor name there
    gguf_refusal = ("llama.cpp's model graphs take one weight matrix per projection and have no factorized "
                    "(low-rank) linear layer; export --format hf writes a leanlm checkpoint that leanlm runs")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool, dtype: str = "float32"):
        return cls(in_features, out_features, rank, bias, getattr(torch, dtype))

    @classmethod
    def from_factors(cls, linear: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> "LowRankLinear":
        """W ~ A @ B: A [out, rank] becomes `up`, B [rank, in] becomes `down`; the bias moves to `up`."""
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, A.shape[1], linear.bias is not None, w.dtype, w.device)
        mod.down.weight.data.copy_(B)
        mod.up.weight.data.copy_(A)
        if linear.bias is not None:
            mod.up.bias.data.copy_(linear.bias.data)
        mod.requires_grad_(w.requires_grad)
        return mod

    def manifest(self) -> dict:
        dtype = next(p for p in self.parameters() if p.is_floating_point()).dtype
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.up.bias is not None, "dtype": str(dtype).removeprefix("torch.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
