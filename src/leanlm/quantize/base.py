"""`quantize_(model, config)`: the one verb of the quantization family, dispatched on config type."""

from __future__ import annotations

import logging

from torch import nn

from leanlm.core.packed import module_bytes
from leanlm.core.registry import Family
from leanlm.core.structure import replace_module
from leanlm.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZERS = Family("quantize_", "quantizer")  # each method registers its step type with family=QUANTIZERS


def quantize_(model: nn.Module, config, **kwargs) -> dict:
    """Quantize `model` in place as `config` says; returns per-layer statistics for the report."""
    return QUANTIZERS.dispatch(model, config, **kwargs)


def packed_module(linear: nn.Linear, codes, scale, zero, bits: int, group_size: int | None, symmetric: bool) -> nn.Module:
    """The runtime module that stores `codes` packed for `bits`."""
    from leanlm.quantize.int4_linear import Int4Linear
    from leanlm.quantize.int8_linear import Int8Linear

    if bits == 8:
        return Int8Linear.from_codes(linear, codes, scale, zero, group_size, symmetric)
    if bits == 4:
        return Int4Linear.from_codes(linear, codes, scale, zero, group_size)
    raise ConfigError(f"bits={bits} has no packed runtime module; use 4 or 8")


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
