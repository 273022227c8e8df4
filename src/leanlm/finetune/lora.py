"""LoRA through PEFT, with its target modules found from the module graph (the linear layers inside
the decoder blocks that match the user's patterns), never from a per-architecture name list."""

from __future__ import annotations

import re

import torch
from torch import nn

from leanlm.core.packed import is_runtime_module, parameter_count, runtime_module_types
from leanlm.core.structure import find_structure, matches, opaque_modules, refuse_opaque
from leanlm.errors import ConfigError


def lora_targets(model: nn.Module, patterns: list[str]) -> tuple[list[str], bool]:
    """Names of the linear layers inside decoder blocks that match `patterns` (globs), and whether they
    are leanlm-quantized layers (QLoRA) rather than float nn.Linear (PEFT LoRA)."""
    prefixes = tuple(f"{n}." for n in find_structure(model).block_names())
    inside = {n: m for n, m in model.named_modules() if n.startswith(prefixes) and matches(n, patterns)}
    refuse_opaque_targets({n: kind for n, kind in opaque_modules(model).items() if n.startswith(prefixes)}, patterns)
    quantized = [n for n, m in inside.items() if is_runtime_module(m)]
    floats = [n for n, m in inside.items() if isinstance(m, nn.Linear)]
    if quantized and floats:
        raise ConfigError(f"LoRA targets mix quantized layers ({quantized[0]}, ...) and float ones ({floats[0]}, ...); "
                          "narrow 'targets' so they are all of one kind")
    if not quantized and not floats:
        layer_types = (nn.Linear, *runtime_module_types())
        example = next((n for n, m in model.named_modules() if n.startswith(prefixes) and isinstance(m, layer_types)),
                       "none")
        raise ConfigError(f"LoRA target patterns {patterns} match no linear layer inside the decoder blocks "
                          f"(e.g. {example}); use globs like '*.self_attn.*' or '*proj'")
    return quantized or floats, bool(quantized)


def refuse_opaque_targets(opaque: dict[str, str], patterns: list[str]) -> None:
    """PEFT wraps linear layers: a MoE-fied FFN's stacked experts matched by `patterns` would get no adapter."""
    refuse_opaque(opaque, patterns, [], "train LoRA on", fix="narrow 'targets' to the other layers (e.g. "
                  "'*.self_attn.*'), or use method: full, which trains them too")


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int = 0):
    """Wrap `model` with PEFT LoRA adapters on `targets`; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # adapter init must match across processes and runs
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$")
    return get_peft_model(model, config)


def trainable_counts(model: nn.Module) -> dict:
    total = parameter_count(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}
