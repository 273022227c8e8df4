"""The packed-module protocol: how runtime modules that hold weights in their own layout (integer codes,
compressed 2:4 values, stacked experts) are registered, stored, counted and read by other packages.

A runtime module registers under a scheme name (`register_module`, listed in core/catalog.py) and
provides `empty(...)` or `wrap(...)` plus `manifest()` so checkpoints load back. A module holding
weight codes also provides:
- `PACKED`: the names of its code tensors, and `packed_params()`: the weights they stand for;
- `dequantized_weight(dtype)`: the float weight it computes with;
- `quantized_codes()`: a `QuantizedWeight` (integer codes, scales, zero points), so exporters write
  the codes without re-rounding and without knowing the module's class;
- `quant_scheme()`: (bits, group_size, symmetric), what requantizing a changed weight must keep.
A packed LM head may also provide `embedding_view(padding_idx)`: an input embedding that reads its codes,
which a tied model then uses instead of keeping a float copy of the matrix (core.structure.share_tied_codes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanlm.core.registry import (
    _MODULES,
    is_runtime_module,
    register_module,
    runtime_module,
)

__all__ = ["QuantizedWeight", "register_module", "runtime_module", "is_runtime_module", "runtime_module_types",
           "packed_tensor", "parameter_count", "module_bytes"]


@dataclass
class QuantizedWeight:
    """A weight as integer codes: w = (codes - zero) * scale, per group of `group_size` input columns."""
    codes: torch.Tensor  # [out, in], unpacked integers (int8 signed for symmetric int8, 0..15 for int4)
    scale: torch.Tensor  # [out, groups]
    zero: torch.Tensor | None  # [out, groups] in the codes' range; None when symmetric around 0
    bits: int
    group_size: int | None  # None: one group per row


def runtime_module_types() -> tuple[type[nn.Module], ...]:
    """The runtime module classes imported so far (a model can only hold those)."""
    return tuple(_MODULES.values())


def packed_tensor(tensor: torch.Tensor) -> nn.Parameter:
    """How runtime modules hold their codes and scales: frozen parameters, not buffers. Compiled graphs
    then skip torch.compile's per-call no-aliasing guard over them (it covers every buffer, pairwise: ~1-2 ms
    a decode step on CPU for a 30-layer model)."""
    return nn.Parameter(tensor, requires_grad=False)


def parameter_count(model: nn.Module) -> int:
    """Weights the model stands for: each distinct plain parameter once (tied ones once), and for each
    packed module the weights its codes encode (`packed_params()`), not the codes' own tensors."""
    packed = [m for m in model.modules() if hasattr(m, "packed_params")]
    codes = {id(getattr(m, name)) for m in packed for name in m.PACKED if getattr(m, name) is not None}
    plain = {p.data_ptr(): p for p in model.parameters() if id(p) not in codes}
    return sum(p.numel() for p in plain.values()) + sum(m.packed_params() for m in packed)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t is not None)

