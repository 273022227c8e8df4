"""Width pruning: remove FFN intermediate channels, ranked by how much each contributes to the block
output on calibration data (activation norm x down-projection column norm, Minitron-style), and refit
the down projection by least squares so the kept channels stand in for the removed ones.

The FFN is found from the module graph: the linears of a block that expand the hidden size to the
config's `intermediate_size` (or, without one, the only such width in the graph), and the one that
reads it back. Every block keeps the same number of channels, so the result is a standard HF model
whose config says the smaller width under the key that sets it (found by rebuilding a one-block
model from the config: OPT's `ffn_dim`, GPT-2's `n_inner`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from leanlm.core.anatomy import FFN, channel_importance, ffn_dims, ffn_width, find_ffn
from leanlm.core.layerwise import HessianCollector, process_layerwise
from leanlm.core.search import Span
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import (
    check_config_describes,
    find_structure,
    replace_module,
)
from leanlm.errors import ConfigError, LeanLMError, UnsupportedModelError
from leanlm.prune.base import PRUNERS
from leanlm.prune.structured_ops import kept_channels, refit_down


@dataclass
class WidthConfig(StepConfig):
    """Keep `ffn_keep` of each block's FFN channels (rounded to a multiple of `multiple_of`)."""
    stage = "structure"
    search = {"ffn_keep": Span(0.5, 0.95, step=0.05)}
    needs_calibration = True
    ffn_keep: float = 0.75
    multiple_of: int = 64
    refit: bool = True
    damp: float = 0.01
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        if not 0 < self.ffn_keep < 1:
            raise ConfigError(f"ffn_keep must be in (0, 1), got {self.ffn_keep}")
        if self.multiple_of < 1:
            raise ConfigError(f"multiple_of must be at least 1, got {self.multiple_of}")

    def check(self, model: nn.Module | None) -> None:
        if model is not None:
            intermediate = ffn_dims(model)[1]
            keep_count(intermediate, self)
            ffn_width_key(model, intermediate)


def keep_count(intermediate: int, config: WidthConfig) -> int:
    keep = max(config.multiple_of, round(intermediate * config.ffn_keep / config.multiple_of) * config.multiple_of)
    if keep >= intermediate:
        raise ConfigError(f"keeping {config.ffn_keep} of {intermediate} channels in multiples of {config.multiple_of} "
                          "removes nothing; lower ffn_keep or multiple_of")
    if abs(keep / intermediate - config.ffn_keep) > 0.05:
        warnings.warn(f"keeping {keep} of {intermediate} FFN channels ({keep / intermediate:.0%}), not the "
                      f"{config.ffn_keep:.0%} asked, because channels are kept in multiples of {config.multiple_of}; "
                      "lower multiple_of to come closer", stacklevel=2)
    return keep


def sliced(linear: nn.Linear, kept: torch.Tensor, dim: int, weight: torch.Tensor | None = None) -> nn.Linear:
    """A copy of `linear` with only the `kept` outputs (dim 0) or inputs (dim 1)."""
    w = (linear.weight.data if weight is None else weight).index_select(dim, kept.to(linear.weight.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[kept] if dim == 0 else linear.bias.data)
    return new


@torch.no_grad()
def zeroed_output(layer: nn.Linear, kept: torch.Tensor, weight: torch.Tensor, observe) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output on one calibration batch with `layer` reading only its `kept` inputs (through
    `weight`, the others zeroed): what slicing must reproduce. Returns it and that zero-padded weight."""
    masked = torch.zeros_like(layer.weight)
    masked[:, kept] = weight
    original = layer.weight.data
    layer.weight.data = masked
    try:
        return observe(limit=1)[0], masked
    finally:
        layer.weight.data = original


def slice_error(expected: torch.Tensor, observe) -> tuple[float, bool]:
    """Max difference of the sliced block's output from `expected`, and whether it is too large."""
    diff = (observe(limit=1)[0] - expected).abs().max().item()
    return diff, diff > 1e-3 * max(expected.abs().max().item(), 1.0)


@torch.no_grad()
def shrink_ffn(block: nn.Module, ffn: FFN, kept: torch.Tensor, down_weight: torch.Tensor, observe) -> float:
    """Slice the FFN to the kept channels and check, on one calibration batch, that the block computes
    what the full-width block with the removed channels zeroed computes; returns that max difference."""
    name, down = ffn.reducer
    expected, masked = zeroed_output(down, kept, down_weight, observe)
    for n, m in ffn.expanders.items():
        replace_module(block, n, sliced(m, ffn.expander_rows(n, kept), 0))
    replace_module(block, name, sliced(down, kept, 1, masked))
    diff, bad = slice_error(expected, observe)
    if bad:
        raise LeanLMError(f"slicing the FFN of {type(block).__name__} changed its output by {diff:.3g}; its channels "
                          "are not elementwise between the expanding and reducing linears")
    return diff


def prune_width(model: nn.Module, config: WidthConfig, calibration: torch.Tensor, device=None) -> dict:
    hidden, intermediate = ffn_dims(model)
    keep = keep_count(intermediate, config)
    width_key = ffn_width_key(model, intermediate)
    params_before = sum(p.numel() for p in model.parameters())

    def one_block(index: int, block: nn.Module, observe) -> dict:
        ffn = find_ffn(block, hidden, intermediate)
        name, down = ffn.reducer
        with HessianCollector(block, {name: down}) as collector:
            observe()
        H = collector.hessian(name).to(down.weight.device)
        kept = kept_channels(channel_importance(torch.diag(H), down.weight.data), keep)
        weight = refit_down(down.weight.data, H, kept, config.damp) if config.refit else down.weight.data[:, kept]
        return {"max_slice_diff": shrink_ffn(block, ffn, kept, weight, observe)}

    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    checks = process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                               desc="width pruning", autocast=autocast)
    setattr(model.config, width_key, keep)
    check_config_describes(model, "width pruning")
    return {"intermediate_before": intermediate, "intermediate_after": keep, "refit": config.refit,
            "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
            "max_slice_diff": max(c["max_slice_diff"] for c in checks)}


def ffn_width_key(model: nn.Module, width: int) -> str:
    """The config key that sets the FFN width: `intermediate_size`, or the one key (unset, or equal to the width)
    that, changed, changes the FFN of a one-block model rebuilt from the config (OPT's ffn_dim, GPT-2's n_inner)."""
    from leanlm.core.conv1d import linearize

    config = model.config
    if isinstance(getattr(config, "intermediate_size", None), int):
        return "intermediate_size"
    probe = next(p for p in (width // 2, width // 2 + 16) if p not in (config.hidden_size, width, 0))
    tried = []
    for key, value in config.to_dict().items():
        if not (value is None or (type(value) is int and value == width)):
            continue
        tried.append(key)
        trial = copy.deepcopy(config)
        trial.num_hidden_layers = 1
        setattr(trial, key, probe)
        try:
            with torch.device("meta"):
                rebuilt = type(model)(trial)
            linearize(rebuilt)
            if ffn_width(find_structure(rebuilt).blocks[0], config.hidden_size, "width pruning") == probe:
                return key
        except Exception:  # a key that is not the FFN's can break the model's construction; try the next
            continue
    raise UnsupportedModelError(f"no config key sets {type(model).__name__}'s FFN width (tried {tried}), so a "
                                "width-pruned model could not be saved in a form that loads")


register_step("width", WidthConfig, prune_width, family=PRUNERS)
