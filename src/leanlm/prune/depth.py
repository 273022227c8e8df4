"""Depth pruning: remove whole decoder blocks, chosen from how little each changes the hidden states
on calibration data, leaving a standard (shallower) Hugging Face model.

The hidden states at every block boundary are sampled at the same token positions while the blocks
run one at a time (core.layerwise), so memory stays one block plus a few thousand hidden vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from leanlm.core.layerwise import process_layerwise
from leanlm.core.search import Choice, Span
from leanlm.core.step import StepConfig, register_step
from leanlm.core.structure import find_structure, replace_module
from leanlm.errors import ConfigError, LeanLMError
from leanlm.prune.base import PRUNERS
from leanlm.prune.structured_ops import (
    angular_distance,
    block_influence,
    blocks_to_remove,
)

log = logging.getLogger(__name__)


@dataclass
class DepthConfig(StepConfig):
    """Remove `blocks` decoder blocks: the least influential ones (`block_influence`, ShortGPT) or the
    contiguous run whose ends are most alike (`angular`, Gromov et al.)."""
    stage = "structure"
    search = {"blocks": Span(1, 10), "method": Choice("angular", "block_influence")}
    needs_calibration = True
    blocks: int = 6
    method: Literal["block_influence", "angular"] = "angular"
    keep_last: bool = True
    tokens: int = 16384
    batch_size: int = 8
    calibration_dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        if self.blocks < 1:
            raise ConfigError(f"blocks must be at least 1, got {self.blocks}")
        if self.tokens < 1:
            raise ConfigError(f"tokens must be at least 1, got {self.tokens}")

    def check(self, model: nn.Module | None) -> None:
        if model is None:
            return
        total = len(find_structure(model).blocks)
        if self.blocks >= total - int(self.keep_last):
            raise ConfigError(f"cannot remove {self.blocks} of the model's {total} blocks"
                              f"{' (the last block is kept; set keep_last: false)' if self.keep_last else ''}")


def sample_boundaries(model: nn.Module, calibration: torch.Tensor, tokens: int, batch_size: int = 8,
                      device=None, autocast=None, seed: int = 0) -> list[torch.Tensor]:
    """Hidden states at every block boundary, at up to `tokens` token positions (never position 0,
    whose attention-sink activations would swamp the average)."""
    batches = [calibration[i : i + batch_size] for i in range(0, calibration.shape[0], batch_size)]
    gen = torch.Generator().manual_seed(seed)
    per_batch = -(-tokens // len(batches))
    picks = [torch.randint(1, b.shape[1], (min(per_batch, b.numel()),), generator=gen) for b in batches]
    rows = [torch.randint(0, b.shape[0], (len(p),), generator=gen) for b, p in zip(batches, picks)]
    sampled: list[torch.Tensor] = []

    def take(outs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([o[r.to(o.device), p.to(o.device)].float().cpu() for o, r, p in zip(outs, rows, picks)])

    def one_block(index: int, block: nn.Module, observe) -> dict:
        if index == 0:
            inputs: list[torch.Tensor] = []
            handle = block.register_forward_pre_hook(
                lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
            try:
                outs = observe()
            finally:
                handle.remove()
            sampled.append(take(inputs))
        else:
            outs = observe()
        sampled.append(take(outs))
        return {}

    process_layerwise(model, calibration, one_block, device=device, batch_size=batch_size,
                      desc="sampling hidden states", autocast=autocast)
    return sampled


def remove_blocks(model: nn.Module, indices: list[int]) -> None:
    """Drop the given decoder blocks and keep the model a valid HF model: the config's layer count and
    per-layer lists shrink, and each block's cache index (`layer_idx`) is renumbered."""
    structure = find_structure(model)
    total = len(structure.blocks)
    drop = set(indices)
    if not drop or min(drop) < 0 or max(drop) >= total:
        raise ConfigError(f"block indices must be in 0..{total - 1}, got {sorted(drop)}")
    if len(drop) >= total:
        raise ConfigError(f"cannot remove {len(drop)} of {total} blocks; at least one must remain")
    kept = nn.ModuleList(b for i, b in enumerate(structure.blocks) if i not in drop)
    replace_module(model, structure.blocks_name, kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    _shrink_config(model.config, total, sorted(drop))


def _shrink_config(config, total: int, drop: list[int]) -> None:
    if getattr(config, "num_hidden_layers", None) != total:
        raise LeanLMError(f"the config says {getattr(config, 'num_hidden_layers', None)} layers but the model has "
                          f"{total} blocks; cannot keep them consistent")
    config.num_hidden_layers = total - len(drop)
    for key, value in list(config.to_diff_dict().items()):
        # per-layer settings (attention types, sliding windows) lose the removed layers' entries
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, [v for i, v in enumerate(value) if i not in drop])
            log.info("config.%s: dropped the entries of removed blocks", key)


def prune_depth(model: nn.Module, config: DepthConfig, calibration: torch.Tensor, device=None) -> dict:
    config.check(model)
    total = len(find_structure(model).blocks)
    autocast = torch.bfloat16 if config.calibration_dtype == "bfloat16" else None
    hidden = sample_boundaries(model, calibration, config.tokens, config.batch_size, device, autocast)
    removed = blocks_to_remove(hidden, config.blocks, config.method, config.keep_last)
    params_before = sum(p.numel() for p in model.parameters())
    remove_blocks(model, removed)
    return {"method": config.method, "removed_blocks": removed, "blocks_before": total,
            "blocks_after": total - len(removed), "params_before": params_before,
            "params_after": sum(p.numel() for p in model.parameters()),
            "block_influence": [round(v, 5) for v in block_influence(hidden).tolist()],
            "angular_distance": [round(v, 5) for v in angular_distance(hidden, config.blocks).tolist()]}


register_step("depth", DepthConfig, prune_depth, family=PRUNERS)
