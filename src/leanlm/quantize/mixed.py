"""Mixed-precision step: each layer's format chosen by its measured sensitivity, within a bit budget.

1. The diagonal Fisher information of every targeted weight is measured with one backward pass
   per calibration sample (the model's own loss on the calibration text).
2. Each layer is rounded to each candidate format; the Fisher-weighted error estimates the KLD
   that format adds, and the packed module's bytes (scales and zero points included) its cost.
3. The allocation (sensitivity_ops.allocate) keeps the most sensitive layers at higher precision
   while the bits per weight over all quantized layers stay within `bits_per_weight`. Layers that
   read the same input (q/k/v, gate/up, found by tracing each block) get one format together, since
   serving runtimes fuse them into one matmul.
4. The layers are quantized with GPTQ (or round-to-nearest) in the chosen formats; with GPTQ, layers outside
   the decoder blocks (an LM head) are rounded to nearest, since GPTQ calibrates on a block's inputs.
The step's statistics list every layer's format, its estimated KLD at each format and its cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core import memo
from leanlm.core.packed import module_bytes
from leanlm.core.scale_pairs import BlockCall, shared_input_groups
from leanlm.core.search import Choice, Span
from leanlm.core.selection import ChecksLayers, select_layers
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import find_structure
from leanlm.errors import ConfigError
from leanlm.quantize import rtn_ops
from leanlm.quantize.base import (
    QUANTIZERS,
    finish_totals,
    new_totals,
    packed_module,
    swap_in_packed,
)
from leanlm.quantize.gptq import GPTQConfig, quantize_gptq
from leanlm.quantize.sensitivity_ops import Format, allocate, fisher_error, parse_format


@dataclass
class MixedConfig(ChecksLayers, StepConfig):
    stage = "quantize"
    search = {"bits_per_weight": Span(4.5, 7.5, step=0.5), "method": Choice("gptq", "rtn"), "skip": Choice(["lm_head"], [])}
    needs_calibration = True
    search_cost = 2
    bits_per_weight: float = 4.5  # budget over the quantized layers, scales and zero points included
    formats: list[str] = field(default_factory=lambda: ["int4-g128", "int4-g64", "int4-g32", "int8"])
    method: Literal["gptq", "rtn"] = "gptq"
    sensitivity_samples: int = 16  # calibration samples whose gradients give the Fisher information
    # one format for linears that read the same input (q/k/v, gate/up), which vLLM fuses into one matmul
    tie_shared_inputs: bool = True
    damp: float = 0.01
    act_order: bool = True
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if not self.formats:
            raise ConfigError("formats must list at least one format, e.g. [int4-g64, int8]")
        for name in self.formats:
            parse_format(name)
        if self.bits_per_weight <= 0 or self.sensitivity_samples < 1:
            raise ConfigError("bits_per_weight and sensitivity_samples must be positive")


def fisher_diagonal(model: nn.Module, layers: dict[str, nn.Module], samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token diagonal Fisher of each layer's weight: T * mean over samples of (d mean-loss / dW)^2."""
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    device = next(model.parameters()).device
    try:
        for row in tqdm(samples, desc="sensitivity", unit="sample", leave=False):
            ids = row[None].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, [m.weight for m in layers.values()])
            for name, g in zip(layers, grads):
                fisher[name].add_(g.float().pow(2), alpha=(ids.shape[1] - 1) / len(samples))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return fisher


def layer_options(layers: dict[str, nn.Module], fisher: dict[str, torch.Tensor],
                  formats: list[Format]) -> dict[str, dict[str, tuple[int, float]]]:
    """For each layer and each format that fits it: (packed bits, estimated KLD)."""
    options = {}
    for name, layer in tqdm(layers.items(), desc="costing formats", unit="layer", leave=False):
        opts = {}
        for fmt in formats:
            if not fmt.fits(layer.in_features):
                continue
            with torch.no_grad():
                codes, scale, zero = rtn_ops.rtn(layer.weight.data, fmt.bits, fmt.group_size, fmt.symmetric)
                bits = 8 * module_bytes(packed_module(layer, codes, scale, zero, fmt.bits, fmt.group_size, fmt.symmetric))
            opts[fmt.name] = (bits, fisher_error(layer.weight.data, fisher[name], fmt))
        if not opts:
            raise ConfigError(f"none of the formats {[f.name for f in formats]} fits layer {name} "
                              f"(input dimension {layer.in_features}); add a format whose group size divides it")
        options[name] = opts
    return options


def tied_units(model: nn.Module, layers: dict[str, nn.Module], sample: torch.Tensor) -> list[list[str]]:
    """Groups of chosen layers that must share a format, found by tracing each block once."""
    structure = find_structure(model)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, kw, out: calls.append(BlockCall(a, dict(kw))), with_kwargs=True)
               for b in structure.blocks]
    try:
        with torch.no_grad():
            model(input_ids=sample.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    units, seen = [], set()
    for prefix, block, call in zip(structure.block_names(), structure.blocks, calls):
        for group in shared_input_groups(block, call):
            unit = [f"{prefix}.{n}" for n in group if f"{prefix}.{n}" in layers]
            if unit:
                units.append(unit)
                seen.update(unit)
    return units + [[n] for n in layers if n not in seen]


def unit_options(units: list[list[str]], options: dict) -> dict[str, dict[str, tuple[int, float]]]:
    """Per unit (keyed by its first layer), the formats every member can take, costs and errors summed."""
    merged = {}
    for unit in units:
        common = set.intersection(*(set(options[n]) for n in unit))
        if not common:
            raise ConfigError(f"layers {unit} read the same input but share no format that fits them all")
        merged[unit[0]] = {f: (sum(options[n][f][0] for n in unit), sum(options[n][f][1] for n in unit))
                           for f in common}
    return merged


def quantize_mixed(model: nn.Module, config: MixedConfig, calibration: torch.Tensor, device=None) -> dict:
    layers = select_layers(model, config.targets, config.skip)
    formats = {f.name: f for f in map(parse_format, config.formats)}
    samples = calibration[: config.sensitivity_samples]
    # a search's trials differ in their bit budget, not in the model or the text: the sensitivity is reused
    # when the driver keeps results (core.memo), keyed by every weight and the samples
    weights = [part for item in model.state_dict().items() for part in item]
    fisher = memo.cached("fisher", [*layers, samples, *weights],
                         lambda: fisher_diagonal(model, layers, samples))
    options = layer_options(layers, fisher, list(formats.values()))
    del fisher
    params = sum(m.weight.numel() for m in layers.values())
    units = tied_units(model, layers, calibration[:1]) if config.tie_shared_inputs else [[n] for n in layers]
    unit_choice = allocate(unit_options(units, options), config.bits_per_weight * params)
    choice = {n: unit_choice[unit[0]] for unit in units for n in unit}
    plan = {n: (formats[f].bits, formats[f].group_size, formats[f].symmetric) for n, f in choice.items()}
    rounded = plan
    totals = new_totals()
    if config.method == "gptq":
        # GPTQ calibrates a layer on its decoder block's inputs; a layer outside the blocks (a tied LM head in
        # the selection, say) has none, so it is rounded to nearest in its chosen format, and the stats say so
        prefixes = tuple(f"{n}." for n in find_structure(model).block_names())
        rounded = {n: f for n, f in plan.items() if not n.startswith(prefixes)}
        gptq = GPTQConfig(damp=config.damp, act_order=config.act_order, batch_size=config.batch_size,
                          calibration_dtype=config.calibration_dtype, targets=config.targets,
                          skip=[*config.skip, *rounded])
        if len(rounded) < len(plan):
            totals = quantize_gptq(model, gptq, calibration, device=device,
                                   plan={n: f for n, f in plan.items() if n not in rounded})
        if rounded:
            totals["rounded_to_nearest"] = sorted(rounded)
    for name, (bits, group, sym) in rounded.items():
        with torch.no_grad():
            codes, scale, zero = rtn_ops.rtn(layers[name].weight.data, bits, group, sym)
        swap_in_packed(model, name, codes, scale, zero, bits, group, sym, totals)
    finish_totals(totals)
    totals.update(_plan_stats(options, choice, layers))
    return totals


def _plan_stats(options: dict, choice: dict[str, str], layers: dict[str, nn.Module]) -> dict:
    rows = [{"layer": n, "format": f, "bits_per_weight": options[n][f][0] / layers[n].weight.numel(),
             "estimated_kld": {k: v[1] for k, v in options[n].items()}} for n, f in choice.items()]
    bits = sum(options[n][f][0] for n, f in choice.items())
    counts: dict[str, int] = {}
    for f in choice.values():
        counts[f] = counts.get(f, 0) + 1
    return {"bits_per_weight": bits / sum(m.weight.numel() for m in layers.values()),
            "estimated_kld": sum(options[n][f][1] for n, f in choice.items()),
            "format_counts": counts, "layers": rows}


register_step("mixed", MixedConfig, quantize_mixed, family=QUANTIZERS)
