"""Runtime module for weight-only int4: two codes per byte in memory and on disk.

Codes are stored unsigned (0..15) with a float16 scale and a uint8 zero point per output channel
and group: w = (q - zero) * scale; with groups of 64 that is 4.375 bits per weight. On CPU the matmul goes through torch's packed int4 kernel
(bfloat16 activations), on CUDA through tinygemm (`_weight_int4pack_mm`); each kernel's tile layout is
derived once from the portable codes at first use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm import kernels
from leanlm.core.packed import QuantizedWeight, packed_tensor, register_module
from leanlm.quantize.rtn_ops import dequantize, pack_int4, unpack_int4

KERNEL_GROUPS = (32, 64, 128, 256)
KERNEL_MAX_ROWS = 128  # above this, dequantize + float matmul is faster on CPU (measured on 576/1536-wide layers)
HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
HAS_CUDA_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm")  # tinygemm, NVIDIA GPUs sm80+


@register_module("int4_weight_only")
class Int4Linear(nn.Module):
    PACKED = ("qweight", "scale", "zero")  # the frozen parameters holding codes and scales (core.models.parameter_count)

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if in_features % 2:
            raise ValueError(f"int4 packing needs an even input dimension, got {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = dtype
        groups = 1 if group_size is None else in_features // group_size
        self.qweight = packed_tensor(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.scale = packed_tensor(torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.zero = packed_tensor(torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel = None  # (packed tiles, scales_and_zeros) for the CPU kernel, built lazily

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, group_size: int | None = None,
              dtype: str = "float32") -> "Int4Linear":
        return cls(in_features, out_features, bias, group_size, getattr(torch, dtype))

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes, scale, zero, group_size) -> "Int4Linear":
        """`codes` as produced by rtn/gptq; symmetric codes (-7..7, zero None) are shifted to 1..15."""
        dtype = linear.weight.dtype
        if zero is None:
            codes, zero = codes + 8, torch.full_like(scale, 8.0)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, dtype,
                  device=linear.weight.device)
        mod.qweight.copy_(pack_int4(codes))
        mod.scale.copy_(scale.to(torch.float16))
        mod.zero.copy_(zero.round().to(torch.uint8))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod

    def manifest(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "group_size": self.group_size, "dtype": str(self.compute_dtype).removeprefix("torch.")}

    def packed_params(self) -> int:
        return self.in_features * self.out_features

    def quant_scheme(self) -> tuple[int, int | None, bool]:
        """(bits, group_size, symmetric), to requantize an updated weight the same way."""
        return 4, self.group_size, bool((self.zero == 8).all())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize(unpack_int4(self.qweight), self.scale.float(), self.zero.float(), self.group_size)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x, self.in_features, self.out_features, self.bias)
        if self._vnni_kernel_ok(x):
            return kernels.on_rows(lambda r: kernels.int4_mm(r, self.qweight, self.scale, self.zero,
                                                             self.group_size or self.in_features), *shape, torch.float32)
        if self._cuda_kernel_ok(x):
            tiles, sz = self._kernel_weights(cuda=True)
            return kernels.on_rows(lambda r: torch.ops.aten._weight_int4pack_mm(r, tiles, self.group_size, sz),
                                   *shape, torch.bfloat16)
        if self._kernel_ok(x):
            tiles, sz = self._kernel_weights()
            return kernels.on_rows(lambda r: torch.ops.aten._weight_int4pack_mm_for_cpu(r, tiles, self.group_size, sz),
                                   *shape, torch.bfloat16)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def embedding_view(self, padding_idx: int | None = None) -> nn.Module:
        """An input embedding that reads this layer's codes, for a tied LM head (quantize/int4_embedding.py)."""
        from leanlm.quantize.int4_embedding import TiedInt4Embedding

        return TiedInt4Embedding.sharing(self, padding_idx)

    def quantized_codes(self) -> QuantizedWeight:
        """Codes 0..15 with their zero points (8 everywhere when symmetric)."""
        return QuantizedWeight(unpack_int4(self.qweight), self.scale, self.zero, 4, self.group_size)

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        rows = x.numel() // self.in_features
        return HAS_INT4_KERNEL and x.device.type == "cpu" and self.group_size in KERNEL_GROUPS and rows <= KERNEL_MAX_ROWS

    def _vnni_kernel_ok(self, x: torch.Tensor) -> bool:
        group = self.group_size or self.in_features
        # a model cast to another dtype also casts these buffers; the kernel reads float16 scales only
        return (x.device.type == "cpu" and x.numel() == self.in_features and self.in_features % 32 == 0
                and self.scale.dtype == torch.float16 and self.zero.dtype == torch.uint8
                and (group in (32, 64) or group % 128 == 0 or group == self.in_features) and kernels.cpu_kernels())

    def _cuda_kernel_ok(self, x: torch.Tensor) -> bool:
        rows = x.numel() // self.in_features
        return (x.device.type == "cuda" and HAS_CUDA_INT4_KERNEL and self.group_size in KERNEL_GROUPS
                and rows <= KERNEL_MAX_ROWS and self.in_features % 32 == 0 and self.out_features % 8 == 0)

    def _kernel_weights(self, cuda: bool = False):
        if self._kernel is None and cuda:
            codes = unpack_int4(self.qweight)
            # tinygemm wants the even column in the high nibble, and K tiled by 16 * inner_k_tiles
            high_first = (codes[:, 0::2] << 4) | codes[:, 1::2]
            inner = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            tiles = torch.ops.aten._convert_weight_to_int4pack(high_first.contiguous(), inner)
            self._kernel = (tiles, self._scales_and_zeros())
        if self._kernel is None:
            codes = unpack_int4(self.qweight).to(torch.int32)
            tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            self._kernel = (tiles, self._scales_and_zeros())
        return self._kernel

    def _scales_and_zeros(self) -> torch.Tensor:
        # both kernels compute (q - 8) * scale + z, so z = (8 - zero) * scale; layout [groups, out, 2]
        z = (8 - self.zero.float()) * self.scale.float()
        return torch.stack([self.scale.float(), z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def _apply(self, fn, *args, **kwargs):
        self._kernel = None  # device/dtype moves invalidate the derived kernel layout
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"
