"""GPTQ step: layer-by-layer over the decoder blocks with calibration data (see core.layerwise).

For each block, the Hessians of its targeted linear layers are accumulated in one pass over the
calibration inputs (layers fed the same tensor, like q/k/v, share one), every layer is quantized
with gptq_ops, and the block's outputs are recomputed with the quantized weights for the next block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import HessianCollector, process_layerwise
from leanlm.core.search import Choice
from leanlm.core.selection import (
    ChecksLayers,
    check_group_size,
    layers_by_block,
    select_layers,
)
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import find_structure
from leanlm.errors import ConfigError
from leanlm.quantize.base import (
    QUANTIZERS,
    finish_totals,
    new_totals,
    swap_in_packed,
)
from leanlm.quantize.gptq_ops import gptq


@dataclass
class GPTQConfig(ChecksLayers, StepConfig):
    stage = "quantize"
    search = {"bits": Choice(8, 4), "group_size": Choice(None, 32, 64, 128), "symmetric": Choice(True, False),
              "act_order": Choice(True, False), "skip": Choice(["lm_head"], [])}
    needs_calibration = True
    search_cost = 2
    bits: Literal[8, 4] = 4
    group_size: int | None = 64
    symmetric: bool = False
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    act_order: bool = True  # quantize columns with the largest activations first
    static_groups: bool = True  # group scales fixed before reordering (required with act_order + groups)
    block_size: int = 128
    batch_size: int = 8  # calibration samples per forward
    # dtype of the calibration forwards: bfloat16 is ~3x faster on CPUs with AMX/AVX512-BF16 and on GPUs
    calibration_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp must be in (0, 1), got {self.damp}")
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise ConfigError("act_order with a group size needs static_groups: true (groups fixed before reordering)")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer or null, got {self.group_size}")


def quantize_gptq(model: nn.Module, config: GPTQConfig, calibration: torch.Tensor, device=None,
                  plan: dict[str, tuple[int, int | None, bool]] | None = None) -> dict:
    """GPTQ as `config` says; `plan` maps layer names to their own (bits, group_size, symmetric)."""
    chosen = select_layers(model, config.targets, config.skip)
    plan = plan or {}
    for name, layer in chosen.items():
        check_group_size({name: layer}, plan.get(name, (None, config.group_size))[1])
    per_block = layers_by_block(model, chosen, "GPTQ")
    prefixes = {i: f"{n}." for i, n in enumerate(find_structure(model).block_names())}
    totals = {**new_totals(), "gptq_loss": 0.0}

    def one_block(index: int, block: nn.Module, observe) -> dict:
        layers = per_block[index]
        with HessianCollector(block, layers) as collector:
            observe()
        for name, layer in layers.items():
            bits, group, sym = plan.get(prefixes[index] + name, (config.bits, config.group_size, config.symmetric))
            codes, scale, zero, loss = gptq(layer.weight.data.cpu(), collector.hessian(name).cpu(), bits, group, sym,
                                            config.damp, config.act_order, config.static_groups, config.block_size)
            totals["gptq_loss"] += loss
            swap_in_packed(block, name, codes, scale, zero, bits, group, sym, totals)
        return {}

    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size, desc="GPTQ",
                      autocast=autocast)
    return finish_totals(totals)


register_step("gptq", GPTQConfig, quantize_gptq, family=QUANTIZERS)
