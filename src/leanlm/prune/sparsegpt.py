"""SparseGPT: prune each layer with an OBS-style update of the remaining weights (prune_ops.sparsegpt)
from the Hessian of its inputs, one decoder block at a time, as GPTQ does for quantization. With
`refit`, the kept weights are then solved exactly for the chosen mask (prune_ops.masked_refit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import HessianCollector
from leanlm.core.search import Span
from leanlm.core.step import register_step
from leanlm.errors import ConfigError
from leanlm.prune.base import (
    PRUNERS,
    PruneConfig,
    apply_mask,
    prune_layerwise,
)
from leanlm.prune.prune_ops import masked_refit, sparsegpt


@dataclass
class SparseGPTConfig(PruneConfig):
    stage = "weight_sparsity"
    search = {"sparsity": Span(0.1, 0.6, step=0.05)}
    needs_calibration = True
    search_cost = 2
    damp: float = 0.01
    refit: bool = False  # after choosing the mask, solve each row's kept weights exactly (prune_ops.masked_refit)
    block_size: int = 128
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "bfloat16"

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp must be in (0, 1), got {self.damp}")


def prune_sparsegpt(model: nn.Module, config: SparseGPTConfig, calibration: torch.Tensor, device=None) -> dict:
    def prune_block(block: nn.Module, layers: dict[str, nn.Module], observe, sparsity: float) -> None:
        with HessianCollector(block, layers) as collector:
            observe()
        for name, layer in layers.items():
            H = collector.hessian(name).to(layer.weight.device)
            weight, mask = sparsegpt(layer.weight.data, H, sparsity, config.nm, config.damp, config.block_size)
            if config.refit:
                weight = masked_refit(layer.weight.data, H, mask, config.damp, start=weight)
            apply_mask(layer, mask, weight)

    return prune_layerwise(model, config, calibration, device, "SparseGPT", prune_block)


register_step("sparsegpt", SparseGPTConfig, prune_sparsegpt, family=PRUNERS)
