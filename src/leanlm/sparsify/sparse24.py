"""The 2:4 runtime: `sparse24_(model)` turns every 2:4-pruned linear layer into `Sparse24Linear`, which
keeps the weight compressed (56% of the dense bytes, in memory and on disk) and multiplies through
leanlm's Triton kernel on a CUDA GPU (`kernels/sparse24.py`).

It is a runtime for GPUs: on CPU there is no 2:4 kernel, every call expands the weight first and is
slower than the dense layer, which `sparse24_` and the module say loudly rather than quietly.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.core.packed import packed_tensor, register_module
from leanlm.core.selection import ChecksLayers, select_layers
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import check_arguments, replace_module
from leanlm.errors import ConfigError
from leanlm.kernels import sparse24 as kernel
from leanlm.kernels.sparse24_ops import (
    compress_24,
    compressed_bytes,
    decompress_24,
    violations_24,
)

log = logging.getLogger(__name__)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
CPU_WARNING = ("2:4 layers run on {device}, where leanlm has no 2:4 kernel: each call expands the weight, "
               "slower than the dense model; run them on a CUDA GPU (pip install triton)")


@register_module("sparse_2of4")
class Sparse24Linear(nn.Module):
    PACKED = ("values", "meta")
    _warned = False

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = packed_tensor(torch.empty(out_features, in_features // 2, dtype=dtype, device=device))
        self.meta = packed_tensor(torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, dtype: str = "float16") -> "Sparse24Linear":
        return cls(in_features, out_features, bias, getattr(torch, dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Sparse24Linear":
        weight = linear.weight.data
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        values, meta = compress_24(weight)
        mod.values.data.copy_(values)
        mod.meta.data.copy_(meta)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod

    def manifest(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.values.dtype).removeprefix("torch.")}

    def packed_params(self) -> int:
        return self.in_features * self.out_features

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return decompress_24(self.values, self.meta).to(dtype or self.values.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _has_kernel(self.values) and x.dtype == self.values.dtype:
            out = kernel.sparse24_op(x, self.values, self.meta)
            return out if self.bias is None else out + self.bias
        if not Sparse24Linear._warned:
            Sparse24Linear._warned = True
            warnings.warn(CPU_WARNING.format(device=x.device.type) if not x.is_cuda else
                          f"2:4 layers got {x.dtype} inputs for {self.values.dtype} weights: expanded per call, slow",
                          RuntimeWarning, stacklevel=2)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


@dataclass
class Sparse24Config(ChecksLayers, StepConfig):
    """Which linear layers to convert; each must already be 2:4 (prune with pattern '2:4' first)."""
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    verb = "convert to 2:4"


def sparse24_(model: nn.Module, config: Sparse24Config | None = None) -> dict:
    """Replace the selected 2:4 linear layers by `Sparse24Linear`; returns what changed and the bytes."""
    config = config or Sparse24Config()
    check_arguments("sparse24_", model, config, Sparse24Config)
    layers = select_layers(model, config.targets, config.skip, verb="convert to 2:4")
    dense = {n: m for n, m in layers.items() if violations_24(m.weight)}
    if dense:
        name = next(iter(dense))
        raise ConfigError(f"{len(dense)} of {len(layers)} selected layers are not 2:4 (e.g. {name}: "
                          f"{violations_24(dense[name].weight)} groups of 4 hold more than 2 nonzeros); prune them "
                          "with pattern '2:4' first or add them to 'skip'")
    odd = [f"{n} ({m.in_features})" for n, m in layers.items() if m.in_features % kernel.K_MULTIPLE]
    if odd:
        raise ConfigError(f"the 2:4 kernel needs input dimensions that are multiples of {kernel.K_MULTIPLE}: "
                          f"{', '.join(odd[:5])}; add these layers to 'skip'")
    _check_runtime(next(iter(layers.values())).weight)
    before = after = 0
    for name, linear in layers.items():
        module = Sparse24Linear.from_linear(linear)
        before += linear.weight.numel() * linear.weight.element_size()
        after += compressed_bytes(module.values, module.meta)
        replace_module(model, name, module)
    log.info("2:4 runtime: %d layers, weights %.1f MB -> %.1f MB", len(layers), before / 1e6, after / 1e6)
    return {"layers": len(layers), "weight_bytes_dense": before, "weight_bytes_2of4": after,
            "kernel": "leanlm triton 2:4" if _has_kernel(next(iter(layers.values())).weight) else "none (expand per call)"}


def _has_kernel(weight: torch.Tensor) -> bool:
    return kernel.triton is not None and (weight.is_cuda or kernel.INTERPRETED) and weight.dtype in KERNEL_DTYPES


def _check_runtime(weight: torch.Tensor) -> None:
    if weight.is_cuda and weight.dtype not in KERNEL_DTYPES:
        raise ConfigError(f"the 2:4 kernel multiplies float16 or bfloat16, the model is {weight.dtype}; "
                          "add a 'cast' step (dtype: bfloat16) before this one")
    if weight.is_cuda and kernel.triton is None:
        raise ConfigError("the 2:4 kernel needs triton, which is not installed (pip install triton)")
    if not _has_kernel(weight):
        warnings.warn(CPU_WARNING.format(device=weight.device.type), RuntimeWarning, stacklevel=3)


register_step("sparse24", Sparse24Config, sparse24_)
