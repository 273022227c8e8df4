"""Plain Hugging Face export: every packed layer dequantized back to an nn.Linear, for any runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlm.core.conv1d import hf_layout
from leanlm.core.packed import is_runtime_module
from leanlm.core.structure import replace_module
from leanlm.models.load import DTYPES

log = logging.getLogger(__name__)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None, warn_w8a8: bool = True) -> int:
    """Replace each leanlm runtime module by an nn.Linear holding its dequantized weight (an embedding that
    reads a tied head's codes: by an nn.Embedding); returns how many."""
    packed = [(n, m) for n, m in model.named_modules() if is_runtime_module(m)]
    for name, module in packed:
        if hasattr(module, "dequantized_module"):  # not a linear: an embedding reading a tied head's codes
            replace_module(model, name, module.dequantized_module())
            continue
        weight = module.dequantized_weight(torch.float32)
        bias = getattr(module, "bias", None)
        # the layer's own compute dtype, so a half-precision model does not come out with float32 layers
        own = DTYPES.get(module.manifest().get("dtype"), torch.float32)
        out_dtype = dtype or (bias.dtype if bias is not None else own)
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, dtype=out_dtype,
                           device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        replace_module(model, name, linear)
    if warn_w8a8 and any(type(m).scheme == "w8a8_dynamic" for _, m in packed):
        log.warning("W8A8 layers were written with float weights: activations are no longer quantized")
    return len(packed)


def export_hf(model: nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype | None = None) -> dict:
    count = dequantize_model(model, dtype)
    if dtype is not None:
        model.to(dtype)
    with hf_layout(model):
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"dequantized_layers": count}
