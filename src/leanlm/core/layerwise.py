"""Layer-by-layer calibration: one decoder block at a time, so memory stays about one block
plus the calibration activations, whatever the model's depth.

The inputs of the first block are captured by stopping the model's forward there; each block
is then handed to a callback (which may observe it on the calibration data and change it), and
its outputs, computed after the change, become the next block's inputs, as GPTQ and SparseGPT
prescribe. The model may stay on CPU while each block is computed on `device` (e.g. a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.structure import ModelStructure, find_structure


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per calibration batch
    kwargs: list[dict[str, Any]]  # the keyword arguments the model passed to the block, per batch


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, structure: ModelStructure, samples: torch.Tensor,
                               batch_size: int, device: torch.device) -> BlockInputs:
    hidden, kwargs = [], []

    def grab(module, args, kw):
        hidden.append(args[0].to(device) if args else kw.pop("hidden_states").to(device))
        kwargs.append({k: _to(v, device) for k, v in kw.items() if k not in ("cache", "past_key_values")})
        raise _Stop

    handle = structure.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    model_device = next(model.parameters()).device
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[start : start + batch_size].to(model_device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """The block on every calibration batch; `autocast` (e.g. bfloat16) trades precision for speed."""
    outs = []
    device = inputs.hidden[0].device.type
    for hidden, kw in zip(inputs.hidden, inputs.kwargs):
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            out = block(hidden, **kw)
        out = out[0] if isinstance(out, tuple) else out
        outs.append(out.to(hidden.dtype))
    return outs


BlockFn = Callable[[int, nn.Module, Callable[[], None]], dict]


def process_layerwise(model: nn.Module, samples: torch.Tensor, fn: BlockFn, device: torch.device | None = None,
                      batch_size: int = 8, desc: str = "calibrating", autocast: torch.dtype | None = None) -> list[dict]:
    """Call `fn(index, block, observe)` for each block; `observe()` runs the block on its calibration inputs.

    Returns what `fn` returned per block. The block is moved to `device` while it is processed.
    """
    structure = find_structure(model)
    home = next(model.parameters()).device
    device = device or home
    inputs = capture_first_block_inputs(model, structure, samples, batch_size, device)
    results = []
    for index, block in enumerate(tqdm(structure.blocks, desc=desc, unit="block")):
        block.to(device)
        results.append(fn(index, block, lambda: run_block(block, inputs, autocast)))
        inputs.hidden = run_block(block, inputs, autocast)
        block.to(home)
    return results
