"""Which linear layers a per-linear step works on: `targets` globs minus `skip` globs, checked before
any calibration (shared by quantization, weight pruning, activation sparsity and the sensitivity scan)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from leanlm.core.structure import (
    find_structure,
    linear_layers,
    matches,
    opaque_modules,
    refuse_opaque,
)
from leanlm.errors import ConfigError


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

    def input_multiple(self) -> int:
        return getattr(self, "group_size", None) or 1

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


def layers_by_block(model: nn.Module, chosen: dict[str, nn.Module], method: str) -> list[dict[str, nn.Module]]:
    """The chosen layers of each decoder block, keyed by their name inside the block."""
    prefixes = [f"{n}." for n in find_structure(model).block_names()]
    outside = [n for n in chosen if not any(n.startswith(p) for p in prefixes)]
    if outside:
        raise ConfigError(f"{method} quantizes layers inside decoder blocks only; {', '.join(outside[:3])} lie "
                          "outside: add them to 'skip' or quantize them with an 'rtn' step")
    return [{n[len(p):]: m for n, m in chosen.items() if n.startswith(p)} for p in prefixes]
