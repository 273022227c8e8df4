"""Activation sparsity, TEAL-style and training-free: each linear layer gets a magnitude threshold on
its inputs, calibrated so that a target fraction of them fall below it, and is swapped for
`ActSparseLinear`, which skips those inputs' weights at batch-1 decode.

Calibration runs block by block (core.layerwise), so each block's thresholds are set on the inputs
it sees once the earlier blocks are already sparse, as it will run. With `allocation: greedy` the
target is the block's weight-weighted average and each layer's level is searched (act_allocation);
with `uniform` every layer gets the target. With `rotation` set, the inputs the layers read from a norm
are first moved to the basis where skipping costs least (`rotation`, `rotation_ops`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import InputRecorder, check_calibration, process_layerwise
from leanlm.core.search import Choice, Span
from leanlm.core.selection import ChecksLayers, layers_by_block, select_layers
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import check_arguments, find_structure, replace_module
from leanlm.errors import ConfigError, UnsupportedModelError
from leanlm.sparsify.act_allocation import DENSE, Allocator, find_groups
from leanlm.sparsify.act_sparse_linear import ActSparseLinear
from leanlm.sparsify.rotation import rotate_block

log = logging.getLogger(__name__)


@dataclass
class ActSparsityConfig(ChecksLayers, StepConfig):
    """Zero the `sparsity` fraction of smallest-magnitude inputs of every chosen linear layer."""
    stage = "act_sparsity"
    search = {"sparsity": Span(0.1, 0.6, step=0.05), "rotation": Choice("none", "int8"), "weighted": Choice(False, True)}
    runtimes = ("leanlm",)  # a GGUF export keeps the weights, not the thresholds
    needs_calibration = True
    sparsity: float = 0.5
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    weighted: bool = False  # rank inputs by |x| * ||W[:, j]|| (WINA) rather than |x| alone (TEAL)
    allocation: Literal["uniform", "greedy"] = "uniform"  # greedy: lower KLD, slightly higher perplexity here
    step: float = 0.05  # greedy: how far one move raises a group's level
    max_layer_sparsity: float = 0.9  # greedy: no layer goes above this
    search_samples: int = 4  # greedy: calibration sequences the output error is measured on
    # rotate the norm-fed inputs (q/k/v, gate/up) to their output-weighted principal axes first; the
    # rotation is one extra [d, d] product per group and token, stored in this precision
    rotation: Literal["none", "int8", "float32"] = "none"
    rows: int = 2048
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "float32"
    verb = "sparsify"

    def validate(self) -> None:
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.rows < 16:
            raise ConfigError(f"rows must be at least 16, got {self.rows}")
        if not 0 < self.step <= 0.5:
            raise ConfigError(f"step must be in (0, 0.5], got {self.step}")
        if not self.sparsity <= self.max_layer_sparsity < 1:
            raise ConfigError(f"max_layer_sparsity must be in [sparsity, 1), got {self.max_layer_sparsity}")
        if self.search_samples < 1:
            raise ConfigError(f"search_samples must be at least 1, got {self.search_samples}")


def sparsify_activations_(model: nn.Module, config: ActSparsityConfig, calibration: torch.Tensor,
                          device=None) -> dict:
    check_arguments("sparsify_activations_", model, config, ActSparsityConfig)
    check_calibration(model, config, calibration)
    layers = select_layers(model, config.targets, config.skip, verb="sparsify")
    per_block = layers_by_block(model, layers, "activation sparsity")
    block_names = find_structure(model).block_names()
    thresholds: dict[str, float] = {}
    levels: dict[str, float] = {}

    rotated: list[dict] = []
    counts = _head_counts(model) if config.rotation != "none" else None

    def one_block(index: int, block: nn.Module, observe) -> dict:
        chosen = per_block[index]
        if config.rotation != "none":
            rotated.extend({"block": index, **r} for r in rotate_block(block, chosen, observe, config.rotation, counts))
        with InputRecorder(chosen, rows=config.rows) as rec:
            observe()
        rows = {n: rec.rows_of(n).cpu() for n in chosen}
        norms = {n: m.weight.data.float().norm(dim=0).cpu() if config.weighted else None for n, m in chosen.items()}
        groups = find_groups(block, chosen, observe) if config.allocation == "greedy" else None
        for name, layer in chosen.items():
            replace_module(block, name, ActSparseLinear.from_linear(layer, DENSE, config.weighted))
        allocator = Allocator(block, groups or [], rows, norms, config.step, config.max_layer_sparsity)
        if groups:
            allocator.run(config.sparsity, observe, -(-config.search_samples // config.batch_size))
            chosen_levels = {n: g.level for g in groups for n in g.names}
        else:
            chosen_levels = {n: config.sparsity for n in chosen}
        modules = dict(block.named_modules())
        for name, level in chosen_levels.items():
            modules[name].threshold.fill_(allocator.threshold(name, level))
            levels[f"{block_names[index]}.{name}"] = level
            thresholds[f"{block_names[index]}.{name}"] = modules[name].threshold.item()
        return {}

    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                      desc="activation sparsity", autocast=autocast)
    return {"layers_sparsified": len(thresholds), "target_sparsity": config.sparsity,
            "allocation": config.allocation, "calibrated_weighted_sparsity": _weighted(levels, layers),
            "rotated_inputs": len(rotated),
            "rotated_by_kind": {"norm output (extra product)": sum(1 for r in rotated if r["extra_product"]),
                                "attention output (folded)": sum(1 for r in rotated if not r["extra_product"])},
            "weight_reads_vs_dense": _reads(levels, layers, rotated, 1 if config.rotation == "int8" else 4),
            "mean_level_by_layer": _mean_by_suffix(levels, block_names),
            "levels": {n: round(v, 4) for n, v in levels.items()},
            "thresholds": {n: round(t, 6) for n, t in thresholds.items()}}


def _weighted(levels: dict[str, float], layers: dict[str, nn.Module]) -> float:
    """Target level averaged by weight count: the share of block weights a token does not read."""
    sizes = {n: m.in_features * m.out_features for n, m in layers.items()}
    total = sum(sizes.get(n, 0) for n in levels)
    return round(sum(level * sizes.get(n, 0) for n, level in levels.items()) / max(total, 1), 4)


def _head_counts(model: nn.Module):
    """The attention's head layout, for folding a basis into the value/output projections (None: no fold)."""
    from leanlm.core.anatomy import head_counts

    try:
        return head_counts(model)
    except (UnsupportedModelError, AttributeError) as err:
        log.warning("rotation: %s; the attention output stays in its own basis", err)
        return None


def _reads(levels: dict[str, float], layers: dict[str, nn.Module], rotated: list[dict], rotation_bytes: int) -> float:
    """Weight bytes a batch-1 token reads in the sparsified layers (and their rotations), as a fraction of
    the dense layers' bytes: the cost measure that makes rotated and plain sparsity comparable."""
    sizes = {n: m.in_features * m.out_features * m.weight.element_size() for n, m in layers.items()}
    dense = sum(sizes.get(n, 0) for n in levels)
    read = sum((1 - level) * sizes.get(n, 0) for n, level in levels.items())
    read += sum(r["extra_product"] ** 2 * rotation_bytes for r in rotated)
    return round(read / max(dense, 1), 4)


def _mean_by_suffix(levels: dict[str, float], block_names: list[str]) -> dict[str, float]:
    """Mean level of each layer role across blocks (e.g. 'mlp.down_proj'): where the sparsity went."""
    by_role: dict[str, list[float]] = {}
    for name, level in levels.items():
        block = max((b for b in block_names if name.startswith(b + ".")), key=len)
        by_role.setdefault(name[len(block) + 1:], []).append(level)
    return {role: round(sum(v) / len(v), 4) for role, v in by_role.items()}


register_step("act_sparsity", ActSparsityConfig, sparsify_activations_)
