"""Load and size up causal LMs: HF directories, GGUF files (gguf_load.py), built-ins, leanlm checkpoints (written by save.py).

A leanlm checkpoint is an HF directory whose linear layers were replaced by quantized runtime
modules. Its weights live in `leanlm-model.safetensors` (not `model.safetensors`) so that plain
transformers fails loudly on it instead of loading int8 codes as float weights; `leanlm.json`
lists each replaced module and how to rebuild it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from leanlm.core.registry import runtime_module
from leanlm.core.structure import replace_module
from leanlm.errors import (
    ConfigError,
    InsufficientMemoryError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from leanlm.models.builtin import BUILTIN_MODELS, ensure_builtin
from leanlm.models.gguf_load import gguf_params, load_gguf

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LEANLM_MANIFEST = "leanlm.json"
LEANLM_WEIGHTS = "leanlm-model.safetensors"

@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str  # what the user asked for
    path: Path  # directory or file the weights came from
    disk_bytes: int
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_loaded(loaded: Any, verb: str) -> None:
    """Refuse a raw path or module where a model with its tokenizer is needed, naming the fix."""
    if not isinstance(loaded, LoadedModel):
        raise ConfigError(f"{verb} takes a LoadedModel (a model with its tokenizer), got {type(loaded).__name__}; "
                          "build one with leanlm.load_model(path_or_name)")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedModelError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UnsupportedModelError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, stored: torch.dtype | None) -> torch.dtype:
    if dtype == "auto":
        return stored if stored in DTYPES.values() else torch.float32
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_source(source: str | os.PathLike) -> Path:
    """Turn a model name or path into a local directory or GGUF file, fetching built-ins once."""
    if not isinstance(source, (str, os.PathLike)):
        held = " (pass its source path, or use the loaded model's .model with the Python verbs)" \
            if isinstance(source, LoadedModel) else ""
        raise ConfigError(f"a model is a built-in name, a Hugging Face directory or a .gguf path; "
                          f"got {type(source).__name__}{held}")
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json; it is not a Hugging Face model directory")
        if path.is_file() and path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf file or a built-in name")
        return path
    if text in BUILTIN_MODELS:
        return ensure_builtin(text)
    known = ", ".join(BUILTIN_MODELS)
    close = difflib.get_close_matches(text, list(BUILTIN_MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelNotFoundError(
        f"model {text!r} not found: it is neither an existing path nor a built-in model name.{hint}\n"
        f"Built-in models: {known}. Or pass a local Hugging Face directory (with config.json) or a .gguf file."
    )


def estimate_bytes(path: Path, dtype: str = "auto") -> int:
    """Bytes of memory the loaded weights will take, computed without loading them."""
    if path.is_file():  # GGUF: dequantized to float32, and the file is read alongside
        return gguf_params(path) * 4 + path.stat().st_size
    if (path / LEANLM_MANIFEST).is_file():
        return (path / LEANLM_WEIGHTS).stat().st_size
    config = _read_config(path)
    target = resolve_dtype(dtype, _stored_dtype(config))
    return _count_params(config) * torch.finfo(target).bits // 8


def check_memory(needed: int, device: torch.device, what: str) -> None:
    """Refuse a load that cannot fit, before it starts swapping or gets killed."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
        where = f"free on {device}"
    else:
        available = psutil.virtual_memory().available
        where = "available RAM"
    margin = int(needed * 1.1) + (256 << 20)  # activations, allocator slack
    if margin > available:
        raise InsufficientMemoryError(
            f"{what} needs about {margin / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB is {where}. "
            f"Free memory, pick a smaller dtype (--dtype bfloat16), or use a machine with more memory."
        )


def load_model(source: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a built-in name, HF directory, GGUF or leanlm checkpoint."""
    path = resolve_source(source)
    dev = resolve_device(device)
    check_memory(estimate_bytes(path, dtype), dev, f"loading {source}")
    if path.is_file():
        model, tokenizer = load_gguf(path)
        model = model.to(resolve_dtype(dtype, torch.float32))
    elif (path / LEANLM_MANIFEST).is_file():
        model, tokenizer = _load_leanlm(path)
        _refuse_dtype_change(path, model, dtype)
    else:
        model, tokenizer = _load_hf(path, dtype)
    from leanlm.core.conv1d import linearize
    from leanlm.core.paths import dir_size

    linearize(model)  # GPT-2 style Conv1D layers: every method reads nn.Linear; saving writes them back
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, str(source), path, dir_size(path))


def _load_hf(path: Path, dtype: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    config = _read_config(path)
    target = resolve_dtype(dtype, _stored_dtype(config))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=target)
    except (ValueError, KeyError, OSError) as err:
        raise UnsupportedModelError(f"{path}: transformers could not load this model ({err})") from err
    return model, _load_tokenizer(path)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(f"{path}: no usable tokenizer next to the weights ({err}); "
                                    "save the tokenizer into the model directory") from err


def _load_leanlm(path: Path) -> tuple[nn.Module, Any]:
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from leanlm.models.sparse_storage import unpack_state

    manifest = json.loads((path / LEANLM_MANIFEST).read_text())
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=_stored_dtype(config.to_dict()) or torch.float32)
    for name, spec in manifest["modules"].items():
        spec = dict(spec)
        cls = runtime_module(spec.pop("scheme"), where=f"{path}: module {name}")
        # a module that wraps one of the model's own (e.g. a norm) is built around it, the rest from scratch
        module = cls.wrap(model.get_submodule(name), **spec) if hasattr(cls, "wrap") else cls.empty(**spec)
        replace_module(model, name, module)
    state = unpack_state(load_file(path / LEANLM_WEIGHTS), manifest.get("sparse", {}))
    # safetensors can hand back tensors only 8-byte aligned, and torch's packed CPU kernels
    # (_weight_int8pack_mm) crash on those; a copy gets the allocator's 64-byte alignment
    for key, tensor in state.items():  # one at a time: the original is freed before the next copy
        if tensor.data_ptr() % 64:
            state[key] = tensor.clone()
    for alias, key in manifest.get("aliases", {}).items():
        state[alias] = state[key]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UnsupportedModelError(f"{path}: checkpoint does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    head = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and not hasattr(head, "packed_params"):
        model.tie_weights()  # assign=True gave the aliases separate Parameter objects
    return model, _load_tokenizer(path)


def _refuse_dtype_change(path: Path, model: nn.Module, dtype: str) -> None:
    """A leanlm checkpoint keeps the dtypes it was saved in: its packed modules' kernels expect them."""
    stored = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype != "auto" and stored is not None and resolve_dtype(dtype, stored) != stored:
        raise UnsupportedModelError(
            f"{path} is a leanlm checkpoint saved in {str(stored).removeprefix('torch.')}, and its modules keep "
            f"the dtypes they were saved in, so --dtype {dtype} cannot apply; use --dtype auto, or run the "
            f"recipe again on the original model loaded with --dtype {dtype}")


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedModelError(f"{path / 'config.json'} is not valid JSON (line {err.lineno}): {err.msg}") from err


def _stored_dtype(config: dict) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _count_params(config: dict) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as err:
        raise UnsupportedModelError(f"transformers cannot build a causal LM from this config: {err}") from err
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
