"""Runtime module for weight-only int8: codes stay packed in memory and on disk.

Decode on CPU reads 1 byte per weight instead of 4: up to 8 rows through leanlm's AVX-512 VNNI kernel
(float32-grade activations, `leanlm.kernels`), up to 16 through torch's int8 weight-packed matmul
(bfloat16 activations); long prompts dequantize the weight once per call and use the float matmul,
which is faster there on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.core.packed import QuantizedWeight, packed_tensor, register_module
from leanlm.quantize.rtn_ops import dequantize, rtn

HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
SMALL_BATCH = 16  # rows up to which the packed int8 kernel beats dequantize + float matmul on CPU
VNNI_ROWS = 8  # rows up to which leanlm's kernel beats torch's (measured on a 30-layer weight stream)


@register_module("int8_weight_only")
class Int8Linear(nn.Module):
    PACKED = ("qweight", "scale", "zero")  # the frozen parameters holding codes and scales (core.models.parameter_count)

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None,
                 symmetric: bool, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        groups = 1 if group_size is None else in_features // group_size
        code_dtype = torch.int8 if symmetric else torch.uint8
        self.qweight = packed_tensor(torch.empty(out_features, in_features, dtype=code_dtype, device=device))
        self.scale = packed_tensor(torch.empty(out_features, groups, dtype=dtype, device=device))
        self.zero = None if symmetric else packed_tensor(torch.empty(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel_scales: dict[torch.dtype, torch.Tensor] = {}  # per-channel scale as each kernel takes it

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, group_size: int | None = None,
              symmetric: bool = True, dtype: str = "float32") -> "Int8Linear":
        return cls(in_features, out_features, bias, group_size, symmetric, getattr(torch, dtype))

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes, scale, zero, group_size, symmetric) -> "Int8Linear":
        dtype = linear.weight.dtype
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, symmetric,
                  dtype, device=linear.weight.device)
        mod.qweight.copy_(codes)
        mod.scale.copy_(scale.to(dtype))
        if zero is not None:
            mod.zero.copy_(zero.to(dtype))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int | None = None, symmetric: bool = True) -> "Int8Linear":
        """`linear` rounded to the nearest int8 codes (max-abs scales)."""
        codes, scale, zero = rtn(linear.weight.data, 8, group_size, symmetric)
        return cls.from_codes(linear, codes, scale, zero, group_size, symmetric)

    def manifest(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "dtype": str(self.scale.dtype).removeprefix("torch.")}

    def packed_params(self) -> int:
        return self.in_features * self.out_features

    def quant_scheme(self) -> tuple[int, int | None, bool]:
        """(bits, group_size, symmetric), to requantize an updated weight the same way."""
        return 8, self.group_size, self.symmetric

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize(self.qweight, self.scale.float(), None if self.zero is None else self.zero.float(), self.group_size)
        return w.to(dtype or self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._packed_kernel_ok(x) and rows <= VNNI_ROWS and kernels.cpu_kernels():
            return kernels.on_rows(lambda r: kernels.int8_mm(r, self.qweight, self._float_scale()), x,
                                   self.in_features, self.out_features, self.bias, torch.float32)
        if self._packed_kernel_ok(x) and rows <= SMALL_BATCH:
            return kernels.on_rows(lambda r: torch._weight_int8pack_mm(r, self.qweight, self._bf16_scale()), x,
                                   self.in_features, self.out_features, self.bias, torch.bfloat16)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def embedding_view(self, padding_idx: int | None = None) -> nn.Module:
        """An input embedding that reads this layer's codes, for a tied LM head (quantize/int8_embedding.py)."""
        from leanlm.quantize.int8_embedding import TiedInt8Embedding

        return TiedInt8Embedding.sharing(self, padding_idx)

    def quantized_codes(self) -> QuantizedWeight:
        zero = None if self.zero is None else self.zero.float()
        return QuantizedWeight(self.qweight, self.scale.float(), zero, 8, self.group_size)

    # converting the scale per call costs about what a kernel does at batch 1, so each kernel's copy is kept
    def _float_scale(self) -> torch.Tensor:
        if self.scale.dtype == torch.float32:
            return self.scale.view(-1)
        if self._kernel_scales.get(torch.float32) is None:
            self._kernel_scales[torch.float32] = self.scale.view(-1).float()
        return self._kernel_scales[torch.float32]

    def _bf16_scale(self) -> torch.Tensor:
        if self._kernel_scales.get(torch.bfloat16) is None:
            self._kernel_scales[torch.bfloat16] = self.scale[:, 0].to(torch.bfloat16)
        return self._kernel_scales[torch.bfloat16]

    def _packed_kernel_ok(self, x: torch.Tensor) -> bool:
        # torch's kernel segfaults on codes that are not 64-byte aligned (leanlm's loader aligns them);
        # a compiled graph cannot read data_ptr; there the loader's alignment is relied on
        aligned = torch.compiler.is_compiling() or self.qweight.data_ptr() % 64 == 0
        return x.device.type == "cpu" and self.symmetric and self.group_size is None and HAS_INT8_KERNEL and aligned

    def _apply(self, fn, *args, **kwargs):
        self._kernel_scales = {}  # device/dtype moves invalidate the cached kernel scales
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_scales = {}  # so do new scales
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=8, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")
