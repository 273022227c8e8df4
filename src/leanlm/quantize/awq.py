"""AWQ step: activation-aware scales, then clip search, then round-to-nearest, block by block.

For each decoder block (see core.layerwise), the exact scale pairs are found from the module
graph (scale_pairs.py). For each pair in forward order, a grid of per-input-channel scales
s = x^a / w^(1-a) is tried: the readers' weights are multiplied by s and fake-quantized, and the
output of their smallest common parent module (the attention, the MLP, or the down projection)
is compared with the unquantized one on calibration samples. The best scale is folded into the
pair exactly. Each layer's clip ratios are then searched on sampled input rows and the weights
are rounded to the nearest grid point and packed. A layer without a pair is still clipped and
quantized; the step's statistics list how many pairs it used.
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
from leanlm.quantize.base import QUANTIZERS, swap_in_packed
from leanlm.quantize.scale_search import quantize_with_scale_pairs


@dataclass
class AWQConfig(ChecksLayers, StepConfig):
    stage = "quantize"
    search = {"bits": Choice(4), "group_size": Choice(32, 64, 128), "symmetric": Choice(True, False), "skip": Choice(["lm_head"], [])}
    needs_calibration = True
    search_cost = 3
    bits: Literal[8, 4] = 4
    group_size: int | None = 64
    symmetric: bool = False
    grid: int = 20  # scale exponents a = 0, 1/grid, ..., tried per pair
    duo_scaling: bool = True  # s = x^a / w^(1-a) rather than x^a
    clip: bool = True  # search a clip ratio per group after scaling
    clip_rows: int = 512  # sampled input rows per layer for the clip search
    search_samples: int = 32  # calibration samples used by the scale search (all go through the blocks)
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if self.grid < 1 or self.clip_rows < 1 or self.search_samples < 1 or self.batch_size < 1:
            raise ConfigError("grid, clip_rows, search_samples and batch_size must be positive integers")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer or null, got {self.group_size}")


class _BlockAWQ:
    """AWQ on one decoder block; `observe(limit)` runs the block on calibration batches."""

    def __init__(self, block: nn.Module, layers: dict[str, nn.Module], config: AWQConfig, observe):
        self.block, self.layers, self.config, self.observe = block, layers, config, observe
        self.modules = dict(block.named_modules())
        self.limit = math.ceil(config.search_samples / config.batch_size)
        self.autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None

    @torch.no_grad()
    def scale(self, pair: ScalePair) -> dict:
        parent = self.modules[pair.parent] if pair.parent else self.block
        nexts = [self.modules[n] for n in pair.nexts]
        with capture_calls(parent, keep_output=True) as calls, InputRecorder({"x": nexts[0]}) as rec:
            self.observe(self.limit)
        originals = [m.weight.data.clone() for m in nexts]
        w_mean = awq_ops.weight_channel_mean(originals, self.config.group_size)

        def loss(s: torch.Tensor) -> float:
            s = s.to(originals[0].device)
            for m, w in zip(nexts, originals):
                q = rtn_ops.fake_quantize(w.float() * s, self.config.bits, self.config.group_size, self.config.symmetric)
                m.weight.data = (q / s).to(w.dtype)
            return output_mse(parent, calls, self.autocast)

        s, alpha, best = awq_ops.search_scale(rec.mean_abs("x"), w_mean, loss, self.config.grid, self.config.duo_scaling)
        for m, w in zip(nexts, originals):
            m.weight.data = w
        apply_scale(self.modules[pair.prev], nexts, s)
        return {"prev": pair.prev, "nexts": pair.nexts, "alpha": alpha, "loss": best}

    @torch.no_grad()
    def quantize(self, totals: dict) -> None:
        cfg = self.config
        with InputRecorder(self.layers, rows=cfg.clip_rows) as rec:
            self.observe(self.limit)
        for name, layer in self.layers.items():
            w = layer.weight.data
            clip = awq_ops.search_clip(w, rec.rows_of(name).to(w.device), cfg.bits, cfg.group_size, cfg.symmetric) \
                if cfg.clip else None
            codes, scale, zero = rtn_ops.rtn(w, cfg.bits, cfg.group_size, cfg.symmetric, clip)
            swap_in_packed(self.block, name, codes, scale, zero, cfg.bits, cfg.group_size, cfg.symmetric, totals)


def quantize_awq(model: nn.Module, config: AWQConfig, calibration: torch.Tensor, device=None) -> dict:
    return quantize_with_scale_pairs(model, config, calibration, device, _BlockAWQ, "AWQ")


register_step("awq", AWQConfig, quantize_awq, family=QUANTIZERS)
