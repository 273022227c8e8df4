"""Save a model: plain HF when nothing custom is inside, else a leanlm checkpoint (see models.load)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlm.core.conv1d import hf_layout
from leanlm.core.registry import is_runtime_module
from leanlm.models.load import LEANLM_MANIFEST, LEANLM_WEIGHTS
from leanlm.models.sparse_storage import pack_state, sparse_weights


def save_model(model: nn.Module, tokenizer: Any, out: str | os.PathLike) -> None:
    """Save as plain HF when nothing custom is inside, else as a leanlm checkpoint (runtime modules, or
    pruned weights stored as bitmask + values so the checkpoint is smaller)."""
    with hf_layout(model):
        _save_model(model, tokenizer, Path(out))


def _save_model(model: nn.Module, tokenizer: Any, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    custom = {n: m for n, m in model.named_modules() if is_runtime_module(m)}
    sparse = sparse_weights(model)
    if not custom and not sparse:
        model.save_pretrained(out)
        return
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    state, aliases = _dedupe_state(model.state_dict())
    state, sparse_shapes = pack_state(state, sparse)
    save_file(state, out / LEANLM_WEIGHTS, metadata={"format": "pt"})
    manifest = {
        "format": "leanlm",
        "version": 1,
        "modules": {n: {"scheme": m.scheme, **m.manifest()} for n, m in custom.items()},
        "aliases": aliases,
        "sparse": sparse_shapes,
    }
    (out / LEANLM_MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / "README.md").write_text(
        "# leanlm checkpoint\n\nQuantized layers are stored packed, and pruned weights as bitmask + values, in "
        "`leanlm-model.safetensors`.\n"
        "Load with `leanlm.load_model(path)` or any `leanlm` command; plain transformers cannot read it.\n"
    )


def _dedupe_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied tensors (embeddings / LM head) are stored once; aliases map the dropped keys back."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        kept[key] = tensor.contiguous()
    return kept, aliases
