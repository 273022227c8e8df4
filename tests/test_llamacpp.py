"""GGUF exports run in llama.cpp itself (llama-cpp-python, an optional extra built from source)."""

import pytest
import torch

from leanlm.cli import main
from leanlm.core.evaluate import prepare_reference, score_windows
from leanlm.core.models import load_model, save_model
from leanlm.export import export
from leanlm.quantize import RTNConfig, quantize_

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'leanlm[llamacpp]' with the README's "
                        "CMAKE_ARGS); GGUF files are still checked through transformers' GGUF reader")
from leanlm.export.llamacpp import LlamaCppLM, bench_llamacpp  # noqa: E402

WINDOWS = torch.randint(3, 300, (3, 64), generator=torch.Generator().manual_seed(1))


def test_llama_cpp_reproduces_a_float_export(tiny_dir, tmp_path):
    export(tiny_dir, tmp_path / "f32.gguf", "gguf", weight_type="f32", embeddings="f32")
    ref = prepare_reference(load_model(tiny_dir, device="cpu"), WINDOWS)
    got = score_windows(LlamaCppLM(tmp_path / "f32.gguf"), WINDOWS, reference=ref)
    assert got["kld"] < 1e-3 and got["top1"] > 0.97


def test_llama_cpp_runs_our_int4_codes_as_q4_0(tiny_dir, tmp_path):
    m = load_model(tiny_dir, device="cpu")
    quantize_(m.model, RTNConfig(bits=4, group_size=32, symmetric=True))
    save_model(m.model, m.tokenizer, tmp_path / "q")
    ref = prepare_reference(load_model(tmp_path / "q", device="cpu"), WINDOWS)
    export(tmp_path / "q", tmp_path / "q4.gguf", "gguf", embeddings="f32")
    got = score_windows(LlamaCppLM(tmp_path / "q4.gguf"), WINDOWS, reference=ref)
    # what is left is llama.cpp rounding activations to 8 bits for its Q4_0 dot products
    assert got["kld"] < 5e-3


def test_bench_and_eval_in_llama_cpp(tiny_dir, tmp_path, capsys):
    export(tiny_dir, tmp_path / "m.gguf", "gguf", weight_type="q8_0")
    speed = bench_llamacpp(tmp_path / "m.gguf", prompt_tokens=32, decode_prompt_tokens=8, new_tokens=8, repeats=2)
    assert speed["runtime"] == "llama.cpp" and speed["decode_tps"] > 0 and speed["prefill_tps"] > 0
    assert main(["eval", str(tmp_path / "m.gguf"), "--runtime", "llama.cpp", "--reference", str(tiny_dir),
                 "--window", "64", "--json"]) == 0
    assert '"kld"' in capsys.readouterr().out


def test_llama_cpp_reads_our_k_quants_as_we_wrote_them(tokenizer, tmp_path):
    from tests.test_export import wide_tiny_dir

    source = wide_tiny_dir(tokenizer, tmp_path)
    export(source, tmp_path / "k.gguf", "gguf", weight_type="q4_k", embeddings="f32")
    # the reference is the same file dequantized by gguf's reader: any layout slip would show here
    ref = prepare_reference(load_model(tmp_path / "k.gguf", device="cpu"), WINDOWS)
    got = score_windows(LlamaCppLM(tmp_path / "k.gguf"), WINDOWS, reference=ref)
    assert got["kld"] < 5e-3
