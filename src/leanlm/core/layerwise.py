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

from leanlm.core.structure import ModelStructure, check_token_ids, find_structure
from leanlm.errors import ConfigError, LeanLMError


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
def run_block(block: nn.Module, inputs: BlockInputs, autocast: torch.dtype | None = None,
              limit: int | None = None) -> list[torch.Tensor]:
    """The block on the first `limit` calibration batches (all by default); `autocast` (e.g. bfloat16)
    trades precision for speed."""
    outs = []
    device = inputs.hidden[0].device.type
    for hidden, kw in list(zip(inputs.hidden, inputs.kwargs))[:limit]:
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            out = block(hidden, **kw)
        out = out[0] if isinstance(out, tuple) else out
        outs.append(out.to(hidden.dtype))
    return outs


BlockFn = Callable[[int, nn.Module, Callable[..., list]], dict]


def check_calibration(model: nn.Module, config: Any, samples: Any) -> None:
    """Refuse, before any work, calibration data a method cannot use: missing when the config needs it,
    not a [samples, length] tensor of token ids, or ids outside the model's vocabulary (the mark of
    another model's tokenizer). Anything else would fail deep inside a forward pass."""
    what = type(config).__name__
    if samples is None:
        if getattr(config, "needs_calibration", False):
            raise ConfigError(f"{what} needs calibration=token ids [samples, length] "
                              "(leanlm.data.corpus.calibration_samples(tokenizer, text, 128, 512) builds them)")
        return
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.dtype not in (torch.int64, torch.int32):
        got = f"a {samples.dim()}-d {samples.dtype} tensor" if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ConfigError(f"{what}: calibration must be token ids, an integer tensor [samples, length]; got {got}")
    if samples.numel() == 0:
        raise ConfigError(f"{what}: the calibration tensor is empty ({list(samples.shape)})")
    check_token_ids(model, samples, f"{what}: the calibration data")


def process_layerwise(model: nn.Module, samples: torch.Tensor, fn: BlockFn, device: torch.device | None = None,
                      batch_size: int = 8, desc: str = "calibrating", autocast: torch.dtype | None = None) -> list[dict]:
    """Call `fn(index, block, observe)` for each block; `observe(limit=None)` runs the block on its
    calibration inputs (the first `limit` batches), so hooks the callback installed see them.

    Returns what `fn` returned per block. The block is moved to `device` while it is processed.
    """
    structure = find_structure(model)
    home = next(model.parameters()).device
    device = device or home
    inputs = capture_first_block_inputs(model, structure, samples, batch_size, device)
    results = []
    for index, block in enumerate(tqdm(structure.blocks, desc=desc, unit="block")):
        block.to(device)
        results.append(fn(index, block, lambda limit=None: run_block(block, inputs, autocast, limit)))
        inputs.hidden = run_block(block, inputs, autocast)
        block.to(home)
    return results


class InputRecorder:
    """Forward pre-hooks that keep statistics of each module's input channels during `observe()`:
    mean and max absolute value and L2 norm per channel, and up to `rows` sampled input rows (for search
    losses)."""

    def __init__(self, modules: dict[str, nn.Module], rows: int = 0, seed: int = 0):
        self.modules, self.rows = modules, rows
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.abs_max: dict[str, torch.Tensor] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(seed)
        self._handles = []

    def __enter__(self) -> "InputRecorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, name: str):
        def hook(module, args):
            flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if not torch.isfinite(flat).all():
                raise LeanLMError(f"the calibration inputs of layer {name} contain NaN/Inf; "
                                  "check the model (try float32) and the calibration data")
            absval = flat.abs()
            self.abs_sum[name] = self.abs_sum.get(name, 0) + absval.sum(0)
            self.sq_sum[name] = self.sq_sum.get(name, 0) + flat.pow(2).sum(0)
            top = absval.amax(0)
            self.abs_max[name] = torch.maximum(self.abs_max[name], top) if name in self.abs_max else top
            self.count[name] = self.count.get(name, 0) + flat.shape[0]
            if self.rows:
                pick = torch.randperm(flat.shape[0], generator=self._gen)[: self.rows]
                self.samples.setdefault(name, []).append(flat[pick.to(flat.device)])
        return hook

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.count[name]

    def l2_norm(self, name: str) -> torch.Tensor:
        return self.sq_sum[name].sqrt()

    def rows_of(self, name: str) -> torch.Tensor:
        """At most `rows` input rows of the module, drawn evenly from the observed batches."""
        rows = torch.cat(self.samples[name])
        pick = torch.randperm(rows.shape[0], generator=self._gen)[: self.rows]
        return rows[pick.to(rows.device)]


class HessianCollector:
    """Forward hooks that accumulate X^T X per distinct input tensor of a block's linear layers."""

    def __init__(self, block: nn.Module, layers: dict[str, nn.Linear]):
        self.block, self.layers = block, layers
        self.hessians: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}  # layer -> layer whose Hessian it shares
        self.tokens: dict[str, int] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = []

    def __enter__(self):
        self._handles.append(self.block.register_forward_pre_hook(lambda *args: self._seen.clear()))
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            # tensors are held in _seen until the next batch, so an id here cannot have been recycled
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:
                self.owner[name] = seen[1]
                return
            self._seen[id(x)] = (x, name)
            self.owner[name] = name
            flat = x.reshape(-1, x.shape[-1]).float()
            if name not in self.hessians:
                self.hessians[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
                self.tokens[name] = 0
            self.hessians[name].addmm_(flat.T, flat)
            self.tokens[name] += flat.shape[0]
        return hook

    def hessian(self, name: str) -> torch.Tensor:
        owner = self.owner.get(name)
        if owner is None:
            raise LeanLMError(f"layer {name} saw no calibration data; it is not on the block's forward path")
        H = self.hessians[owner] / self.tokens[owner]
        if not torch.isfinite(H).all():
            raise LeanLMError(f"calibration statistics of layer {name} contain NaN/Inf; check the model and data")
        return H
