"""How sparse each layer of a block should be (TEAL's greedy allocation).

Layers differ a lot in what zeroing their small inputs costs: on SmolLM2, 50% on the down projection
alone costs a KL divergence of 0.03, 50% on gate/up 0.36. The greedy search starts every group of
layers dense and repeatedly raises the level of the group whose next step adds the least output
error per weight it skips, until the block's weight-weighted average reaches the target. Layers
that read the same tensor (q/k/v, gate/up) share a level. A group's cost is the mean squared change
of the smallest module holding it (attention, MLP), measured on a few calibration sequences with the
other groups at their current levels; after a step only the groups under the same module are
measured again.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from leanlm.core.scale_pairs import (
    capture_calls,
    common_parent,
    output_mse,
    shared_input_groups,
)
from leanlm.sparsify.act_sparse_ops import scores, threshold_for

DENSE = -1.0  # a threshold no |score| falls below or on: the layer keeps every input


@dataclass
class Group:
    names: list[str]  # layers of the block (relative names) that share a level
    parent: str  # smallest module holding them ("" = the block); its output shows what a level costs
    params: int
    level: float = 0.0


def find_groups(block: nn.Module, layers: dict[str, nn.Module], observe) -> list[Group]:
    """One group per tensor the chosen layers read, found by running the block on one batch."""
    with capture_calls(block) as calls:
        observe(1)
    groups = []
    for names in shared_input_groups(block, calls[0][0]):
        names = [n for n in names if n in layers]
        if names:
            params = sum(layers[n].in_features * layers[n].out_features for n in names)
            groups.append(Group(names, common_parent(names) if len(names) > 1 else _parent_of(names[0]), params))
    missing = set(layers) - {n for g in groups for n in g.names}
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} were not called when the block ran; cannot allocate sparsity")
    return groups


def _parent_of(name: str) -> str:
    """A lone layer is judged by the module around it, so its error is comparable with its neighbours'."""
    return name.rsplit(".", 1)[0] if "." in name else ""


class Allocator:
    """Greedy levels for one block; `threshold(name, level)` comes from the layer's sampled input rows."""

    def __init__(self, block: nn.Module, groups: list[Group], rows: dict[str, torch.Tensor],
                 norms: dict[str, torch.Tensor | None], step: float, max_level: float):
        self.block, self.groups, self.step, self.max_level = block, groups, step, max_level
        self.modules = dict(block.named_modules())
        self.rows, self.norms = rows, norms
        self._cache: dict[tuple[str, float], float] = {}

    def threshold(self, name: str, level: float) -> float:
        if level <= 0:
            return DENSE
        key = (name, round(level, 6))
        if key not in self._cache:
            self._cache[key] = threshold_for(scores(self.rows[name], self.norms[name]), level)
        return self._cache[key]

    def set_level(self, group: Group, level: float) -> None:
        for name in group.names:
            self.modules[name].threshold.fill_(self.threshold(name, level))

    @torch.no_grad()
    def run(self, target: float, observe, search_batches: int) -> None:
        parents = sorted({g.parent for g in self.groups})
        with ExitStack() as stack:
            calls = {p: stack.enter_context(capture_calls(self.modules[p] if p else self.block, keep_output=True))
                     for p in parents}
            observe(search_batches)
        total = sum(g.params for g in self.groups)
        error = {p: 0.0 for p in parents}
        cost: dict[int, tuple[float, float, float]] = {}  # group -> (cost per weight, new level, new error)
        while (short := target * total - sum(g.level * g.params for g in self.groups)) > 1e-9:
            for i, g in enumerate(self.groups):
                if i in cost and (cost[i][1] - g.level) * g.params > short + 1e-9:
                    del cost[i]  # measured when more was missing: its step would now overshoot the target
                if i not in cost:
                    cost[i] = self._try(g, calls[g.parent], error[g.parent], short)
            best = min(cost, key=lambda i: cost[i][0])
            if cost[best][0] == float("inf"):
                raise RuntimeError(f"no layer can go above {self.max_level:.0%} sparsity to reach {target:.0%}")
            g = self.groups[best]
            g.level, error[g.parent] = cost[best][1], cost[best][2]
            self.set_level(g, g.level)
            for i, other in enumerate(self.groups):  # only costs measured under the changed module are stale
                if other.parent == g.parent:
                    cost.pop(i, None)

    def _try(self, g: Group, calls: list, error: float, short: float) -> tuple[float, float, float]:
        """(error added per weight skipped, level, error) of raising `g` one step, or to the target
        if `short` (weight-levels still missing) is less than a step."""
        level = min(g.level + self.step, g.level + short / g.params, self.max_level)
        if level <= g.level + 1e-9:
            return float("inf"), g.level, error
        parent = self.modules[g.parent] if g.parent else self.block
        self.set_level(g, level)
        new_error = output_mse(parent, calls)
        self.set_level(g, g.level)
        return (new_error - error) / ((level - g.level) * g.params), level, new_error
