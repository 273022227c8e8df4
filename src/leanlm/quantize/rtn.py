"""Round-to-nearest weight-only quantization: no calibration data, one pass over the weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.errors import ConfigError
from leanlm.pipeline.steps import StepConfig, StepContext, register_step
from leanlm.quantize import rtn_ops
from leanlm.quantize.base import (check_group_size, finish_totals, new_totals, quantize_, register_quantizer,
                                  select_layers, swap_in_packed)


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
    totals = new_totals()
    for name, layer in tqdm(layers.items(), desc=f"RTN int{config.bits}", unit="layer", leave=False):
        with torch.no_grad():
            codes, scale, zero = rtn_ops.rtn(layer.weight.data, config.bits, config.group_size, config.symmetric)
        swap_in_packed(model, name, codes, scale, zero, config.bits, config.group_size, config.symmetric, totals)
    return finish_totals(totals)


@register_step("rtn", RTNConfig)
def _rtn_step(model: nn.Module, config: RTNConfig, ctx: StepContext) -> dict:
    return quantize_(model, config)
