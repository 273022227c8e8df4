"""The layer-by-layer driver of AWQ and SmoothQuant over the exact scale pairs of core.scale_pairs."""

from __future__ import annotations

import logging

import torch
from torch import nn

from leanlm.core.layerwise import process_layerwise
from leanlm.core.scale_pairs import block_pairs
from leanlm.core.selection import check_group_size, layers_by_block, select_layers
from leanlm.quantize.base import finish_totals, new_totals

log = logging.getLogger(__name__)


def quantize_with_scale_pairs(model: nn.Module, config, calibration: torch.Tensor, device, worker, desc: str) -> dict:
    """The layer-by-layer driver of AWQ and SmoothQuant: per block, `worker(block, layers, config, observe)`
    searches and folds a scale for each exact pair (`.scale(pair)`), then packs the layers (`.quantize`)."""
    chosen = select_layers(model, config.targets, config.skip)
    check_group_size(chosen, getattr(config, "group_size", None))
    per_block = layers_by_block(model, chosen, desc)
    totals, scaled = new_totals(), []

    def one_block(index: int, block: nn.Module, observe) -> dict:
        work = worker(block, per_block[index], config, observe)
        for pair in block_pairs(block, per_block[index], observe):
            scaled.append({"block": index, **work.scale(pair)})
        work.quantize(totals)
        return {}

    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size, desc=desc,
                      autocast=autocast)
    if not scaled:
        log.warning("%s found no exact scale pairs in this model: it ran without moving any scale", desc)
    totals["scale_pairs"] = len(scaled)
    totals["scales"] = scaled
    return finish_totals(totals)
