"""Wanda: prune by |weight| x the L2 norm of its input channel over calibration tokens, per output
row, one decoder block at a time (each block sees the already-pruned blocks' outputs). Plain Wanda
leaves the kept weights as they are; `refit` solves them for the mask by least squares
(prune_ops.masked_refit), which needs each layer's full input Hessian instead of its channel norms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import HessianCollector, InputRecorder
from leanlm.core.search import Choice, Span
from leanlm.core.step import register_step
from leanlm.prune.base import (
    PRUNERS,
    PruneConfig,
    apply_mask,
    prune_layerwise,
)
from leanlm.prune.prune_ops import masked_refit, wanda_mask


@dataclass
class WandaConfig(PruneConfig):
    stage = "weight_sparsity"
    search = {"sparsity": Span(0.1, 0.6, step=0.05), "refit": Choice(False, True)}
    needs_calibration = True
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    refit: bool = False
    damp: float = 0.01  # used by refit


def prune_wanda(model: nn.Module, config: WandaConfig, calibration: torch.Tensor, device=None) -> dict:
    def prune_block(block: nn.Module, layers: dict[str, nn.Module], observe, sparsity: float) -> None:
        if config.refit:
            return refit_block(block, layers, observe, sparsity)
        with InputRecorder(layers) as rec:
            observe()
        for name, layer in layers.items():
            apply_mask(layer, wanda_mask(layer.weight.data, rec.l2_norm(name), sparsity, config.nm))

    def refit_block(block: nn.Module, layers: dict[str, nn.Module], observe, sparsity: float) -> None:
        with HessianCollector(block, layers) as collector:
            observe()
        for name, layer in layers.items():
            H = collector.hessian(name).to(layer.weight.device)
            mask = wanda_mask(layer.weight.data, torch.diag(H).clamp(min=0).sqrt(), sparsity, config.nm)
            apply_mask(layer, mask, masked_refit(layer.weight.data, H, mask, config.damp))

    return prune_layerwise(model, config, calibration, device, "Wanda", prune_block)


register_step("wanda", WandaConfig, prune_wanda, family=PRUNERS)
