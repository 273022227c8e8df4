"""Activation sparsity, TEAL-style and training-free: each linear layer gets a magnitude threshold on
its inputs, calibrated so that a target fraction of them fall below it, and is swapped for
`ActSparseLinear`, which skips those inputs' weights at batch-1 decode.

Calibration runs block by block (core.layerwise), so each block's thresholds are set on the inputs
it sees once the earlier blocks are already sparse, as it will run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import InputRecorder, process_layerwise
from leanlm.core.structure import find_structure, replace_module
from leanlm.errors import ConfigError
from leanlm.pipeline.steps import StepConfig, StepContext, register_step
from leanlm.quantize.base import layers_by_block, select_layers
from leanlm.sparsify.act_sparse_linear import ActSparseLinear
from leanlm.sparsify.act_sparse_ops import scores, threshold_for


@dataclass
class ActSparsityConfig(StepConfig):
    """Zero the `sparsity` fraction of smallest-magnitude inputs of every chosen linear layer."""
    needs_calibration = True
    sparsity: float = 0.5
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    weighted: bool = False  # rank inputs by |x| * ||W[:, j]|| (WINA) rather than |x| alone (TEAL)
    rows: int = 2048
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.rows < 16:
            raise ConfigError(f"rows must be at least 16, got {self.rows}")


def sparsify_activations_(model: nn.Module, config: ActSparsityConfig, calibration: torch.Tensor,
                          device=None) -> dict:
    layers = select_layers(model, config.targets, config.skip, verb="sparsify")
    per_block = layers_by_block(model, layers, "activation sparsity")
    block_names = find_structure(model).block_names()
    thresholds: dict[str, float] = {}

    def one_block(index: int, block: nn.Module, observe) -> dict:
        chosen = per_block[index]
        with InputRecorder(chosen, rows=config.rows) as rec:
            observe()
        for name, layer in chosen.items():
            norms = layer.weight.data.float().norm(dim=0).cpu() if config.weighted else None
            threshold = threshold_for(scores(rec.rows_of(name).cpu(), norms), config.sparsity)
            thresholds[f"{block_names[index]}.{name}"] = threshold
            replace_module(block, name, ActSparseLinear.from_linear(layer, threshold, config.weighted))
        return {}

    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                      desc="activation sparsity", autocast=autocast)
    return {"layers_sparsified": len(thresholds), "target_sparsity": config.sparsity,
            "thresholds": {n: round(t, 6) for n, t in thresholds.items()}}


@register_step("act_sparsity", ActSparsityConfig)
def _act_sparsity_step(model: nn.Module, config: ActSparsityConfig, ctx: StepContext) -> dict:
    return sparsify_activations_(model, config, ctx.calibration_data(), ctx.device)
