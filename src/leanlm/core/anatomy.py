"""Model anatomy found from the module graph, never from a table of architectures: a block's FFN (the
linears that widen the hidden size and the one that reads it back), its attention projections, the
head counts, and how much each FFN channel contributes. Shared by pruning, MoE-fication, activation
sparsity and rotation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanlm.core.layerwise import HessianCollector
from leanlm.core.structure import find_structure, is_linear
from leanlm.errors import UnsupportedModelError


@dataclass
class FFN:
    expanders: dict[str, nn.Linear]  # hidden -> intermediate (gate and up), or 2 x intermediate when fused
    reducer: tuple[str, nn.Linear]  # intermediate -> hidden (down)
    intermediate: int = 0

    def fused(self) -> list[str]:
        """Expanders that compute gate and up in one (Phi-3's gate_up_proj: gate rows, then up rows)."""
        return [n for n, m in self.expanders.items() if m.out_features == 2 * self.intermediate]

    def expander_rows(self, name: str, kept: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, kept + self.intermediate]) if name in self.fused() else kept


def find_ffn(block: nn.Module, hidden: int, intermediate: int) -> FFN:
    linears = {n: m for n, m in block.named_modules() if is_linear(m)}
    expanders = {n: m for n, m in linears.items() if isinstance(m, nn.Linear)
                 and m.in_features == hidden and m.out_features in (intermediate, 2 * intermediate)}
    reducers = [(n, m) for n, m in linears.items() if isinstance(m, nn.Linear)
                and m.in_features == intermediate and m.out_features == hidden]
    if len(reducers) == 1:  # an attention projection of the same shape (fused qkv) is not part of the FFN
        parent = reducers[0][0].rpartition(".")[0]
        expanders = {n: m for n, m in expanders.items() if n.rpartition(".")[0] == parent}
    if not expanders or len(reducers) != 1:
        raise UnsupportedModelError(
            f"could not find the FFN of {type(block).__name__}: looked for nn.Linear layers {hidden} -> {intermediate} "
            f"(or -> {2 * intermediate}, gate and up fused; found {sorted(expanders) or 'none'}) and exactly one "
            f"{intermediate} -> {hidden} (found {[n for n, _ in reducers] or 'none'}); expert FFNs are not supported")
    return FFN(expanders, reducers[0], intermediate)

def ffn_dims(model: nn.Module, purpose: str = "width pruning") -> tuple[int, int]:
    """(hidden size, FFN width): the config's `intermediate_size`, or else the width of the one FFN in the
    first block's module graph (a linear hidden -> X beside the one reading X back)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise UnsupportedModelError(f"{type(model).__name__}'s config has no integer hidden_size; {purpose} "
                                    "needs it to find the FFN")
    blocks = find_structure(model).blocks  # fails clearly when the blocks can't be found
    intermediate = getattr(model.config, "intermediate_size", None)
    return hidden, intermediate if isinstance(intermediate, int) else ffn_width(blocks[0], hidden, purpose)


def ffn_width(block: nn.Module, hidden: int, purpose: str) -> int:
    """The X of a linear X -> hidden (X != hidden) with a sibling hidden -> X (or 2X, gate and up fused)."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}

    def expands_to(width: int, parent: str) -> bool:
        return any(n.rpartition(".")[0] == parent and m.in_features == hidden and m.out_features in (width, 2 * width)
                   for n, m in linears.items())

    widths = {m.in_features for n, m in linears.items() if m.out_features == hidden and m.in_features != hidden
              and expands_to(m.in_features, n.rpartition(".")[0])}
    if len(widths) != 1:
        raise UnsupportedModelError(
            f"the config of this model has no intermediate_size and {type(block).__name__}'s module graph shows "
            f"{'no' if not widths else len(widths)} FFN widths ({sorted(widths)}); {purpose} needs exactly one")
    return widths.pop()

@dataclass
class Heads:
    heads: int
    kv: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.kv


@dataclass
class Attention:
    module: nn.Module  # the attention module (common parent of q and o)
    q: str  # the query projection, or the fused qkv projection
    kv: list[str]  # key and value projections; empty when fused into q
    o: str


def head_counts(model: nn.Module) -> Heads:
    c = getattr(model, "config", None)
    heads, hidden = getattr(c, "num_attention_heads", None), getattr(c, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        raise UnsupportedModelError(f"{type(model).__name__}'s config has no integer num_attention_heads and "
                                    "hidden_size; head pruning needs both")
    kv = getattr(c, "num_key_value_heads", None) or heads
    return Heads(heads, kv, getattr(c, "head_dim", None) or hidden // heads)

def find_attention(block: nn.Module, collector: HessianCollector, counts: Heads, hidden: int) -> Attention:
    """q/k/v: the linears sharing one input with head-shaped outputs, or else the first fused qkv linear;
    o: the next linear whose input is head-shaped (the call order of the collector's first batch)."""
    order = list(collector.owner)
    layers = collector.layers
    q_out, kv_out = counts.heads * counts.head_dim, counts.kv * counts.head_dim
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(collector.owner[name], []).append(name)
    qkv = next((g for g in groups.values() if len(g) == 3 and all(layers[n].in_features == hidden for n in g)
                and sorted(layers[n].out_features for n in g) == sorted([q_out, kv_out, kv_out])), None)
    if qkv is None:
        qkv = [n for n in order if layers[n].in_features == hidden and layers[n].out_features == q_out + 2 * kv_out][:1]
    if not qkv:
        raise UnsupportedModelError(
            f"could not find the attention projections of {type(block).__name__}: looked for three nn.Linear "
            f"layers reading one input, {hidden} -> {q_out} (q) and {hidden} -> {kv_out} (k, v), or one fused "
            f"{hidden} -> {q_out + 2 * kv_out}")
    q = next(n for n in qkv if len(qkv) == 1 or layers[n].out_features == q_out)
    after = order[max(order.index(n) for n in qkv) + 1:]
    o = next((n for n in after if layers[n].in_features == q_out and layers[n].out_features == hidden), None)
    if o is None:
        raise UnsupportedModelError(f"could not find the output projection ({q_out} -> {hidden}) after {q}")
    parent = q.rpartition(".")[0]
    if o.rpartition(".")[0] != parent:
        raise UnsupportedModelError(f"{q} and {o} are not in one attention module")
    return Attention(block.get_submodule(parent) if parent else block, q, [n for n in qkv if n != q], o)

def channel_importance(input_sq_sum: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """How much each FFN channel contributes to the block output: ||x_j|| * ||W_down[:, j]||."""
    return input_sq_sum.float().sqrt() * down_weight.float().norm(dim=0)
