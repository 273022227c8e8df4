"""Round-to-nearest weight-only quantization: one pass over the weights.

With `scale_search: activation` the codes are still round-to-nearest, but each output channel's
(and group's) scale is picked from a range of candidates by the output error it causes, using the
layer's input covariance on the calibration data, gathered block by block (core.layerwise).
That needs calibration data, so the step asks for it only then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.layerwise import HessianCollector, process_layerwise
from leanlm.core.search import Choice
from leanlm.core.selection import (
    ChecksLayers,
    check_group_size,
    layers_by_block,
    select_layers,
)
from leanlm.core.step import StepConfig, register_step
from leanlm.errors import ConfigError
from leanlm.quantize import rtn_ops
from leanlm.quantize.base import (
    QUANTIZERS,
    finish_totals,
    new_totals,
    swap_in_packed,
)


@dataclass
class RTNConfig(ChecksLayers, StepConfig):
    stage = "quantize"
    search = {"bits": Choice(8, 4), "group_size": Choice(None, 32, 64, 128), "symmetric": Choice(True, False),
              "scale_search": Choice("none", "activation"), "skip": Choice(["lm_head"], [])}
    bits: Literal[8, 4] = 8
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    # "none": max-abs (or min/max) scale; "activation": the candidate scale, from search_min to
    # search_max times that range in search_steps steps, with the least activation-weighted error
    scale_search: Literal["none", "activation"] = "none"
    search_min: float = 0.9
    search_max: float = 1.6
    search_steps: int = 400
    search_refine: int = 8  # best candidates per channel scored again with the full input covariance
    batch_size: int = 8  # calibration samples per forward (scale_search: activation)
    calibration_dtype: Literal["float32", "bfloat16"] = "bfloat16"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.scale_search == "activation"

    def validate(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer or null, got {self.group_size}")
        if not 0 < self.search_min <= self.search_max:
            raise ConfigError(f"need 0 < search_min <= search_max, got {self.search_min} and {self.search_max}")
        if self.search_steps < 1 or self.search_refine < 1 or self.batch_size < 1:
            raise ConfigError("search_steps, search_refine and batch_size must be positive integers")

    def ratios(self) -> torch.Tensor:
        # 1.0 (the plain max-abs or min/max range) is always a candidate
        return torch.cat([torch.linspace(self.search_min, self.search_max, self.search_steps + 1), torch.ones(1)]).unique()


def quantize_rtn(model: nn.Module, config: RTNConfig, calibration: torch.Tensor | None = None, device=None,
                 plan: dict[str, tuple[int, int | None, bool]] | None = None) -> dict:
    """RTN as `config` says; `plan` maps layer names to their own (bits, group_size, symmetric)."""
    layers = select_layers(model, config.targets, config.skip)
    plan = plan or {}
    for name, layer in layers.items():
        check_group_size({name: layer}, plan.get(name, (None, config.group_size))[1])
    if plan and config.scale_search != "none":
        raise ConfigError("a per-layer plan is for plain round-to-nearest; use scale_search: none with it")
    if config.scale_search == "activation":
        if calibration is None:
            raise ConfigError("rtn with scale_search: activation needs calibration data: "
                              "quantize_(model, config, calibration=token_ids)")
        return _rtn_searched(model, config, layers, calibration, device)
    totals = new_totals()
    for name, layer in tqdm(layers.items(), desc=f"RTN int{config.bits}", unit="layer", leave=False):
        bits, group, sym = plan.get(name, (config.bits, config.group_size, config.symmetric))
        with torch.no_grad():
            codes, scale, zero = rtn_ops.rtn(layer.weight.data, bits, group, sym)
        swap_in_packed(model, name, codes, scale, zero, bits, group, sym, totals)
    return finish_totals(totals)


def _rtn_searched(model: nn.Module, config: RTNConfig, layers: dict[str, nn.Module], calibration: torch.Tensor,
                  device) -> dict:
    per_block = layers_by_block(model, layers, "RTN with scale_search: activation")
    totals = {**new_totals(), "scale_ratio_mean": 0.0}
    ratios = config.ratios()

    def one_block(index: int, block: nn.Module, observe) -> dict:
        chosen = per_block[index]
        with HessianCollector(block, chosen) as collector:
            observe()
        for name, layer in chosen.items():
            weight = layer.weight.data
            clip = rtn_ops.search_clip(weight, collector.hessian(name), config.bits, config.group_size,
                                       config.symmetric, ratios, config.search_refine)
            codes, scale, zero = rtn_ops.rtn(weight, config.bits, config.group_size, config.symmetric, clip)
            totals["scale_ratio_mean"] += clip.mean().item() / len(layers)
            swap_in_packed(block, name, codes, scale, zero, config.bits, config.group_size, config.symmetric, totals)
        return {}

    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                      desc=f"RTN int{config.bits} scale search", autocast=autocast)
    return finish_totals(totals)


register_step("rtn", RTNConfig, quantize_rtn, family=QUANTIZERS)
