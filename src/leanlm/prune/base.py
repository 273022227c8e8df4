"""`prune_(model, config)`: the one verb of the pruning family, dispatched on config type.

Every pruner applies masks through `apply_mask`, and `finish` measures the sparsity each layer
actually reached: a layer left denser than asked is an error, never a silent result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from leanlm.core.layerwise import InputRecorder, process_layerwise
from leanlm.core.registry import Family
from leanlm.core.selection import ChecksLayers, layers_by_block, select_layers
from leanlm.core.step import StepConfig
from leanlm.core.structure import find_structure
from leanlm.errors import ConfigError, LeanLMError
from leanlm.prune.prune_ops import outlier_ratio, owl_sparsities, parse_pattern

PRUNERS = Family("prune_", "pruner")  # each method registers its step type with family=PRUNERS


def prune_(model: nn.Module, config, **kwargs) -> dict:
    """Prune `model` in place as `config` says; returns the achieved sparsity per layer and overall."""
    return PRUNERS.dispatch(model, config, **kwargs)


@dataclass
class PruneConfig(ChecksLayers, StepConfig):
    """Shared options: a target sparsity (default 0.5), or an N:M pattern ('2:4' keeps 2 of every 4
    weights), which fixes the sparsity at 1 - N/M."""
    sparsity: float | None = None
    pattern: str | None = None
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    owl_lambda: float = 0.0  # > 0: non-uniform sparsity per block by outlier ratio (OWL), spread 2 x lambda
    owl_m: float = 5.0
    reshapes_model: ClassVar[bool] = False  # zeros weights in place
    verb: ClassVar[str] = "prune"

    def validate(self) -> None:
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0 <= self.owl_lambda < 0.5 or self.owl_m <= 0:
            raise ConfigError(f"owl_lambda must be in [0, 0.5) and owl_m > 0, got {self.owl_lambda}, {self.owl_m}")
        if self.owl_lambda and self.pattern:
            raise ConfigError("OWL sets a sparsity per block, which an N:M pattern fixes; use one or the other")
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        implied = 1 - nm[0] / nm[1] if nm else 0.5
        if nm and self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
            raise ConfigError(f"pattern {self.pattern} fixes the sparsity at {implied:g}, but sparsity is "
                              f"{self.sparsity:g}; give one or the other (sparsity: null leaves it to the pattern)")
        self.sparsity = implied if nm or self.sparsity is None else self.sparsity

    def check(self, model: nn.Module | None) -> None:
        if model is not None:
            chosen_layers(model, self)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


def chosen_layers(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    layers = select_layers(model, config.targets, config.skip, verb="prune")
    if config.nm:
        bad = {n: m.in_features for n, m in layers.items() if m.in_features % config.nm[1]}
        if bad:
            name, dim = next(iter(bad.items()))
            raise ConfigError(f"pattern {config.pattern} needs input dimensions divisible by {config.nm[1]}; "
                              f"layer {name} has {dim} (add it to 'skip')")
    return layers


@torch.no_grad()
def apply_mask(layer: nn.Module, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    new = layer.weight.data if weight is None else weight.to(layer.weight.dtype)
    layer.weight.data = new.masked_fill(mask.to(new.device), 0)


def finish(layers: dict[str, nn.Module], config: PruneConfig, tolerance: float = 0.005,
           targets: dict[str, float] | None = None) -> dict:
    """Measure each layer's zeros; refuse a layer that is denser than its target."""
    per_layer = {n: (m.weight == 0).float().mean().item() for n, m in layers.items()}
    wanted = targets or {n: config.sparsity for n in layers}
    # a row keeps whole weights, so a layer may fall short of its target by one weight per row
    short = {n: s for n, s in per_layer.items() if s < wanted[n] - max(tolerance, 1 / layers[n].weight.shape[1])}
    if short:
        name, got = next(iter(short.items()))
        raise LeanLMError(f"{len(short)} layers did not reach their sparsity; e.g. {name} has {got:.3f}, "
                          f"target {wanted[name]:.3f}")
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(per_layer[n] * m.weight.numel() for n, m in layers.items())
    return {"layers_pruned": len(layers), "target_sparsity": config.sparsity, "achieved_sparsity": zeros / total,
            "min_layer_sparsity": min(per_layer.values()), "pattern": config.pattern}


def prune_layerwise(model: nn.Module, config, calibration: torch.Tensor, device, desc: str, prune_block) -> dict:
    """Run `prune_block(block, layers, observe, sparsity)` on each decoder block over the calibration data;
    the sparsity is the config's, or per block by outlier ratio when `owl_lambda` > 0."""
    layers = chosen_layers(model, config)
    per_block = layers_by_block(model, layers, desc)
    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    sparsities = [config.sparsity] * len(per_block)
    if config.owl_lambda:
        ratios = block_outlier_ratios(model, per_block, calibration, config, device, autocast)
        sparsities = owl_sparsities(ratios, config.sparsity, config.owl_lambda)

    def one_block(index: int, block: nn.Module, observe) -> dict:
        prune_block(block, per_block[index], observe, sparsities[index])
        return {}

    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size, desc=desc,
                      autocast=autocast)
    prefixes = find_structure(model).block_names()
    targets = {f"{prefixes[i]}.{n}": sparsities[i] for i, block in enumerate(per_block) for n in block}
    stats = finish(layers, config, targets=targets)
    if config.owl_lambda:
        stats["block_sparsity"] = [round(s, 4) for s in sparsities]
    return stats


def block_outlier_ratios(model: nn.Module, per_block: list[dict[str, nn.Module]], calibration: torch.Tensor,
                         config, device, autocast) -> list[float]:
    """OWL's layerwise outlier distribution: the share of outlier Wanda scores in each (dense) block."""
    ratios = []

    def one_block(index: int, block: nn.Module, observe) -> dict:
        with InputRecorder(per_block[index]) as rec:
            observe()
        counts = [outlier_ratio(m.weight.data, rec.l2_norm(n), config.owl_m) for n, m in per_block[index].items()]
        ratios.append(sum(c for c, _ in counts) / max(1, sum(t for _, t in counts)))
        return {}

    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                      desc="OWL outlier ratios", autocast=autocast)
    return ratios
