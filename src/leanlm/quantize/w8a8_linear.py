"""Runtime module for W8A8: int8 weights (one scale per output channel) times int8 activations
(one scale per token, computed on the fly), multiplied as integers by `torch._int_mm`.

On CPUs with VNNI/AMX the integer matmul runs several times faster than float32 (oneDNN), which is
what speeds up prefill; the int32 result is rescaled by the two scales. On CUDA, `_int_mm` needs
more than 16 rows and dimensions divisible by 8; other shapes compute the same numbers with a float
matmul of the dequantized operands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.core.packed import QuantizedWeight, packed_tensor, register_module

HAS_INT_MM = hasattr(torch, "_int_mm")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of `x` and the row scales ([rows, 1], float32)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(1e-8).div_(127)
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


class _LastInput:
    """q/k/v (and gate/up) read the same tensor: quantize it once, not once per layer.

    The cache holds the last input itself, so `is` cannot match a different tensor; an in-place change
    in between is caught by the version counter (inference-mode tensors have none, and the model's
    forward never modifies a layer input in place)."""
    tensor: torch.Tensor | None = None
    version: int | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    @classmethod
    def quantize(cls, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        version = None if x.is_inference() else x._version
        if x is not cls.tensor or version != cls.version:
            cls.codes, cls.scale = quantize_per_token(x)
            cls.tensor, cls.version = x, version
        return cls.codes, cls.scale


@register_module("w8a8_dynamic")
class W8A8Linear(nn.Module):
    PACKED = ("qweight", "scale")  # the frozen parameters holding codes and scales (core.models.parameter_count)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = packed_tensor(torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.scale = packed_tensor(torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, dtype: str = "float32") -> "W8A8Linear":
        return cls(in_features, out_features, bias, getattr(torch, dtype))

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes: torch.Tensor, scale: torch.Tensor) -> "W8A8Linear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                  device=linear.weight.device)
        mod.qweight.copy_(codes)
        mod.scale.copy_(scale.reshape(-1).float())
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod

    def manifest(self) -> dict:
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(dtype).removeprefix("torch.")}

    def packed_params(self) -> int:
        return self.in_features * self.out_features

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # the graph dedupes the shared quantization itself (the host-side cache would break it), and
            # quantizes the 2-D view: inductor fed _int_mm wrong codes when they were reshaped afterwards
            codes, row_scale = quantize_per_token(x.reshape(-1, self.in_features))
        else:
            codes, row_scale = _LastInput.quantize(x)
        codes, row_scale = codes.reshape(-1, self.in_features), row_scale.reshape(-1, 1)
        if self._int_mm_ok(codes):
            acc = torch._int_mm(codes, self.qweight.t()).float()
        else:
            acc = F.linear(codes.float(), self.qweight.float())
        out = acc.mul_(row_scale).mul_(self.scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def quantized_codes(self) -> QuantizedWeight:
        """The int8 weights (another runtime quantizes activations its own way: llama.cpp to 8 bits too)."""
        return QuantizedWeight(self.qweight, self.scale[:, None], None, 8, None)

    def _int_mm_ok(self, flat: torch.Tensor) -> bool:
        if not HAS_INT_MM:
            return False
        if flat.device.type == "cpu":
            return True
        return flat.device.type == "cuda" and flat.shape[0] > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8, activations=int8"
