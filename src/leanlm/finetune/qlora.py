"""QLoRA-style LoRA on leanlm's own quantized layers: the packed base stays frozen and packed, and
low-rank adapters train in float beside it, so training memory is the quantized model plus the adapters.

Merging dequantizes each layer, adds the adapter's product, and quantizes the sum again to the layer's
own scheme (bits, group size, symmetry). By default this requantization is GPTQ on calibration data:
a LoRA update is mostly smaller than half a quantization step, so plain re-rounding to the nearest
level throws most of it away, while GPTQ's error feedback keeps its effect on the layer's outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.core.registry import step_type
from leanlm.core.structure import replace_module
from leanlm.errors import ConfigError


class QLoRALinear(nn.Module):
    """A frozen quantized layer plus a trainable low-rank update: y = base(x) + (alpha / r) B A x."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        if not hasattr(base, "quant_scheme"):
            raise ConfigError(f"{type(base).__name__} has no requantizable scheme; LoRA on a quantized base "
                              "supports leanlm's weight-only int4/int8 layers (rtn, gptq, awq steps)")
        self.base, self.scaling = base, alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: B = 0, so training starts at the base
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # the packed kernels have no backward; the gradient w.r.t. x goes through the dequantized weight
            base = F.linear(x, self.base.dequantized_weight(x.dtype), self.base.bias)
        else:
            base = self.base(x)
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return base + update * self.scaling

    def merged_linear(self) -> nn.Linear:
        """The float layer base + update, for requantization."""
        base = self.base
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=self.lora_A.device)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            linear.weight.copy_(base.dequantized_weight(torch.float32) + delta)
            if base.bias is not None:
                linear.bias.copy_(base.bias.float())
        return linear.requires_grad_(False)


def add_qlora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
              seed: int = 0) -> nn.Module:
    """Wrap each quantized layer in `targets` with a trainable adapter; everything else is frozen."""
    torch.manual_seed(seed)  # adapter init must match across processes and runs
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        replace_module(model, name, QLoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return model


def merge_qlora(model: nn.Module, method: str = "gptq", calibration: torch.Tensor | None = None,
                device=None) -> dict:
    """Fold every adapter into its layer and requantize it to the layer's own scheme, in place."""
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    if not wrapped:
        raise ConfigError("the model has no LoRA adapters on quantized layers to merge")
    plan = {n: m.base.quant_scheme() for n, m in wrapped.items()}
    for name, module in wrapped.items():
        replace_module(model, name, module.merged_linear())
    if method == "gptq" and calibration is None:
        raise ConfigError("requantizing a merged LoRA with GPTQ needs calibration data; give some or set requantize: rtn")
    # the quantizer is found by its step name, so fine-tuning does not import the quantize package
    quantizer = step_type(method)
    config = quantizer.config(targets=list(plan), skip=[])
    stats = quantizer.verb(model, config, calibration=calibration, device=device, plan=plan)
    return {"requantize": method, "layers_requantized": len(plan), **stats}
