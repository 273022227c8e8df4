"""A step type defined outside leanlm, for the test that a new step type joins `leanlm auto`'s search
with no change to it: round every linear weight's mantissa to a few bits (real, cheap and lossy)."""

from dataclasses import dataclass

import torch
from torch import nn

from leanlm.core.search import Span
from leanlm.core.step import StepConfig, register_step


@dataclass
class MantissaConfig(StepConfig):
    stage = "quantize"
    search = {"bits": Span(1, 6)}
    reshapes_model = False
    bits: int = 6


@torch.no_grad()
def round_mantissa(model: nn.Module, config: MantissaConfig) -> dict:
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            mantissa, exponent = torch.frexp(module.weight)
            scale = 2.0 ** config.bits
            module.weight.copy_(torch.ldexp(torch.round(mantissa * scale) / scale, exponent))
            count += 1
    return {"layers": count}


register_step("toy_mantissa", MantissaConfig, round_mantissa)
