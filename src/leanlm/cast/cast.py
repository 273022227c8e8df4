"""Dtype cast: float32 -> bfloat16 / float16, the simplest halving of memory and disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from leanlm.core.search import Choice
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import check_arguments
from leanlm.models.load import DTYPES


@dataclass
class CastConfig(StepConfig):
    stage = "quantize"
    search = {"dtype": Choice("bfloat16", "float16")}
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    reshapes_model = False


def cast_(model: nn.Module, config: CastConfig) -> dict:
    check_arguments("cast_", model, config, CastConfig)
    before = {p.dtype for p in model.parameters()}
    target = DTYPES[config.dtype]
    model.to(target)
    model.config.dtype = config.dtype
    if target == torch.float16 and next(model.parameters()).device.type == "cpu":
        import warnings

        warnings.warn("float16 matrix multiplication is slow on most CPUs; bfloat16 is usually the better CPU choice",
                      stacklevel=2)
    return {"from": sorted(str(d).removeprefix("torch.") for d in before), "to": config.dtype}


register_step("cast", CastConfig, cast_)
