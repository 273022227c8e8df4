"""GPT-2's Conv1D layers held as nn.Linear while leanlm works on a model, and written back to save it.

transformers' Conv1D is a linear layer that stores its weight transposed ([in, out]). Every leanlm
method reads nn.Linear's [out, in]; rather than teach each one a second layout, a loaded model's
Conv1D layers become nn.Linear (the same function, the weight transposed once), and `hf_layout`
puts Conv1D back wherever the architecture builds one (found by rebuilding the model from its
config on the meta device, so pruned or renumbered blocks are found too) while the model is saved,
so the checkpoint loads in plain transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from leanlm.core.structure import replace_module


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def has_conv1d_layout(model: nn.Module) -> bool:
    """Whether the architecture stores some linear layers as Conv1D (held as nn.Linear by leanlm)."""
    return bool(conv1d_names(model))


@torch.no_grad()
def linearize(model: nn.Module) -> int:
    """Replace every Conv1D by the nn.Linear that computes the same; returns how many."""
    names = [n for n, m in model.named_modules() if is_conv1d(m)]
    for name in names:
        conv = model.get_submodule(name)
        linear = nn.Linear(*conv.weight.shape, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.t().contiguous(), requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias = conv.bias
        replace_module(model, name, linear)
    return len(names)


def conv1d_names(model: nn.Module) -> set[str]:
    """The modules the model's architecture builds as Conv1D, from its (possibly edited) config."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # a wrapper (PEFT, DDP) saves through its own model
        return set()
    with torch.device("meta"):
        rebuilt = type(model)(model.config)
    return {n for n, m in rebuilt.named_modules() if is_conv1d(m)}


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
    conv.bias = linear.bias if linear.bias is not None else None
    return conv


@contextmanager
def hf_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Within: float layers in the layout the architecture saves (Conv1D where it has them); packed
    runtime modules stay as they are, since leanlm checkpoints rebuild those by name (a MoE-fied FFN
    replaces the module that held c_fc and c_proj, so those names are gone)."""
    originals = {}
    present = dict(model.named_modules())
    for name in sorted(conv1d_names(model)):
        module = present.get(name)
        if type(module) is nn.Linear:
            originals[name] = module
            replace_module(model, name, _as_conv1d(module))
    try:
        yield model
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)
