"""GGUF export for llama.cpp: Llama-architecture models, float or quantized by leanlm.

Tensor names come from the `gguf` package's own HF -> GGUF name map, hyperparameters from the
model config, and the tokenizer (byte-level BPE) from the HF tokenizer files. Layers leanlm has
quantized are written from their integer codes without re-rounding (int8 -> Q8_0, symmetric
int4 -> Q4_0, asymmetric int4 -> Q4_1; groups must be multiples of 32). Float linear layers are
quantized to `weight_type` with gguf's quantizers; norms stay float32.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from leanlm.core.models import QUANTIZED_MODULES
from leanlm.core.structure import is_linear, is_norm
from leanlm.errors import ConfigError, UnsupportedModelError
from leanlm.export import gguf_ops

log = logging.getLogger(__name__)
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
WEIGHT_TYPES = {"auto": None, "f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
              QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}


def export_gguf(model: nn.Module, tokenizer: Any, out: Path, weight_type: str = "auto",
                embeddings: str = "q8_0") -> dict:
    """Write `model` as one GGUF file at `out`; returns what each tensor became, for the log."""
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UnsupportedModelError(f"GGUF export supports {sorted(ARCHITECTURES)} models, not "
                                    f"{config.model_type!r}; export --format hf and use llama.cpp's converter")
    for name, choice in (("weight type", weight_type), ("embeddings type", embeddings)):
        if choice not in WEIGHT_TYPES or (name == "embeddings type" and choice == "auto"):
            raise ConfigError(f"unknown GGUF {name} {choice!r}; choose from {', '.join(WEIGHT_TYPES)}")
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _write_hparams(writer, config)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    counts = _write_tensors(writer, model, arch, WEIGHT_TYPES[weight_type], WEIGHT_TYPES[embeddings])
    main = max((t for t in counts if t not in ("F32",)), key=counts.get, default="F32")
    writer.add_file_type(FILE_TYPES.get(QT[main], gguf.LlamaFileType.GUESSED))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return counts


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"GGUF export does not write rope scaling ({params.get('rope_type')!r}) yet")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_hparams(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or "leanlm export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the split rules: plain GPT-2 byte-level, or digits split one by one first."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if "ByteLevel" not in kinds:
        raise UnsupportedModelError(f"GGUF export writes byte-level BPE tokenizers; this one pre-tokenizes with {kinds}")
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    return "smollm" if digits else "gpt-2"


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        if spec.get("model", {}).get("type") != "BPE":
            raise UnsupportedModelError("GGUF export writes BPE tokenizers (gpt2 style) only")
        tokens, types = _vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_add_bos_token(False)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            special = i in added and getattr(added[i], "special", False)
            types.append(gguf.TokenType.CONTROL if special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types


def _write_tensors(writer: gguf.GGUFWriter, model: nn.Module, arch, weight_type, embed_type) -> dict[str, int]:
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    embed = model.get_input_embeddings()
    tied = getattr(config, "tie_word_embeddings", False)
    counts: dict[str, int] = {}
    for hf_name, module in model.named_modules():
        if module is model.get_output_embeddings() and tied:
            continue
        if module is embed or module is model.get_output_embeddings():
            tensors = [("weight", *_float_tensor(module.weight, embed_type))]
        elif is_linear(module) or type(module) in QUANTIZED_MODULES.values():
            tensors = [("weight", *_linear_tensor(module, weight_type, hf_name))]
        elif is_norm(module):
            tensors = [(k, p.detach().float().numpy(), QT.F32) for k, p in module.named_parameters(recurse=False)]
        else:
            continue
        for suffix, data, qtype in tensors:
            gguf_name = names.get_name(f"{hf_name}.{suffix}", try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UnsupportedModelError(f"no GGUF tensor name for {hf_name}.{suffix}")
            data = _rope_order(data, hf_name, config)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def _rope_order(data: np.ndarray, hf_name: str, config) -> np.ndarray:
    last = hf_name.rsplit(".", 1)[-1]
    if last == "q_proj":
        return gguf_ops.interleave_rope_rows(data, config.num_attention_heads)
    if last == "k_proj":
        return gguf_ops.interleave_rope_rows(data, config.num_key_value_heads)
    return data


def _float_tensor(weight: torch.Tensor, qtype) -> tuple[np.ndarray, Any]:
    w = weight.detach().float()
    if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1) and w.shape[-1] % gguf_ops.BLOCK:
        log.warning("a %s tensor's rows (%d) are not a multiple of 32; writing it as F16", qtype.name, w.shape[-1])
        qtype = QT.F16
    if qtype == QT.F32:
        return w.numpy(), qtype
    if qtype == QT.F16:
        return w.half().numpy(), qtype
    return gguf.quants.quantize(w.numpy(), qtype), qtype


def _linear_tensor(module: nn.Module, weight_type, name: str) -> tuple[np.ndarray, Any]:
    """A leanlm-quantized layer from its codes when its format maps to a GGUF type; else requantized."""
    if hasattr(module, "gguf_blocks"):
        blocks = module.gguf_blocks()
        if blocks is not None and (weight_type is None or weight_type == QT[blocks[1]]):
            return blocks[0], QT[blocks[1]]
        target = QT.F16 if weight_type is None else weight_type
        log.warning("layer %s is re-rounded from its dequantized weights to %s", name, target.name)
        return _float_tensor(module.dequantized_weight(torch.float32), target)
    return _float_tensor(module.weight, QT.F16 if weight_type is None else weight_type)
