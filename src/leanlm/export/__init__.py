"""`export(model, out, format)`: write a model (float or leanlm-quantized) for another runtime.

Formats: `hf` (plain transformers weights, dequantized), `compressed-tensors` (vLLM),
`gguf` (llama.cpp). The output is assembled in a temporary place and moved into position only
when complete; an existing output is never replaced without `overwrite`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from leanlm.core.paths import atomic_dir, atomic_file, check_output, dir_size
from leanlm.errors import ConfigError, UnsupportedModelError
from leanlm.models.load import load_model

log = logging.getLogger(__name__)
FORMATS = ("hf", "compressed-tensors", "gguf")


def export(model: str | Path, out: str | Path, format: str = "hf", overwrite: bool = False,
           weight_type: str = "auto", embeddings: str = "q8_0", imatrix_samples: int = 0,
           imatrix_data: str | Path | None = None) -> dict:
    """Export `model` to `out`; for gguf, `weight_type` (auto, f16, q8_0, q5_0, q4_0, q4_1, q4_k, q6_k) sets
    the float linear layers' type and `embeddings` the token embeddings' (auto keeps quantized layers as
    they are). `imatrix_samples` > 0 weights the K-quants by an importance matrix measured on that many
    512-token samples of `imatrix_data`'s train split (default: the built-in corpus)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    if imatrix_samples and (format != "gguf" or weight_type not in ("q4_k", "q6_k")):
        raise ConfigError("an importance matrix is used by the GGUF K-quants only: --format gguf --gguf-type q4_k|q6_k")
    out = check_output(out, overwrite)
    if format == "gguf" and out.suffix != ".gguf":
        raise ConfigError(f"a GGUF export is one file ending in .gguf, got {out}")
    start = time.perf_counter()
    loaded = load_model(model, device="cpu")
    check_exportable(loaded.model)
    if format == "gguf":
        from leanlm.export.gguf_export import export_gguf

        importance = _importance(loaded, imatrix_samples, imatrix_data) if imatrix_samples else None
        with atomic_file(out) as tmp:
            info = {"tensor_types": export_gguf(loaded.model, loaded.tokenizer, tmp, weight_type, embeddings,
                                                importance)}
    else:
        with atomic_dir(out, overwrite) as tmp:
            info = _export_dir(loaded, tmp, format)
            (tmp / "leanlm-export.json").write_text(json.dumps({"source": str(model), "format": format, **info},
                                                               indent=2))
    info.update(format=format, out=str(out), bytes=dir_size(out), source_bytes=loaded.disk_bytes,
                seconds=time.perf_counter() - start)
    return info


def _importance(loaded, samples: int, data: str | Path | None) -> dict:
    from leanlm.data.corpus import calibration_samples, load_corpus
    from leanlm.export.gguf_export import importance_matrix

    calibration = calibration_samples(loaded.tokenizer, load_corpus(data, loaded.tokenizer).train, samples, 512)
    return importance_matrix(loaded.model, calibration)


def check_exportable(model) -> None:
    """Refuse modules no other runtime has an equivalent of (e.g. MoE-fied FFNs), naming them."""
    from leanlm.core.packed import is_runtime_module

    refusals = [(n, m.export_refusal) for n, m in model.named_modules() if hasattr(m, "export_refusal")]
    if refusals:
        raise UnsupportedModelError(f"{len(refusals)} modules (e.g. {refusals[0][0]}) cannot be exported: {refusals[0][1]}")
    odd = [n for n, m in model.named_modules()
           if is_runtime_module(m) and not hasattr(m, "dequantized_weight") and not hasattr(m, "dequantized_module")]
    if odd:
        raise UnsupportedModelError(f"{len(odd)} modules (e.g. {odd[0]}, {type(model.get_submodule(odd[0])).__name__}) "
                                    "have no dense equivalent in other runtimes: a MoE-fied model runs in leanlm only")
    sparse = [n for n, m in model.named_modules() if getattr(type(m), "scheme", None) == "act_sparse"]
    if sparse:
        log.warning("%d layers lose their activation sparsity in the export (the thresholds are leanlm's runtime)",
                    len(sparse))


def _export_dir(loaded, tmp: Path, format: str) -> dict:
    if format == "hf":
        from leanlm.export.hf_export import export_hf

        return export_hf(loaded.model, loaded.tokenizer, tmp)
    from leanlm.export.compressed_tensors_export import export_compressed_tensors

    return export_compressed_tensors(loaded.model, loaded.tokenizer, tmp)
