"""Wanda: prune by |weight| x the L2 norm of its input channel over calibration tokens, per output
row, one decoder block at a time (each block sees the already-pruned blocks' outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import InputRecorder
from leanlm.pipeline.steps import StepContext, register_step
from leanlm.prune.base import PruneConfig, apply_mask, prune_, prune_layerwise, register_pruner
from leanlm.prune.prune_ops import wanda_mask


@dataclass
class WandaConfig(PruneConfig):
    needs_calibration = True
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "bfloat16"


@register_pruner(WandaConfig)
def prune_wanda(model: nn.Module, config: WandaConfig, calibration: torch.Tensor, device=None) -> dict:
    def prune_block(block: nn.Module, layers: dict[str, nn.Module], observe, sparsity: float) -> None:
        with InputRecorder(layers) as rec:
            observe()
        for name, layer in layers.items():
            apply_mask(layer, wanda_mask(layer.weight.data, rec.l2_norm(name), sparsity, config.nm))

    return prune_layerwise(model, config, calibration, device, "Wanda", prune_block)


@register_step("wanda", WandaConfig)
def _wanda_step(model: nn.Module, config: WandaConfig, ctx: StepContext) -> dict:
    return prune_(model, config, calibration=ctx.calibration_data(), device=ctx.device)
