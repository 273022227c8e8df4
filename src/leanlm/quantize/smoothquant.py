"""SmoothQuant step: W8A8 with activation outliers migrated into the weights, block by block.

Per-token int8 activations lose precision to the few channels with huge activations. For each
exact scale pair of a block (scale_pairs.py), input channel j is divided by
s_j = max|X_j|^a / max|W_j|^(1-a) and the readers' weight columns multiplied by it, which flattens
the activations at no cost in exactness. `alpha: null` searches a per pair, scoring each candidate
by the W8A8 output of the pair's parent module on calibration samples. All targeted linears of the
block are then quantized to int8 per output channel and replaced by W8A8Linear (int8 x int8 matmul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import InputRecorder
from leanlm.core.scale_pairs import ScalePair, apply_scale, capture_calls, output_mse
from leanlm.core.search import Choice
from leanlm.core.selection import ChecksLayers
from leanlm.core.step import StepConfig, register_step
from leanlm.errors import ConfigError
from leanlm.quantize import awq_ops, rtn_ops
from leanlm.quantize.base import QUANTIZERS, swap_in
from leanlm.quantize.scale_search import quantize_with_scale_pairs
from leanlm.quantize.w8a8_linear import W8A8Linear, quantize_per_token


@dataclass
class SmoothQuantConfig(ChecksLayers, StepConfig):
    stage = "quantize"
    search = {"alpha": Choice(None, 0.5, 0.8), "skip": Choice(["lm_head"], [])}
    needs_calibration = True
    alpha: float | None = None  # migration strength in [0, 1]; null: searched per pair on the grid
    grid: int = 10
    search_samples: int = 16
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "float32"
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1] or null (searched), got {self.alpha}")
        if self.grid < 1 or self.search_samples < 1 or self.batch_size < 1:
            raise ConfigError("grid, search_samples and batch_size must be positive integers")


def _fake_w8a8(layers: list[nn.Module], weights: list[torch.Tensor], s: torch.Tensor) -> list:
    """Make `layers` compute W8A8 numerics of the pair smoothed by `s`; returns hook handles to remove."""
    handles = []
    for layer, w in zip(layers, weights):
        layer.weight.data = rtn_ops.fake_quantize(w.float() * s, 8, None, True).to(w.dtype)

        def pre(module, args):
            codes, scale = quantize_per_token(args[0].float() / s)
            return (codes.float().mul_(scale).to(args[0].dtype),)
        handles.append(layer.register_forward_pre_hook(pre))
    return handles


class _BlockSmooth:
    def __init__(self, block: nn.Module, layers: dict[str, nn.Module], config: SmoothQuantConfig, observe):
        self.block, self.layers, self.config, self.observe = block, layers, config, observe
        self.modules = dict(block.named_modules())
        self.autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None

    @torch.no_grad()
    def scale(self, pair: ScalePair) -> dict:
        parent = self.modules[pair.parent] if pair.parent else self.block
        nexts = [self.modules[n] for n in pair.nexts]
        limit = math.ceil(self.config.search_samples / self.config.batch_size)
        with capture_calls(parent, keep_output=True) as calls, InputRecorder({"x": nexts[0]}) as rec:
            self.observe(limit)
        weights = [m.weight.data.clone() for m in nexts]
        w_max = torch.cat([w.float() for w in weights]).abs().amax(0)
        x_max = rec.abs_max["x"]

        def loss(s: torch.Tensor) -> float:
            handles = _fake_w8a8(nexts, weights, s.to(weights[0].device))
            try:
                return output_mse(parent, calls, self.autocast)
            finally:
                for h in handles:
                    h.remove()

        if self.config.alpha is None:
            s, alpha, best = awq_ops.search_scale(x_max, w_max, loss, self.config.grid, duo=True)
        else:
            alpha = self.config.alpha
            s = awq_ops.candidate_scale(x_max, w_max, alpha, duo=True)
            best = loss(s)
        for m, w in zip(nexts, weights):
            m.weight.data = w
        apply_scale(self.modules[pair.prev], nexts, s)
        return {"prev": pair.prev, "nexts": pair.nexts, "alpha": alpha, "loss": best}

    def quantize(self, totals: dict) -> None:
        for name, layer in self.layers.items():
            codes, scale, _ = rtn_ops.rtn(layer.weight.data, 8, None, True)
            swap_in(self.block, name, W8A8Linear.from_codes(layer, codes, scale), totals)


def quantize_smoothquant(model: nn.Module, config: SmoothQuantConfig, calibration: torch.Tensor, device=None) -> dict:
    return quantize_with_scale_pairs(model, config, calibration, device, _BlockSmooth, "SmoothQuant")


register_step("smoothquant", SmoothQuantConfig, quantize_smoothquant, family=QUANTIZERS)
