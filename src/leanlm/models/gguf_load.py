"""Load a GGUF file as a float32 HF model through transformers' GGUF loader, refusing what it would
silently get wrong (rope scaling factors it drops, tensors its model has no place for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlm.errors import UnsupportedModelError


def load_gguf(path: Path) -> tuple[nn.Module, Any]:
    """Dequantize a GGUF file to a float32 HF model, checked against what transformers supports."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(path)
    _refuse_dropped_rope_factors(path)
    kwargs = dict(gguf_file=path.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as err:
        supported = ", ".join(sorted(_gguf_supported_architectures())) or "see transformers' GGUF docs"
        raise UnsupportedModelError(
            f"{path}: transformers' GGUF loader cannot load this file (architecture {arch!r}): {err}\n"
            f"Architectures it supports: {supported}. Load the model's Hugging Face directory instead, or run the file "
            "in llama.cpp (--runtime llama.cpp)."
        ) from err
    _refuse_dropped_tensors(path, model)
    return _drop_gguf_quantizer(model), tokenizer


def gguf_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as err:  # the reader raises bare ValueErrors/struct errors on junk
        raise UnsupportedModelError(f"{path} is not a readable GGUF file: {err}") from err


def _refuse_dropped_rope_factors(path: Path) -> None:
    """transformers' GGUF loader drops per-frequency rope factors (Llama 3's rope scaling) without a word,
    which would rotate positions unlike the file's own model."""
    names = {t.name for t in gguf_reader(path).tensors}
    dropped = sorted(names & {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
    if dropped:
        raise UnsupportedModelError(
            f"{path} carries rope scaling factors ({', '.join(dropped)}) that transformers' GGUF loader ignores, "
            "so the loaded model would not be this file's model. Load the model's Hugging Face directory instead, "
            "or run the file in llama.cpp (--runtime llama.cpp).")


def _refuse_dropped_tensors(path: Path, model: nn.Module) -> None:
    """transformers' GGUF loader builds the model its config keys describe and drops file tensors that model
    has no place for (attention biases in a llama-architecture file) without a word; count the weights."""
    tensors = gguf_reader(path).tensors
    in_file, loaded = sum(int(t.n_elements) for t in tensors), sum(p.numel() for p in model.parameters())
    if in_file != loaded:
        biases = [t.name for t in tensors if t.name.endswith(".bias")][:3]
        hint = f" (the file has bias tensors such as {', '.join(biases)})" if biases else ""
        raise UnsupportedModelError(
            f"{path} holds {in_file:,} weights but transformers' GGUF loader built a model of {loaded:,}{hint}, so the "
            "loaded model would not be this file's model. Load the model's Hugging Face directory instead, or run the "
            "file in llama.cpp (--runtime llama.cpp).")


def gguf_architecture(path: Path) -> str:
    reader = gguf_reader(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UnsupportedModelError(f"{path}: GGUF has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode()


def _drop_gguf_quantizer(model: nn.Module) -> nn.Module:
    """The GGUF loader leaves a quantizer attached that forbids saving; the weights are plain floats."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(model.config).from_dict(cfg)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.generation_config = model.generation_config
    return clean


def gguf_params(path: Path) -> int:
    return sum(int(t.n_elements) for t in gguf_reader(path).tensors)


def _gguf_supported_architectures() -> set[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            GGUF_SUPPORTED_ARCHITECTURES,
        )
    except ImportError:
        return set()
    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata sections, not architectures
