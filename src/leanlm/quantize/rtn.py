"""Round-to-nearest weight-only quantization: no calibration data, one pass over the weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.structure import replace_module
from leanlm.errors import ConfigError
from leanlm.pipeline.steps import StepConfig, StepContext, register_step
from leanlm.quantize import rtn_ops
from leanlm.quantize.base import (check_group_size, module_bytes, packed_module, quantize_, register_quantizer,
                                  select_layers)


@dataclass
class RTNConfig(StepConfig):
    bits: Literal[8, 4] = 8
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer or null, got {self.group_size}")


@register_quantizer(RTNConfig)
def quantize_rtn(model: nn.Module, config: RTNConfig) -> dict:
    layers = select_layers(model, config.targets, config.skip)
    check_group_size(layers, config.group_size)
    before = after = bf16 = 0
    for name, layer in tqdm(layers.items(), desc=f"RTN int{config.bits}", unit="layer", leave=False):
        with torch.no_grad():
            codes, scale, zero = rtn_ops.rtn(layer.weight.data, config.bits, config.group_size, config.symmetric)
        new = packed_module(layer, codes, scale, zero, config.bits, config.group_size, config.symmetric)
        before += module_bytes(layer)
        bf16 += layer.weight.numel() * 2
        after += module_bytes(new)
        replace_module(model, name, new)
    if after >= before:
        raise RuntimeError(f"quantized layers take {after} bytes, not fewer than the original {before}")
    return {"layers_quantized": len(layers), "quantized_bytes_before": before, "quantized_bytes_bf16": bf16,
            "quantized_bytes_after": after, "fraction_of_bf16": after / bf16}


@register_step("rtn", RTNConfig)
def _rtn_step(model: nn.Module, config: RTNConfig, ctx: StepContext) -> dict:
    return quantize_(model, config)
