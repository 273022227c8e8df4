"""Magnitude pruning: remove the smallest weights of each layer; no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leanlm.core.search import Span
from leanlm.core.step import register_step
from leanlm.errors import ConfigError
from leanlm.prune.base import (
    PRUNERS,
    PruneConfig,
    apply_mask,
    chosen_layers,
    finish,
)
from leanlm.prune.prune_ops import magnitude_mask


@dataclass
class MagnitudeConfig(PruneConfig):
    stage = "weight_sparsity"
    search = {"sparsity": Span(0.1, 0.6, step=0.05)}
    def validate(self) -> None:
        super().validate()
        if self.owl_lambda:
            raise ConfigError("OWL needs activation statistics; use it with wanda or sparsegpt, not magnitude")


def prune_magnitude(model: nn.Module, config: MagnitudeConfig) -> dict:
    layers = chosen_layers(model, config)
    for layer in layers.values():
        apply_mask(layer, magnitude_mask(layer.weight.data, config.sparsity, config.nm))
    return finish(layers, config)


register_step("magnitude", MagnitudeConfig, prune_magnitude, family=PRUNERS)
