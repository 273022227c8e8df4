"""`quantize_(model, config)`: the one verb of the quantization family, dispatched on config type."""

from __future__ import annotations

import logging
from typing import ClassVar

from torch import nn

from leanlm.core.registry import Registry
from leanlm.core.structure import find_structure, linear_layers, matches, opaque_modules, refuse_opaque, replace_module
from leanlm.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZERS = Registry("quantize_", "quantizer")
register_quantizer = QUANTIZERS.register


def quantize_(model: nn.Module, config, **kwargs) -> dict:
    """Quantize `model` in place as `config` says; returns per-layer statistics for the report."""
    return QUANTIZERS.dispatch(model, config, **kwargs)


def select_layers(model: nn.Module, targets: list[str], skip: list[str], verb: str = "quantize") -> dict[str, nn.Module]:
    """The linear layers to quantize; anything targeted that is not an nn.Linear is an error, not a skip."""
    chosen = {n: m for n, m in linear_layers(model).items() if matches(n, targets) and not matches(n, skip)}
    if not chosen:
        raise ConfigError(f"no linear layer matches targets {targets} minus skip {skip}")
    unsupported = [f"{n} ({type(m).__name__})" for n, m in chosen.items() if type(m) is not nn.Linear]
    if unsupported:
        raise ConfigError(f"cannot {verb} these layers: {', '.join(unsupported[:5])}; add them to 'skip' to leave them unquantized")
    refuse_opaque(opaque_modules(model), targets, skip, verb)
    return chosen


class ChecksLayers:
    """For a step config with `targets` and `skip` (and maybe `group_size`): refuse, before any calibration,
    a selection that matches nothing, holds layers the step cannot handle, or that the group size does not fit."""
    verb: ClassVar[str] = "quantize"

    def check(self, model: nn.Module | None) -> None:
        if model is not None:
            layers = select_layers(model, self.targets, self.skip, verb=self.verb)
            check_group_size(layers, getattr(self, "group_size", None))

    def check_opaque(self, opaque: dict[str, str]) -> None:
        refuse_opaque(opaque, self.targets, self.skip, self.verb)


def valid_group_sizes(dim: int) -> list[int]:
    return [g for g in (32, 64, 128, 256) if dim % g == 0]


def check_group_size(layers: dict[str, nn.Module], group_size: int | None) -> None:
    if group_size is None:
        return
    for name, layer in layers.items():
        if layer.in_features % group_size:
            sizes = valid_group_sizes(layer.in_features) or ["per-channel (null)"]
            raise ConfigError(f"group size {group_size} does not divide the input dimension {layer.in_features} of "
                              f"layer {name}; group sizes that would work: {', '.join(map(str, sizes))}")


def packed_module(linear: nn.Linear, codes, scale, zero, bits: int, group_size: int | None, symmetric: bool) -> nn.Module:
    """The runtime module that stores `codes` packed for `bits`."""
    from leanlm.quantize.int4_linear import Int4Linear
    from leanlm.quantize.int8_linear import Int8Linear

    if bits == 8:
        return Int8Linear.from_codes(linear, codes, scale, zero, group_size, symmetric)
    if bits == 4:
        return Int4Linear.from_codes(linear, codes, scale, zero, group_size)
    raise ConfigError(f"bits={bits} has no packed runtime module; use 4 or 8")


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t is not None)


def new_totals() -> dict:
    return {"layers_quantized": 0, "quantized_bytes_before": 0, "quantized_bytes_bf16": 0, "quantized_bytes_after": 0}


def swap_in_packed(root: nn.Module, name: str, codes, scale, zero, bits: int, group_size: int | None,
                   symmetric: bool, totals: dict) -> None:
    """Replace the linear at `name` under `root` by its packed runtime module, counting the bytes."""
    layer = root.get_submodule(name)
    swap_in(root, name, packed_module(layer, codes.to(layer.weight.device), scale, zero, bits, group_size, symmetric),
            totals)


def swap_in(root: nn.Module, name: str, new: nn.Module, totals: dict) -> None:
    layer = root.get_submodule(name)
    totals["layers_quantized"] += 1
    totals["quantized_bytes_before"] += module_bytes(layer)
    totals["quantized_bytes_bf16"] += layer.weight.numel() * 2
    totals["quantized_bytes_after"] += module_bytes(new)
    replace_module(root, name, new)


def finish_totals(totals: dict) -> dict:
    """Add the size ratio; a "quantized" model that is not smaller is an error, never a silent result."""
    if totals["quantized_bytes_after"] >= totals["quantized_bytes_before"]:
        raise RuntimeError(f"quantized layers take {totals['quantized_bytes_after']} bytes, not fewer than the "
                           f"original {totals['quantized_bytes_before']}")
    totals["fraction_of_bf16"] = totals["quantized_bytes_after"] / max(1, totals["quantized_bytes_bf16"])
    return totals


def layers_by_block(model: nn.Module, chosen: dict[str, nn.Module], method: str) -> list[dict[str, nn.Module]]:
    """The chosen layers of each decoder block, keyed by their name inside the block."""
    prefixes = [f"{n}." for n in find_structure(model).block_names()]
    outside = [n for n in chosen if not any(n.startswith(p) for p in prefixes)]
    if outside:
        raise ConfigError(f"{method} quantizes layers inside decoder blocks only; {', '.join(outside[:3])} lie "
                          "outside: add them to 'skip' or quantize them with an 'rtn' step")
    return [{n[len(p):]: m for n, m in chosen.items() if n.startswith(p)} for p in prefixes]
