"""compressed-tensors export (the format vLLM loads), written with the `compressed-tensors` package.

Each leanlm-quantized layer becomes a compressed-tensors scheme with its own numbers: int4 groups
as `pack-quantized` weights (int4 codes shifted to the signed range [-8, 7] the format uses),
int8 weight-only as int8 channel weights, W8A8 with dynamic per-token int8 input activations.
Layers of one format share a config group; float layers are listed under `ignore`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlm.core.conv1d import has_conv1d_layout
from leanlm.core.packed import is_runtime_module
from leanlm.errors import LeanLMError, UnsupportedModelError
from leanlm.export.hf_export import dequantize_model

log = logging.getLogger(__name__)


def _scheme_key(module: nn.Module) -> tuple:
    scheme = type(module).scheme
    if scheme == "int4_weight_only":
        symmetric = bool((module.zero == 8).all())
        return ("int4", module.group_size, symmetric, False)
    if scheme == "int8_weight_only":
        return ("int8", module.group_size, module.symmetric, False)
    if scheme == "w8a8_dynamic":
        return ("int8", None, True, True)
    raise UnsupportedModelError(f"no compressed-tensors scheme for leanlm's {scheme!r} layers; "
                                "`leanlm export --format hf` writes them as dense weights")


def _qparams(module: nn.Module, key: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [out, groups], signed zero point or None) in compressed-tensors' convention."""
    bits, _, symmetric, _ = key
    scale = module.scale.float().reshape(module.out_features, -1)
    if symmetric:
        return scale, None
    zero = module.zero.float()
    return scale, (zero - 8 if bits == "int4" else zero - 128)


def _scheme(names: list[str], key: tuple):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, group, symmetric, dynamic_acts = key
    weights = QuantizationArgs(num_bits=4 if bits == "int4" else 8, type="int", symmetric=symmetric,
                               strategy="group" if group else "channel", group_size=group)
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True) \
        if dynamic_acts else None
    return QuantizationScheme(targets=names, weights=weights, input_activations=acts)


def export_compressed_tensors(model: nn.Module, tokenizer: Any, out: Path) -> dict:
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationConfig,
            apply_quantization_config,
        )
    except ImportError as err:
        raise LeanLMError("compressed-tensors export needs the package: pip install 'leanlm[export]'") from err
    if has_conv1d_layout(model):
        raise UnsupportedModelError(f"{type(model).__name__} stores its linear layers as Conv1D, which vLLM transposes "
                                    "as it loads them: packed codes cannot take that; export --format hf instead")
    # an embedding reading a tied head's codes goes back to float (dequantize_model): not a quantized linear
    packed = {n: m for n, m in model.named_modules() if is_runtime_module(m) and not hasattr(m, "dequantized_module")}
    if not packed:
        raise LeanLMError("this model has no quantized layers; quantize it first (leanlm optimize --recipe w4-g64-gptq)"
                          " or export --format hf")
    groups: dict[tuple, list[str]] = {}
    params = {}
    for name, module in packed.items():
        key = _scheme_key(module)
        groups.setdefault(key, []).append(name)
        params[name] = _qparams(module, key)
    dequantize_model(model, warn_w8a8=False)  # compressed-tensors re-adds the activation quantization
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in packed]
    config = QuantizationConfig(config_groups={f"group_{i}": _scheme(names, key)
                                               for i, (key, names) in enumerate(groups.items())}, ignore=ignore)
    apply_quantization_config(model, config)
    for name, (scale, zero) in params.items():
        module = model.get_submodule(name)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if zero is not None:
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    compressor.update_config(str(out))
    if any(not key[2] for key in groups):
        log.warning("asymmetric int4 layers: vLLM loads them, but transformers %s cannot (packed zero points; "
                    "see vllm-project/llm-compressor#1618); quantize with symmetric: true for transformers",
                    _transformers_version())
    return {"config_groups": {f"group_{i}": len(n) for i, n in enumerate(groups.values())},
            "storage": getattr(compressor.quantization_config.format, "value", compressor.quantization_config.format)}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
