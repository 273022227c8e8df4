"""Float32 linears on CPU through oneDNN with the weight prepacked once, the kernel inductor uses when it
freezes a model.

PyTorch's eager nn.Linear on CPU repacks the weight inside the BLAS call on every call; for the few rows
that batch-1 decoding and speculative verification feed (1 to ~10 tokens), that repacking costs more than
the multiply: on the 2-core machine a [4, 576] x [576, 1536] product takes ~180 us eagerly and ~90 us
prepacked, one row ~70 us either way. Verifying a 4-token draft then costs ~1.3 decode steps, not ~2.5.

Inference only: the packed copy is taken when `pack_linears` runs and is not updated if the weight
changes; a module that is training (or any call that needs gradients) takes the eager path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rows per call the blocked layout is tuned for; measured: packing for 4+ rows keeps 1 row as fast as eager
BATCH_HINT = 8


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """An nn.Linear whose inference forward reads a oneDNN-prepacked copy of its weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared with the original (tied weights stay tied)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.dtype != torch.float32 or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn prepacked"


def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]


def has_float_linears(model: nn.Module) -> bool:
    return bool(_targets(model))


def pack_linears(model: nn.Module) -> int:
    """Replace every float32 CPU nn.Linear of `model` in place; returns how many. Refuses (rather than
    silently doing nothing) where oneDNN is missing or the model is not a float32 CPU model."""
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN (torch.backends.mkldnn); run without prepacked linears")
    targets = _targets(model)
    if not targets:
        raise ValueError("no float32 CPU nn.Linear to prepack (a quantized, half-precision or GPU model "
                         "has its own kernels)")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, PackedLinear(module))
    return len(targets)
