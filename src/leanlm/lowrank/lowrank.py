"""`lowrank` step: each targeted linear becomes two smaller ones (lowrank_ops), layer by layer over
calibration data like GPTQ (core.layerwise).

Two passes. The first measures, for every targeted layer, the singular values of its whitened weight on
the original model's activations; their squares are the output errors that each rank would cost, and
`allocate_ranks` spends the parameter budget where the errors are smallest ("sensitivity"), or every layer
keeps the same share ("uniform", SVD-LLM's setting). The second factorizes block by block, each block's
whitening taken from the inputs the already-factorized blocks before it produce, so that later layers
correct for earlier truncation, as GPTQ does for rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import HessianCollector, InputRecorder, process_layerwise
from leanlm.core.search import Choice, Span
from leanlm.core.selection import ChecksLayers, layers_by_block, select_layers
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import find_structure, matches, replace_module
from leanlm.errors import ConfigError
from leanlm.lowrank.fisher import output_fisher
from leanlm.lowrank.lowrank_linear import LowRankLinear
from leanlm.lowrank.lowrank_ops import (
    allocate_ranks,
    factorize,
    loss_costs,
    spectrum,
    uniform_ranks,
    whitener,
)


@dataclass
class LowRankConfig(ChecksLayers, StepConfig):
    stage = "lowrank"
    search = {"params_removed": Span(0.1, 0.4, step=0.05), "method": Choice("svd_llm")}
    needs_calibration = True
    search_cost = 2
    runtimes = ("leanlm",)  # llama.cpp has no factorized linear (LowRankLinear.gguf_refusal)
    verb = "factorize"
    params_removed: float = 0.2  # share of the targeted linears' parameters removed
    method: Literal["svd_llm", "asvd", "svd"] = "svd_llm"
    # sensitivity: ranks where the estimated loss (output error weighted by the loss's gradient) is least;
    # spectrum: where each layer's relative output error is least; uniform: every layer the same share
    allocation: Literal["sensitivity", "spectrum", "uniform"] = "sensitivity"
    ranks: dict[str, int] = field(default_factory=dict)  # glob -> rank, fixed by hand (outside the budget)
    rank_multiple: int = 8
    damp: float = 0.01  # added to the covariance's diagonal, relative to its mean (svd_llm)
    alpha: float = 0.5  # exponent on mean |x| (asvd)
    batch_size: int = 8
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if not 0 < self.params_removed < 1:
            raise ConfigError(f"params_removed is the share of the targeted parameters removed, in (0, 1); "
                              f"got {self.params_removed}")
        if self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be at least 1, got {self.rank_multiple}")
        bad = {k: v for k, v in self.ranks.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"ranks must be positive integers (rank 0 would delete the layer's output); got {bad}")

    def check_later(self, later: list[tuple[int, StepConfig]]) -> None:
        # a factor pair's second linear reads the rank-wide inner dimension: a later step's groups must divide
        # every rank this step can choose (a multiple of rank_multiple); hand-set ranks are checked too
        for index, step in later:
            need = step.input_multiple()
            bad = [r for r in (self.rank_multiple, *self.ranks.values()) if r % need]
            if bad:
                raise ConfigError(f"steps[{index}] ({step.type}) needs input dimensions that are multiples of "
                                  f"{need}, but the factors' inner dimension (the rank) can be {bad[0]}; set "
                                  f"rank_multiple to a multiple of {need}, or use a group size that divides "
                                  f"{self.rank_multiple}")

    def check(self, model: nn.Module | None) -> None:
        super().check(model)
        if model is not None:
            fixed_ranks(select_layers(model, self.targets, self.skip, self.verb), self.ranks)


def fixed_ranks(layers: dict[str, nn.Module], ranks: dict[str, int]) -> dict[str, int]:
    """The hand-set rank of each layer a `ranks` glob matches; a rank at or above full rank is refused."""
    fixed = {}
    for name, layer in layers.items():
        for pattern, rank in ranks.items():
            if matches(name, [pattern]):
                full = min(layer.in_features, layer.out_features)
                if rank >= full:
                    raise ConfigError(f"ranks[{pattern!r}] = {rank} for layer {name} ({layer.out_features}x"
                                      f"{layer.in_features}) is not below its full rank {full}")
                fixed[name] = rank
    return fixed


def _observe_block(block, layers, observe, config: LowRankConfig) -> dict:
    """The whitening of each of `layers` from one pass of the block over its calibration inputs."""
    if config.method == "svd":
        return dict.fromkeys(layers)
    with HessianCollector(block, layers) as hessians, InputRecorder(layers) as recorder:
        observe()
    return {name: whitener(config.method, hessians.hessian(name).cpu() if config.method == "svd_llm" else None,
                           recorder.mean_abs(name).cpu(), config.damp, config.alpha) for name in layers}


def _layout(model: nn.Module, config: LowRankConfig):
    chosen = select_layers(model, config.targets, config.skip, config.verb)
    fixed = fixed_ranks(chosen, config.ranks)
    per_block = layers_by_block(model, chosen, "low-rank factorization")
    prefixes = [f"{n}." for n in find_structure(model).block_names()]
    shapes = {n: (m.out_features, m.in_features) for n, m in chosen.items() if n not in fixed}
    return chosen, fixed, per_block, prefixes, shapes


def layer_costs(model: nn.Module, config: LowRankConfig, calibration: torch.Tensor, device=None) -> dict:
    """Per budgeted layer, what dropping each singular direction costs, from a pass over the model as it is:
    the whitened spectrum weighted by the loss's sensitivity to the layer's outputs (`sensitivity`), or the
    squared spectrum alone (`spectrum`, compared relative to each layer's total)."""
    _, _, per_block, prefixes, shapes = _layout(model, config)
    fisher = {}
    if config.allocation == "sensitivity":
        fisher = output_fisher(model, {n: model.get_submodule(n) for n in shapes}, calibration)
    costs = {}

    def measure(index, block, observe):
        layers = {k: v for k, v in per_block[index].items() if prefixes[index] + k in shapes}
        for name, S in _observe_block(block, layers, observe, config).items():
            full, weight = prefixes[index] + name, layers[name].weight.data.cpu()
            costs[full] = loss_costs(weight, S, fisher[full]) if fisher else spectrum(weight, S).pow(2)
        return {}

    process_layerwise(model, calibration, measure, device=device, batch_size=config.batch_size,
                      desc="low-rank: spectra")
    return costs


def plan_ranks(model: nn.Module, config: LowRankConfig, calibration: torch.Tensor, device=None,
               costs: dict | None = None) -> dict[str, int | None]:
    """Layer -> rank (None: stays dense) under the config's budget; `costs` from `layer_costs` may be
    reused across budgets (the pass that measures them is most of the time)."""
    _, fixed, _, _, shapes = _layout(model, config)
    budget = int(sum(o * i for o, i in shapes.values()) * (1 - config.params_removed))
    if config.allocation == "uniform":
        plan = uniform_ranks(shapes, 1 - config.params_removed, config.rank_multiple)
    else:
        costs = costs if costs is not None else layer_costs(model, config, calibration, device)
        plan = allocate_ranks(costs, shapes, budget, config.rank_multiple, relative=config.allocation == "spectrum")
    return {**plan, **fixed}


def factorize_lowrank(model: nn.Module, config: LowRankConfig, calibration: torch.Tensor, device=None,
                      plan: dict[str, int | None] | None = None) -> dict:
    """Factorize as `config` says (or, given `plan`, with those ranks); per-run statistics for the report."""
    chosen, _, per_block, prefixes, _ = _layout(model, config)
    plan = plan if plan is not None else plan_ranks(model, config, calibration, device)
    totals = {"layers_factorized": 0}

    def one_block(index, block, observe):
        layers = {k: v for k, v in per_block[index].items() if plan.get(prefixes[index] + k) is not None}
        for name, S in _observe_block(block, layers, observe, config).items():
            layer, rank = layers[name], plan[prefixes[index] + name]
            A, B = factorize(layer.weight.data.cpu(), S, rank)
            replace_module(block, name, LowRankLinear.from_factors(layer, A.to(layer.weight.device),
                                                                   B.to(layer.weight.device)))
            totals["layers_factorized"] += 1
        return {}

    process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                      desc=f"low-rank: {config.method}")
    size = {n: m.in_features * m.out_features for n, m in chosen.items()}
    totals["params_before"] = sum(size.values())
    totals["params_after"] = sum(size[n] if plan.get(n) is None else
                                 plan[n] * (chosen[n].in_features + chosen[n].out_features) for n in chosen)
    totals["params_removed"] = 1 - totals["params_after"] / totals["params_before"]
    totals["ranks"] = plan
    return totals


register_step("lowrank", LowRankConfig, factorize_lowrank)
