"""Runtime module for activation sparsity: a linear layer that zeroes inputs below its calibrated
threshold and, for a single token (batch-1 decode), reads only the weight rows of the inputs that
survive, so the bytes read per token drop with the sparsity. Inputs are ranked by |x_j| times the
weight column norm ||W[:, j]|| (all ones for TEAL's plain |x_j|).

The weight is stored transposed ([in, out]) so each input's weights are one contiguous row; the
many-token path (prefill) uses the same tensor through a transposed matmul. On CPU the batch-1 product
is leanlm's fused kernel (`leanlm.kernels.sparse_gemv`), which also runs inside compiled graphs;
elsewhere a torch gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.core.packed import register_module
from leanlm.sparsify.act_sparse_ops import scores, sparse_gemv, sparsify


@register_module("act_sparse")
class ActSparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features, dtype=dtype, device=device),
                                     requires_grad=False)
        self.register_buffer("threshold", torch.zeros((), dtype=dtype, device=device))
        self.register_buffer("column_norms", torch.ones(in_features, dtype=dtype, device=device))
        self.tally: list[int] | None = None  # [inputs skipped, inputs seen] while core.evaluate measures
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, dtype: str = "float32") -> "ActSparseLinear":
        return cls(in_features, out_features, bias, getattr(torch, dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float, weighted: bool = True) -> "ActSparseLinear":
        w = linear.weight.data
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        mod.weight_t.data.copy_(w.T)
        mod.threshold.fill_(threshold)
        if weighted:
            mod.column_norms.copy_(w.float().norm(dim=0))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod

    def manifest(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.weight_t.dtype).removeprefix("torch.")}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ([out, in]); exporting through it drops the activation sparsity."""
        return self.weight_t.T.contiguous().to(dtype or self.weight_t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tally is not None and not torch.compiler.is_compiling():
            self.tally[0] += int((scores(x, self.column_norms) <= self.threshold).sum())
            self.tally[1] += x.numel()
        if x.numel() == self.in_features and self._kernel_ok(x):  # one fused op, also inside compiled graphs
            return kernels.on_rows(lambda r: kernels.sparse_gemv(r.view(-1), self.weight_t, self.threshold,
                                                                 self.column_norms),
                                   x, self.in_features, self.out_features, self.bias, torch.float32)
        # torch's row gather has a data-dependent size, which a compiled graph cannot hold: masked dense there
        if x.numel() == self.in_features and not torch.compiler.is_compiling():
            return sparse_gemv(x, self.weight_t, self.threshold, self.bias, self.column_norms)
        return F.linear(sparsify(x, self.threshold, self.column_norms), self.weight_t.T, self.bias)

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight_t.dtype == torch.float32
                and self.weight_t.is_contiguous() and kernels.cpu_kernels())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold.item():.4g}"
