"""GGUF exports run in llama.cpp itself (llama-cpp-python, an optional extra built from source)."""

import pytest
import torch

from leanlm.cli import main
from leanlm.export import export
from leanlm.export.gguf_vocab import SPLIT_RULES
from leanlm.measure.evaluate import prepare_reference, score_windows
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.quantize import RTNConfig, quantize_

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'leanlm[llamacpp]' with the README's "
                        "CMAKE_ARGS); GGUF files are still checked through transformers' GGUF reader")
from leanlm.errors import LeanLMError  # noqa: E402
from leanlm.runtime.llamacpp import LlamaCppLM, bench_llamacpp, check_llama_cpp_runs  # noqa: E402

try:
    check_llama_cpp_runs()
except LeanLMError as err:  # a build for another CPU: say so and skip rather than crash the test run
    pytest.skip(str(err), allow_module_level=True)

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


def test_timing_reads_the_same_last_logits_without_computing_the_others(tiny_dir, tmp_path):
    export(tiny_dir, tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    ids = WINDOWS[0].tolist()
    every = LlamaCppLM(tmp_path / "m.gguf")(input_ids=WINDOWS[:1]).logits[0, -1]
    lean = LlamaCppLM(tmp_path / "m.gguf", logits_all=False)
    lean.llm.eval(ids)
    torch.testing.assert_close(torch.from_numpy(lean.last_logits().copy()), every, atol=1e-4, rtol=1e-4)


def test_llama_cpp_reads_our_k_quants_as_we_wrote_them(tokenizer, tmp_path):
    from tests.test_export import wide_tiny_dir

    source = wide_tiny_dir(tokenizer, tmp_path)
    export(source, tmp_path / "k.gguf", "gguf", weight_type="q4_k", embeddings="f32")
    # the reference is the same file dequantized by gguf's reader: any layout slip would show here
    ref = prepare_reference(load_model(tmp_path / "k.gguf", device="cpu"), WINDOWS)
    got = score_windows(LlamaCppLM(tmp_path / "k.gguf"), WINDOWS, reference=ref)
    assert got["kld"] < 5e-3


def _random_model(model_type: str, vocab_size: int, **extra):
    """A tiny model whose attention is sharp enough that any rotary or head-layout slip shows in its output."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=True, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.data.normal_(0.1, 0.5)  # biases and norm weights that are neither zero nor one
        else:
            p.data.mul_(10 if name.endswith(("q_proj.weight", "k_proj.weight")) else 3)
    return model


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {}),
    ("qwen3", {"head_dim": 24}),
    ("phi3", {"pad_token_id": 0}),  # fused qkv and gate/up, which llama.cpp splits as HF does
    ("llama", {"attention_bias": True}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
], ids=["qwen2", "qwen3-head-dim", "phi3", "llama-bias", "llama3-rope", "linear-rope"])
def test_llama_cpp_reproduces_each_architecture(tokenizer, tmp_path, model_type, extra):
    # a rotary layout written in the wrong order or rope factors left out give KLD ~1e-3 and top-1 < 0.95 here
    _random_model(model_type, len(tokenizer), **extra).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    windows = torch.randint(3, 300, (2, 128), generator=torch.Generator().manual_seed(1))
    ref = prepare_reference(load_model(tmp_path / "m", device="cpu"), windows)
    got = score_windows(LlamaCppLM(tmp_path / "m.gguf"), windows, reference=ref)
    assert got["kld"] < 1e-5 and got["top1"] > 0.99


@pytest.mark.parametrize("model_type,extra", [("qwen2", {}), ("qwen3", {"head_dim": 16}), ("phi3", {"pad_token_id": 0})])
def test_llama_cpp_runs_head_pruned_models(tokenizer, tmp_path, model_type, extra):
    """After head pruning, heads x head_dim < hidden size: llama.cpp's qwen2 and phi3 graphs cannot load
    that, so those are written for its Llama graph (Phi-3's fused qkv and gate/up split into Llama's)."""
    from leanlm.prune import HeadsConfig, prune_

    model = _random_model(model_type, len(tokenizer), **extra)
    calibration = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(2))
    prune_(model, HeadsConfig(kv_groups=1), calibration=calibration)
    save_model(model, tokenizer, tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    arch = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False).metadata
    assert arch["general.architecture"] == ("qwen3" if model_type == "qwen3" else "llama")
    windows = torch.randint(3, 300, (2, 128), generator=torch.Generator().manual_seed(1))
    ref = prepare_reference(load_model(tmp_path / "m", device="cpu"), windows)
    got = score_windows(LlamaCppLM(tmp_path / "m.gguf"), windows, reference=ref)
    assert got["kld"] < 1e-5 and got["top1"] > 0.99


TRICKY = ["The object's __dict__ attribute is a mapping.", "I'll pay 1234567 dollars, won't you?\n\n  x = 3.14159  # it's\tDONE'S",
          "def f(a, b):\n    return a**2 + 10000*b\r\n", "Ünïcödé naïve café 東京 2024年",
          "   leading spaces and trailing   ", "HELLO'LL 'S 99bottles\n\n\n"]


def tokenizer_in_llama_cpp(tok, tmp_path):
    """llama.cpp's reading of `tok` as leanlm's GGUF export writes it."""
    from tests.conftest import tiny_llama

    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    return lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)


@pytest.mark.parametrize("split", [None, *SPLIT_RULES], ids=["gpt-2", *SPLIT_RULES.values()])
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(tmp_path, split):
    # named gpt-2, the llama-bpe and qwen2 tokenizers split these texts differently in llama.cpp
    from tests.conftest import build_tokenizer

    tok = build_tokenizer(600, split)
    tokenize = tokenizer_in_llama_cpp(tok, tmp_path)
    for text in TRICKY:
        assert tokenize(text) == tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("metaspace", [False, True], ids=["normalizer-prefix", "metaspace-prefix"])
def test_llama_cpp_tokenizes_like_a_sentencepiece_style_tokenizer(tmp_path, metaspace):
    # with every piece scored alike (as gguf's own LlamaHfVocab writes them) 3 of these texts split differently
    from tests.conftest import build_spm_tokenizer

    tok = build_spm_tokenizer(600, metaspace)
    tokenize = tokenizer_in_llama_cpp(tok, tmp_path)
    for text in TRICKY + [" x"]:
        # HF's Metaspace puts no "▁" before text that starts with a space, llama.cpp does (the export warns)
        assert (tokenize(text) == tok.encode(text, add_special_tokens=False)) != (metaspace and text[0] == " "), text
    bos = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    assert bos.tokenize(b"Hello there", add_bos=True) == tok("Hello there")["input_ids"]  # BOS as HF adds it
