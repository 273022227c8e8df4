"""Pure math of sensitivity-based mixed precision: formats, Fisher-weighted error, budget allocation.

A layer's sensitivity to a format is the second-order estimate of the KL divergence its rounding
error adds to the model's next-token distribution: 0.5 * sum(F * (W - Q(W))^2), with F the
diagonal Fisher information of the weights (squared gradients of the calibration loss).
The allocation is a knapsack solved greedily: every layer starts at its cheapest format and the
upgrade that removes the most estimated KLD per extra bit is taken while the budget allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from leanlm.errors import ConfigError
from leanlm.quantize.rtn_ops import fake_quantize

FORMAT = re.compile(r"^int(?P<bits>[48])(?:-g(?P<group>\d+))?$")


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    group_size: int | None  # None: one scale per output channel

    @property
    def symmetric(self) -> bool:
        return self.bits == 8  # int8 per channel symmetric uses the packed int8 kernel

    def fits(self, in_features: int) -> bool:
        return self.group_size is None or in_features % self.group_size == 0


def parse_format(name: str) -> Format:
    m = FORMAT.match(name)
    if not m:
        raise ConfigError(f"unknown format {name!r}; formats look like int8, int8-g64, int4-g32, int4-g64, int4-g128")
    bits, group = int(m["bits"]), int(m["group"]) if m["group"] else None
    if bits == 4 and group is None:
        raise ConfigError(f"format {name!r}: 4-bit needs a group size (int4-g32, int4-g64, int4-g128)")
    return Format(name, bits, group)


def fisher_error(weight: torch.Tensor, fisher: torch.Tensor, fmt: Format) -> float:
    """Estimated KLD added by quantizing `weight` to `fmt`: 0.5 * sum(F * dW^2)."""
    delta = fake_quantize(weight, fmt.bits, fmt.group_size, fmt.symmetric) - weight.float()
    return 0.5 * (fisher.float() * delta.pow(2)).sum().item()


def allocate(options: dict[str, dict[str, tuple[int, float]]], budget_bits: float) -> dict[str, str]:
    """Pick a format per layer from `options[layer][format] = (bits, estimated KLD)` within `budget_bits`."""
    choice = {layer: min(opts, key=lambda f: (opts[f][0], opts[f][1])) for layer, opts in options.items()}
    used = sum(options[layer][f][0] for layer, f in choice.items())
    if used > budget_bits:
        raise ConfigError(f"the bits-per-weight budget is below what the cheapest formats need "
                          f"({used} bits > {budget_bits:.0f}); raise bits_per_weight or add cheaper formats")
    while True:
        best = None
        for layer, opts in options.items():
            bits0, err0 = opts[choice[layer]]
            for fmt, (bits, err) in opts.items():
                extra = bits - bits0
                if extra <= 0 or err >= err0 or used + extra > budget_bits:
                    continue
                gain = (err0 - err) / extra
                if best is None or gain > best[0]:
                    best = (gain, layer, fmt, extra)
        if best is None:
            return choice
        _, layer, fmt, extra = best
        choice[layer], used = fmt, used + extra
