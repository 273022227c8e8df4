"""Attention head pruning: remove whole KV groups, or query heads inside each group, ranked by how much
each head adds to the block's output on calibration data, and refit the output projection by least
squares so the kept heads stand in for the removed ones.

A head's importance is the energy of its share of the output projection, E||W_o[:, h] x_h||^2 =
tr(W_o[:, h] H_hh W_o[:, h]^T) with H the output projection's input Hessian X^T X (Minitron ranks
heads by activations too; this weighs them by what reaches the residual stream). The attention
projections are found from the module graph: q, k and v are the linears that read one shared input
with head-shaped outputs (or one fused qkv linear, rows q then k then v, as Phi-3 has), the output
projection is the next linear reading a head-shaped input. Every block keeps the same number of
heads, so the result is a standard HF config (with `head_dim` written out, since hidden_size / heads
no longer gives it); architectures that derive the head size from other keys are refused up front.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig

from leanlm.core.anatomy import Attention, Heads, find_attention, head_counts
from leanlm.core.layerwise import HessianCollector, process_layerwise
from leanlm.core.search import Span
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import check_config_describes, find_structure, replace_module
from leanlm.errors import ConfigError, LeanLMError, UnsupportedModelError
from leanlm.prune.base import PRUNERS
from leanlm.prune.structured_ops import head_importance, kept_heads, refit_down
from leanlm.prune.width import slice_error, sliced, zeroed_output


@dataclass
class HeadsConfig(StepConfig):
    """Keep `kv_groups` KV groups and/or `heads_per_group` query heads of each kept group, per block."""
    stage = "structure"
    search = {"heads_per_group": Span(1, 8)}  # more than a group holds is refused by check()
    needs_calibration = True
    kv_groups: int | None = None
    heads_per_group: int | None = None
    refit: bool = True
    damp: float = 0.01
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        if self.kv_groups is None and self.heads_per_group is None:
            raise ConfigError("head pruning needs kv_groups and/or heads_per_group (how many to keep)")
        for key in ("kv_groups", "heads_per_group"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")

    def check(self, model: nn.Module | None) -> None:
        if model is not None:
            counts = head_counts(model)
            find_structure(model)  # fails clearly when the blocks can't be found
            check_head_size_kept(model, counts, target_counts(counts, self))


def target_counts(current: Heads, config: HeadsConfig) -> Heads:
    kv = config.kv_groups or current.kv
    per_group = config.heads_per_group or current.per_group
    if kv > current.kv or per_group > current.per_group:
        raise ConfigError(f"the model has {current.kv} KV groups of {current.per_group} query heads; cannot keep "
                          f"{kv} groups of {per_group}")
    if (kv, per_group) == (current.kv, current.per_group):
        hint = " (each KV group has one query head here: set kv_groups to remove whole heads)" if current.per_group == 1 else ""
        raise ConfigError(f"keeping {kv} KV groups of {per_group} query heads removes nothing; lower kv_groups "
                          f"or heads_per_group{hint}")
    return Heads(kv * per_group, kv, current.head_dim)


def check_head_size_kept(model: nn.Module, counts: Heads, target: Heads) -> None:
    """Before any calibration: a model built from the config with the target head counts (and head_dim
    written out) must have attention projections of the pruned shapes, or the result could not be saved."""
    from leanlm.core.conv1d import linearize

    trial = copy.deepcopy(model.config)
    trial.num_attention_heads, trial.num_key_value_heads, trial.head_dim = target.heads, target.kv, counts.head_dim
    with torch.device("meta"):
        rebuilt = type(model)(trial)
    linearize(rebuilt)
    shapes = {(m.in_features, m.out_features) for m in find_structure(rebuilt).blocks[0].modules()
              if isinstance(m, nn.Linear)}
    hidden, q_out, kv_out = model.config.hidden_size, target.heads * counts.head_dim, target.kv * counts.head_dim
    projections = {(hidden, q_out), (hidden, kv_out)} <= shapes or (hidden, q_out + 2 * kv_out) in shapes
    if not projections or (q_out, hidden) not in shapes:
        raise UnsupportedModelError(
            f"head pruning is not supported for {type(model).__name__}: a model built from its config with "
            f"{target.heads} query heads in {target.kv} KV groups, head_dim {counts.head_dim}, has no {hidden} -> {q_out} "
            f"query and {q_out} -> {hidden} output projections (the architecture derives the head size from other "
            "config keys), so the pruned model would not load")


def check_per_head(block: nn.Module, attn: Attention, counts: Heads) -> None:
    """Refuse attention modules with parameters beside q/k/v/o that span all heads at once (OLMo-2
    normalises q and k over every head together): removing heads would change what the rest compute."""
    sliced = (attn.q, *attn.kv, attn.o)
    prefix = attn.q.rpartition(".")[0]
    widths = {counts.heads * counts.head_dim, counts.kv * counts.head_dim} - {counts.head_dim}
    for name, param in attn.module.named_parameters():
        full = f"{prefix}.{name}" if prefix else name
        if not any(full == s or full.startswith(s + ".") for s in sliced) and param.shape[-1] in widths:
            raise UnsupportedModelError(
                f"{type(block).__name__}'s {full} ({list(param.shape)}) spans all heads, so removing heads would "
                "change the others' outputs; head pruning is not supported")


def rows_of(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def shrink_attention(block: nn.Module, attn: Attention, q_heads: torch.Tensor, kv_heads: torch.Tensor,
                     o_weight: torch.Tensor, counts: Heads, target: Heads, observe) -> float:
    """Slice q/k/v/o to the kept heads and check, on one calibration batch, that the block computes what
    the full block with the removed heads' output columns zeroed computes; returns that difference."""
    o = block.get_submodule(attn.o)
    cols = rows_of(q_heads, counts.head_dim).to(o.weight.device)
    expected, masked = zeroed_output(o, cols, o_weight, observe)
    kv_rows = rows_of(kv_heads, counts.head_dim).to(cols.device)
    if attn.kv:
        replace_module(block, attn.q, sliced(block.get_submodule(attn.q), cols, 0))
        for name in attn.kv:
            replace_module(block, name, sliced(block.get_submodule(name), kv_rows, 0))
    else:  # fused rows: q heads, then k heads, then v heads
        q_out, kv_out = counts.heads * counts.head_dim, counts.kv * counts.head_dim
        rows = torch.cat([cols, q_out + kv_rows, q_out + kv_out + kv_rows])
        replace_module(block, attn.q, sliced(block.get_submodule(attn.q), rows, 0))
    replace_module(block, attn.o, sliced(o, cols, 1, masked))
    _set_counts(attn.module, target)
    diff, bad = slice_error(expected, observe)
    if bad:
        raise LeanLMError(f"slicing the heads of {type(attn.module).__name__} changed the block's output by {diff:.3g}; "
                          "it keeps head counts somewhere leanlm does not update")
    return diff


def _set_counts(module: nn.Module, target: Heads) -> None:
    """Attention modules read their group ratio (and, in some architectures, head counts) from
    attributes set at construction; some (Phi-3) read the head count from the model config as they
    run, so a pruned block gets its own copy until every block is pruned (`_share_config`)."""
    for attr, value in (("num_key_value_groups", target.per_group), ("num_heads", target.heads),
                        ("num_attention_heads", target.heads), ("num_key_value_heads", target.kv)):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)
    config = getattr(module, "config", None)
    if isinstance(config, PretrainedConfig):
        module._leanlm_shared_config = config
        module.config = copy.copy(config)
        module.config.num_attention_heads, module.config.num_key_value_heads = target.heads, target.kv


def _share_config(model: nn.Module) -> None:
    """Once the shared config says the new counts: point the pruned blocks back at it."""
    for module in model.modules():
        if "_leanlm_shared_config" in module.__dict__:
            module.config = module.__dict__.pop("_leanlm_shared_config")


def prune_heads(model: nn.Module, config: HeadsConfig, calibration: torch.Tensor, device=None) -> dict:
    config.check(model)
    counts, hidden = head_counts(model), model.config.hidden_size
    target = target_counts(counts, config)
    params_before = sum(p.numel() for p in model.parameters())

    def one_block(index: int, block: nn.Module, observe) -> dict:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        with HessianCollector(block, linears) as collector:
            observe()
        attn = find_attention(block, collector, counts, hidden)
        check_per_head(block, attn, counts)
        o = block.get_submodule(attn.o)
        H = collector.hessian(attn.o).to(o.weight.device)
        scores = head_importance(o.weight.data, H, counts.head_dim)
        q_heads, kv_heads = kept_heads(scores, counts.kv, target.kv, target.per_group)
        cols = rows_of(q_heads, counts.head_dim).to(o.weight.device)
        weight = refit_down(o.weight.data, H, cols, config.damp) if config.refit else o.weight.data[:, cols]
        diff = shrink_attention(block, attn, q_heads, kv_heads, weight, counts, target, observe)
        return {"kept_heads": q_heads.tolist(), "max_slice_diff": diff}

    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    done = process_layerwise(model, calibration, one_block, device=device, batch_size=config.batch_size,
                             desc="head pruning", autocast=autocast)
    model.config.num_attention_heads, model.config.num_key_value_heads = target.heads, target.kv
    model.config.head_dim = counts.head_dim
    _share_config(model)
    check_config_describes(model, "head pruning")
    return {"heads_before": counts.heads, "heads_after": target.heads, "kv_heads_before": counts.kv,
            "kv_heads_after": target.kv, "refit": config.refit, "kept_heads": [d["kept_heads"] for d in done],
            "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
            "max_slice_diff": max(d["max_slice_diff"] for d in done)}


register_step("heads", HeadsConfig, prune_heads, family=PRUNERS)
