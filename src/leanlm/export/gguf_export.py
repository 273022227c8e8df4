"""GGUF export for llama.cpp: Llama, Mistral, Qwen2, Qwen3 and Phi-3 models, float or quantized by leanlm.
(A head-pruned Qwen2 or Phi-3 is written as llama.cpp's Llama architecture, whose graph takes any head
size; Phi-3's fused projections are then split into Llama's.)

Tensor names come from the `gguf` package's own HF -> GGUF name map, hyperparameters from the
model config, and the tokenizer from the HF tokenizer files (gguf_vocab).
Llama 3's rope scaling is written as per-frequency factors (rope_freqs), computed by transformers'
own rope code so both runtimes rotate alike.

Layers leanlm has quantized are written from their integer codes without re-rounding (int8 -> Q8_0,
symmetric int4 -> Q4_0, asymmetric int4 -> Q4_1; groups must be multiples of 32). Float linear layers are
quantized to `weight_type` with gguf's quantizers, or, for the K-quants (q4_k, q6_k), with
kquant_ops, optionally weighted by an importance matrix (mean squared input activations per column,
as llama.cpp's imatrix). K-quants need rows that are a multiple of 256; other rows fall back to
Q5_0 (for q4_k) or Q8_0 (for q6_k), as llama.cpp's quantizer does, with a warning that counts them.
Norms stay float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from leanlm.core.packed import is_runtime_module
from leanlm.core.structure import is_linear, is_norm
from leanlm.errors import ConfigError, UnsupportedModelError
from leanlm.export import gguf_ops, kquant_ops
from leanlm.export.gguf_vocab import write_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What llama.cpp's graph for an architecture expects beyond the tensors themselves."""
    arch: gguf.MODEL_ARCH
    interleave_rope: bool  # llama.cpp's Llama rotates adjacent pairs, HF (and llama.cpp's Qwen) rotates halves
    rope_factors: bool  # the graph reads per-frequency factors (rope_freqs), so static rope scaling can be written
    split_fused: bool = False  # write fused qkv / gate_up projections as the graph's separate q, k, v / gate, up


ARCHITECTURES = {"llama": Target(gguf.MODEL_ARCH.LLAMA, True, True),
                 "mistral": Target(gguf.MODEL_ARCH.LLAMA, True, True),
                 "qwen2": Target(gguf.MODEL_ARCH.QWEN2, False, False),
                 "qwen3": Target(gguf.MODEL_ARCH.QWEN3, False, False),
                 "phi3": Target(gguf.MODEL_ARCH.PHI3, False, False)}
# rope types that only rescale frequencies, position-independently, which rope_freqs expresses exactly
FACTOR_ROPE = ("llama3", "linear")
WEIGHT_TYPES = {"auto": None, "f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q5_0": QT.Q5_0, "q4_0": QT.Q4_0,
                "q4_1": QT.Q4_1, "q4_k": QT.Q4_K, "q6_k": QT.Q6_K}
FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
              QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
              QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K}
K_QUANTS = {QT.Q4_K: (kquant_ops.quantize_q4_k, QT.Q5_0), QT.Q6_K: (kquant_ops.quantize_q6_k, QT.Q8_0)}


def export_gguf(model: nn.Module, tokenizer: Any, out: Path, weight_type: str = "auto",
                embeddings: str = "q8_0", importance: dict[str, torch.Tensor] | None = None) -> dict:
    """Write `model` as one GGUF file at `out`; returns what each tensor became, for the log.
    `importance` (layer name -> per-input-column weights) steers the K-quants' scale search."""
    config = model.config
    target = _target(config)
    refusals = {getattr(m, "gguf_refusal", None) for m in model.modules()} - {None}
    if refusals:  # a module that says llama.cpp cannot run it: refuse before writing anything
        raise UnsupportedModelError(f"GGUF export: {'; '.join(sorted(refusals))}")
    factors = _rope_factors(config, target)
    for name, choice in (("weight type", weight_type), ("embeddings type", embeddings)):
        if choice not in WEIGHT_TYPES or (name == "embeddings type" and choice == "auto"):
            raise ConfigError(f"unknown GGUF {name} {choice!r}; choose from {', '.join(WEIGHT_TYPES)}")
    if importance and WEIGHT_TYPES[weight_type] not in K_QUANTS:
        raise ConfigError(f"an importance matrix steers the K-quants only (q4_k, q6_k), not {weight_type!r}")
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[target.arch])
    _write_hparams(writer, config)
    write_tokenizer(writer, tokenizer, config.vocab_size)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors, raw_dtype=QT.F32)
    counts = _write_tensors(writer, model, target, WEIGHT_TYPES[weight_type], WEIGHT_TYPES[embeddings],
                            importance or {})
    main = max((t for t in counts if t not in ("F32",)), key=counts.get, default="F32")
    writer.add_file_type(FILE_TYPES.get(QT[main], gguf.LlamaFileType.GUESSED))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    return counts


def _target(config) -> Target:
    target = ARCHITECTURES.get(config.model_type)
    if target is None:
        raise UnsupportedModelError(f"GGUF export supports {sorted(ARCHITECTURES)} models, not "
                                    f"{config.model_type!r}; export --format hf and use llama.cpp's converter")
    if config.num_attention_heads * _head_dim(config) != config.hidden_size and target.arch in NARROW_HEADS:
        target = _narrow_heads_target(config)
    if _rope_params(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("GGUF export writes models that rotate whole heads, not a partial_rotary_factor")
    window = _sliding_window(config)
    if window:  # none of these llama.cpp graphs applies a window (a Phi-3 file's own window key is ignored)
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError(f"this {config.model_type} model uses sliding-window attention, which "
                                        "llama.cpp does not run for it; export --format hf instead")
        log.warning("this model attends over a sliding window of %d tokens, llama.cpp's %s graph over the whole "
                    "context: outputs differ once a context is longer than the window", window, config.model_type)
    return target


# llama.cpp graphs whose attention weights have the hidden size on both sides: they load only models
# with heads x head_dim = hidden_size, which head pruning breaks
NARROW_HEADS = (gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.PHI3)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _narrow_heads_target(config) -> Target:
    """Qwen2 and Phi-3 compute what llama.cpp's Llama graph computes (with biases, the rotary rows
    reordered, and Phi-3's fused projections split), and that graph takes any head size."""
    log.info("writing this %s model as llama.cpp's llama architecture: its %s graph needs heads x head_dim = "
             "hidden size (%d), and this model has %d x %d", config.model_type, config.model_type, config.hidden_size,
             config.num_attention_heads, _head_dim(config))
    return Target(gguf.MODEL_ARCH.LLAMA, True, True, split_fused=config.model_type == "phi3")


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and getattr(config, "use_sliding_window", True) is not False else None


def _rope_params(config) -> dict:
    return getattr(config, "rope_parameters", None) or {}


def _rope_theta(config) -> float:
    return float(_rope_params(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_factors(config, target: Target) -> np.ndarray | None:
    """llama.cpp divides each rotary frequency by its factor: the default frequencies over the scaled."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = _rope_params(config).get("rope_type", "default")
    if kind == "default":
        return None
    if kind not in FACTOR_ROPE or not target.rope_factors:
        supported = f"{', '.join(FACTOR_ROPE)} on Llama" if target.rope_factors else "none for this architecture"
        raise UnsupportedModelError(f"GGUF export cannot write {kind!r} rope scaling (supported: {supported}); "
                                    "export --format hf and use llama.cpp's converter")
    scaled, attention_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    if attention_factor != 1.0:
        raise UnsupportedModelError(f"{kind!r} rope scaling also scales attention ({attention_factor}); "
                                    "rope_freqs cannot express that")
    dim = scaled.numel() * 2
    default = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default / scaled).float().numpy()


def _write_hparams(writer: gguf.GGUFWriter, config) -> None:
    head_dim = _head_dim(config)
    # the directory's name, as llama.cpp's converter writes it (not a local path; llama.cpp matches on it)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "").name or "leanlm export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # head-pruned models: no longer hidden_size / heads
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _warn_fallbacks(linear_types: dict[str, int], weight_type) -> None:
    if weight_type in K_QUANTS:
        fallback = K_QUANTS[weight_type][1].name
        if linear_types.get(fallback):
            log.warning("%s needs rows that are a multiple of %d weights: %d linear layers were written as %s "
                        "instead (%d as %s)", weight_type.name, kquant_ops.QK_K, linear_types[fallback], fallback,
                        linear_types.get(weight_type.name, 0), weight_type.name)


def _write_tensors(writer: gguf.GGUFWriter, model: nn.Module, target: Target, weight_type, embed_type,
                   importance: dict[str, torch.Tensor]) -> dict[str, int]:
    config = model.config
    names = gguf.get_tensor_name_map(target.arch, config.num_hidden_layers)
    embed = model.get_input_embeddings()
    tied = getattr(config, "tie_word_embeddings", False)
    counts: dict[str, int] = {}
    linear_types: dict[str, int] = {}
    for hf_name, module in model.named_modules():
        if module is model.get_output_embeddings() and tied:
            continue
        if module is embed or module is model.get_output_embeddings():
            tensors = [("weight", *_float_tensor(module.weight, embed_type))]
        elif is_linear(module) or is_runtime_module(module):
            tensors = [("weight", *_linear_tensor(module, weight_type, hf_name, importance.get(hf_name)))]
            linear_types[tensors[0][2].name] = linear_types.get(tensors[0][2].name, 0) + 1
            if getattr(module, "bias", None) is not None:
                tensors.append(("bias", module.bias.detach().float().numpy(), QT.F32))
        elif is_norm(module):
            tensors = [(k, p.detach().float().numpy(), QT.F32) for k, p in module.named_parameters(recurse=False)]
        else:
            continue
        pieces = [(name, suffix, part, qtype) for suffix, data, qtype in tensors
                  for name, part in (_split_fused(hf_name, data, config) if target.split_fused else [(hf_name, data)])]
        for name, suffix, data, qtype in pieces:
            gguf_name = names.get_name(f"{name}.{suffix}", try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UnsupportedModelError(f"no GGUF tensor name for {name}.{suffix}")
            if target.interleave_rope:
                data = _rope_order(data, name, config)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
    _warn_fallbacks(linear_types, weight_type)
    return counts


@torch.no_grad()
def importance_matrix(model: nn.Module, calibration: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input column of every linear layer (llama.cpp's imatrix)."""
    from tqdm.auto import tqdm

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        for i in tqdm(range(0, len(calibration), batch_size), desc="importance matrix", unit="batch", leave=False):
            model(input_ids=calibration[i : i + batch_size], logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / rows[n] for n in sums}


def _split_fused(hf_name: str, data: np.ndarray, config) -> list[tuple[str, np.ndarray]]:
    """Phi-3's fused projections as Llama's separate ones, by rows (float or quantized blocks alike):
    qkv_proj is q, then k, then v; gate_up_proj is gate, then up."""
    parent, _, last = hf_name.rpartition(".")
    if last == "qkv_proj":
        q, kv = (n * _head_dim(config) for n in (config.num_attention_heads, config.num_key_value_heads))
        return [(f"{parent}.q_proj", data[:q]), (f"{parent}.k_proj", data[q:q + kv]), (f"{parent}.v_proj", data[q + kv:])]
    if last == "gate_up_proj":
        half = data.shape[0] // 2
        return [(f"{parent}.gate_proj", data[:half]), (f"{parent}.up_proj", data[half:])]
    return [(hf_name, data)]


def _rope_order(data: np.ndarray, hf_name: str, config) -> np.ndarray:
    last = hf_name.rsplit(".", 1)[-1]
    if last == "q_proj":
        return gguf_ops.interleave_rope_rows(data, config.num_attention_heads)
    if last == "k_proj":
        return gguf_ops.interleave_rope_rows(data, config.num_key_value_heads)
    return data


def _float_tensor(weight: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> tuple[np.ndarray, Any]:
    w = weight.detach().float()
    if qtype in K_QUANTS:
        quantize, fallback = K_QUANTS[qtype]
        if w.shape[-1] % kquant_ops.QK_K == 0:
            return quantize(w, importance), qtype
        qtype = fallback
    if qtype in (QT.Q8_0, QT.Q5_0, QT.Q4_0, QT.Q4_1) and w.shape[-1] % gguf_ops.BLOCK:
        log.warning("a %s tensor's rows (%d) are not a multiple of 32; writing it as F16", qtype.name, w.shape[-1])
        qtype = QT.F16
    if qtype == QT.F32:
        return w.numpy(), qtype
    if qtype == QT.F16:
        return w.half().numpy(), qtype
    return gguf.quants.quantize(w.numpy(), qtype), qtype


def _linear_tensor(module: nn.Module, weight_type, name: str,
                   importance: torch.Tensor | None = None) -> tuple[np.ndarray, Any]:
    """A leanlm-quantized layer from its codes when its format maps to a GGUF type; else requantized."""
    if hasattr(module, "quantized_codes"):
        blocks = gguf_ops.blocks_from_codes(module.quantized_codes())
        if blocks is not None and (weight_type is None or weight_type == QT[blocks[1]]):
            return blocks[0], QT[blocks[1]]
        target = QT.F16 if weight_type is None else weight_type
        log.warning("layer %s is re-rounded from its dequantized weights to %s", name, target.name)
        return _float_tensor(module.dequantized_weight(torch.float32), target, importance)
    # other runtime modules (2:4 compressed, activation-sparse) hold float weights in their own layout
    weight = module.dequantized_weight(torch.float32) if hasattr(module, "dequantized_weight") else module.weight
    return _float_tensor(weight, QT.F16 if weight_type is None else weight_type, importance)
