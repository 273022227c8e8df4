"""Where a per-channel scale can move between two layers without changing what a block computes.

AWQ and SmoothQuant divide some channels of a layer's output by `s` and multiply the matching
input columns of the linear layers that read it by `s`. That is only exact for some pairs: a norm
feeding linears (RMSNorm, LayerNorm), or a linear feeding another through something linear in it
(up_proj -> down_proj through `act(gate) * up`, v_proj -> o_proj through attention with as many
key/value heads as query heads). Instead of a per-architecture table, the pairs are found from the
module graph by running the block: linears that read the same tensor form a group, the norm that
produced that tensor (or an earlier linear of matching width) is its candidate partner, and every
candidate is kept only if scaling by random factors leaves the block's output unchanged.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from leanlm.core.structure import is_linear, is_norm

log = logging.getLogger(__name__)
EXACT = 1e-3  # relative change of the block output below which a rescaling counts as exact
MAX_TRIES = 3  # earlier layers tried as the partner of an intermediate tensor


@dataclass
class ScalePair:
    prev: str  # norm or linear (names relative to the block) whose output channels get divided by s
    nexts: list[str]  # linears that read that output; their input columns get multiplied by s
    parent: str  # smallest module holding all of `nexts`: its output shows what a scale costs ("" = block)


@dataclass
class BlockCall:
    args: tuple
    kwargs: dict[str, Any]


@contextmanager
def capture_calls(module: nn.Module, keep_output: bool = False) -> Iterator[list]:
    """Record the (args, kwargs[, output]) of every call of `module` inside the block."""
    calls: list = []

    def hook(mod, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        calls.append((BlockCall(args, dict(kwargs)), out.detach() if keep_output else None))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def call(module: nn.Module, c: BlockCall) -> torch.Tensor:
    out = module(*c.args, **c.kwargs)
    return out[0] if isinstance(out, tuple) else out


def output_mse(parent: nn.Module, calls: list, autocast: torch.dtype | None = None) -> float:
    """Mean squared difference between `parent`'s output now and the outputs recorded in `calls`."""
    total = 0.0
    for c, out in calls:
        with torch.autocast(out.device.type, dtype=autocast, enabled=autocast is not None):
            got = call(parent, c)
        total += (got.float() - out.float()).pow(2).mean().item()
    return total


def find_scale_pairs(block: nn.Module, example: BlockCall) -> list[ScalePair]:
    """The exact scale pairs of `block`, in forward order, found by running it on `example`."""
    producers, groups, order = _trace(block, example)
    modules = dict(block.named_modules())
    pairs = []
    for tensor_id, readers in groups.items():
        width = modules[readers[0]].in_features
        if tensor_id in producers:
            candidates = [producers[tensor_id]]
        else:  # an intermediate tensor (e.g. act(gate) * up): try the nearest earlier layers of its width
            first = min(order.index(r) for r in readers)
            candidates = [n for n in reversed(order[:first]) if _prev_width(modules[n]) == width][:MAX_TRIES]
        for prev in candidates:
            if _prev_width(modules[prev]) == width and _is_exact(block, example, prev, readers):
                pairs.append(ScalePair(prev, readers, common_parent(readers)))
                break
    return sorted(pairs, key=lambda p: order.index(p.nexts[0]))


def shared_input_groups(block: nn.Module, example: BlockCall) -> list[list[str]]:
    """Linears of `block` that read the very same tensor (q/k/v, gate/up): runtimes like vLLM fuse them."""
    _, groups, _ = _trace(block, example)
    return list(groups.values())


def _trace(block: nn.Module, example: BlockCall):
    """Map each tensor id to the norm/linear that produced it, group linears by the tensor they read."""
    producers: dict[int, str] = {}
    groups: dict[int, list[str]] = {}
    order: list[str] = []
    keep: list[torch.Tensor] = []  # holds every traced tensor so no id is recycled during the trace
    handles = []

    def hook(name):
        def fn(module, args, output):
            order.append(name)
            keep.extend([args[0], output])
            if is_linear(module):
                groups.setdefault(id(args[0]), []).append(name)
            producers[id(output)] = name
        return fn

    for name, module in block.named_modules():
        if name and (is_linear(module) or (is_norm(module) and getattr(module, "weight", None) is not None)):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            call(block, example)
    finally:
        for h in handles:
            h.remove()
    return producers, groups, order


def _prev_width(module: nn.Module) -> int:
    return module.out_features if is_linear(module) else module.weight.shape[0]


@torch.no_grad()
def _is_exact(block: nn.Module, example: BlockCall, prev: str, nexts: list[str]) -> bool:
    modules = dict(block.named_modules())
    saved = {n: {k: v.detach().clone() for k, v in modules[n].named_parameters(recurse=False)} for n in [prev, *nexts]}
    before = call(block, example).float()
    gen = torch.Generator().manual_seed(0)
    s = torch.empty(_prev_width(modules[prev])).uniform_(0.5, 2.0, generator=gen)
    apply_scale(modules[prev], [modules[n] for n in nexts], s)
    after = call(block, example).float()
    for n, params in saved.items():
        for k, v in params.items():
            getattr(modules[n], k).data.copy_(v)
    change = ((after - before).norm() / before.norm().clamp_min(1e-12)).item()
    if change >= EXACT:
        log.debug("%s -> %s is not an exact scale pair (output change %.2e)", prev, nexts, change)
    return change < EXACT


@torch.no_grad()
def apply_scale(prev: nn.Module, nexts: list[nn.Module], s: torch.Tensor) -> None:
    """Divide `prev`'s output channels by `s` and multiply the input columns of `nexts` by it."""
    s = s.to(prev.weight.device, torch.float32)
    w = prev.weight.data
    w.copy_((w.float() / (s[:, None] if w.dim() == 2 else s)).to(w.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    for layer in nexts:
        layer.weight.data.copy_((layer.weight.float() * s[None, :]).to(layer.weight.dtype))


def common_parent(names: list[str]) -> str:
    """The deepest module name holding every one of `names` ("" when only the block does)."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def block_pairs(block: nn.Module, layers: dict[str, nn.Module], observe) -> list[ScalePair]:
    """The exact pairs of `block` whose readers are all being quantized (found on one calibration batch)."""
    with capture_calls(block) as calls:
        observe(1)
    return [p for p in find_scale_pairs(block, calls[0][0]) if all(n in layers for n in p.nexts)]
