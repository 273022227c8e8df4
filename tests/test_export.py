import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from leanlm.errors import ConfigError, OutputExistsError, UnsupportedModelError
from leanlm.export import export, gguf_ops
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.quantize import RTNConfig, quantize_, rtn_ops

IDS = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def quantized_checkpoint(tiny_dir, tmp_path, config) -> tuple[Path, torch.Tensor]:
    m = load_model(tiny_dir, device="cpu")
    quantize_(m.model, config)
    save_model(m.model, m.tokenizer, tmp_path / "q")
    return tmp_path / "q", logits(m.model)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_gguf_blocks_decode_to_our_weights(kind):
    torch.manual_seed(0)
    w = torch.randn(6, 128)
    bits, group, sym = {"q8_0": (8, None, True), "q4_0": (4, 32, True), "q4_1": (4, 64, False)}[kind]
    codes, scale, zero = rtn_ops.rtn(w, bits, group, sym)
    scale = scale.half().float()
    blocks = {"q8_0": lambda: gguf_ops.q8_0(codes, scale), "q4_0": lambda: gguf_ops.q4_0(codes, scale),
              "q4_1": lambda: gguf_ops.q4_1(codes, scale, zero)}[kind]()
    got = gguf_dequantize(blocks, gguf.GGMLQuantizationType[kind.upper()])
    want = rtn_ops.dequantize(codes, scale, zero, group).numpy()
    np.testing.assert_allclose(got, want, atol=2e-3 if kind == "q4_1" else 0)  # Q4_1 stores -scale*zero in fp16


def test_rope_rows_are_a_permutation_per_head():
    rows = np.arange(2 * 8)[:, None]
    out = gguf_ops.interleave_rope_rows(rows, heads=2)[:, 0]
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_gguf_float_round_trip(tiny_dir, tmp_path):
    info = export(tiny_dir, tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    assert info["tensor_types"] == {"F32": 20}
    back = load_model(tmp_path / "m.gguf", device="cpu")
    torch.testing.assert_close(logits(back.model), logits(load_model(tiny_dir, device="cpu").model), atol=1e-4, rtol=1e-4)
    text = back.tokenizer.decode(back.tokenizer("def main():").input_ids)
    assert text == "def main():"


@pytest.mark.parametrize("config,gguf_type", [(RTNConfig(bits=8), "Q8_0"),
                                              (RTNConfig(bits=4, group_size=32, symmetric=True), "Q4_0"),
                                              (RTNConfig(bits=4, group_size=64, symmetric=False), "Q4_1")])
def test_gguf_keeps_our_codes(tiny_dir, tmp_path, config, gguf_type):
    path, want = quantized_checkpoint(tiny_dir, tmp_path, config)
    info = export(path, tmp_path / "m.gguf", "gguf", embeddings="f32")
    assert info["tensor_types"][gguf_type] == 14
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.0.attn_q")} == {gguf_type}
    back = load_model(tmp_path / "m.gguf", device="cpu")
    # our int4 runtime multiplies in bfloat16 for short inputs; the GGUF loader dequantizes to float32
    torch.testing.assert_close(logits(back.model), want, atol=2e-2, rtol=0)


def test_gguf_bad_inputs(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="ending in .gguf"):
        export(tiny_dir, tmp_path / "m.bin", "gguf")
    with pytest.raises(ConfigError, match="unknown export format 'onnx'; formats: hf, compressed-tensors, gguf"):
        export(tiny_dir, tmp_path / "x", "onnx")
    (tmp_path / "m.gguf").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(tiny_dir, tmp_path / "m.gguf", "gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"keep me"


def _tiny_config(model_type: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, **extra)


@pytest.mark.parametrize("model_type,extra", [("qwen2", {}), ("qwen3", {"head_dim": 128})])
def test_gguf_round_trip_of_qwen_models(tokenizer, tmp_path, model_type, extra):
    # transformers' qwen3 GGUF reader assumes 128-wide heads; llama.cpp reads any (tested there)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type, **extra)).eval()
    for p in model.parameters():
        if p.ndim == 1:
            p.data.normal_(0.1, 0.5)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32", embeddings="f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == model_type
    assert ("blk.0.attn_q.bias" in {t.name for t in reader.tensors}) == (model_type == "qwen2")
    torch.testing.assert_close(logits(load_model(tmp_path / "m.gguf", device="cpu").model), logits(model),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type,extra,match", [
    ("gpt_neox", {}, r"GGUF export supports .*qwen3.* not 'gpt_neox'"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "sliding-window"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                   "original_max_position_embeddings": 64}}, "cannot write 'yarn' rope scaling"),
    ("qwen2", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "none for this architecture"),
])
def test_gguf_refuses_what_llama_cpp_would_run_differently(tmp_path, model_type, extra, match):
    from transformers import AutoModelForCausalLM

    from leanlm.export.gguf_export import export_gguf

    model = AutoModelForCausalLM.from_config(_tiny_config(model_type, **extra))
    with pytest.raises(UnsupportedModelError, match=match):
        export_gguf(model, None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_llama3_rope_is_written_as_factors_that_transformers_would_drop(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    AutoModelForCausalLM.from_config(_tiny_config("llama", rope_parameters=rope)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32")
    factors = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "rope_freqs.weight")
    # high frequencies keep their speed, the lowest are slowed by the full factor, the middle in between
    assert factors.data[0] == 1.0 and factors.data[-1] == pytest.approx(8.0) and len(factors.data) == 8
    with pytest.raises(UnsupportedModelError, match="rope scaling factors .*rope_freqs.*--runtime llama.cpp"):
        load_model(tmp_path / "m.gguf", device="cpu")


def test_a_gguf_whose_tensors_transformers_would_drop_is_refused(tokenizer, tmp_path):
    # transformers reads a llama-architecture file without attention biases: it would drop blk.*.attn_q.bias
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_tiny_config("llama", attention_bias=True))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32")
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    in_file = sum(p.numel() for p in model.parameters())
    with pytest.raises(UnsupportedModelError, match=f"holds {in_file:,} weights but .* built a model of "
                                                    f"{in_file - biases:,} .*attn_q.bias.*--runtime llama.cpp"):
        load_model(tmp_path / "m.gguf", device="cpu")


def test_a_sliding_window_llama_cpp_would_not_apply_is_a_warning(tokenizer, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(_tiny_config("phi3", sliding_window=16, pad_token_id=0)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32")
    assert "sliding window of 16 tokens" in caplog.text and (tmp_path / "m.gguf").exists()


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
RAW_BYTES = {**BYTES, "use_regex": False}


def test_pre_tokenizers_are_named_for_llama_cpp_or_refused():
    from leanlm.export.gguf_vocab import SPLIT_RULES, _pre_tokenizer

    def name(*parts, normalizer=None):
        return _pre_tokenizer({"normalizer": normalizer, "pre_tokenizer": {"type": "Sequence", "pretokenizers": parts}})

    assert _pre_tokenizer({"pre_tokenizer": BYTES}) == "gpt-2"
    assert name({"type": "Digits", "individual_digits": True}, BYTES) == "smollm"
    for regex, expected in SPLIT_RULES.items():
        assert name(_split(regex), RAW_BYTES, normalizer={"type": "NFC"}) == expected
    llama3 = next(r for r, n in SPLIT_RULES.items() if n == "llama-bpe")
    for parts, match in [((_split(llama3.replace("{1,3}", "{1,4}")), RAW_BYTES), "split rules"),
                         ((_split(llama3), BYTES), "split rules"),  # the byte-level regex would split again
                         (({"type": "Digits", "individual_digits": False}, BYTES), "split rules"),
                         (({**BYTES, "add_prefix_space": True},), "prefix space"),
                         (({"type": "Metaspace", "replacement": "_"},), "byte-level BPE")]:
        with pytest.raises(UnsupportedModelError, match=match):
            name(*parts)
    with pytest.raises(UnsupportedModelError, match="NFKC normalizer"):
        name(BYTES, normalizer={"type": "NFKC"})


def test_hf_export_of_a_quantized_model_loads_in_transformers(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path, want = quantized_checkpoint(tiny_dir, tmp_path, RTNConfig(bits=8))
    export(path, tmp_path / "hf", "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(logits(plain), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("config", [RTNConfig(bits=4, group_size=32, symmetric=True), RTNConfig(bits=8)])
def test_compressed_tensors_round_trip_in_transformers(tiny_dir, tmp_path, config):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors export needs pip install 'leanlm[export]'")
    from transformers import AutoModelForCausalLM

    path, want = quantized_checkpoint(tiny_dir, tmp_path, config)
    export(path, tmp_path / "ct", "compressed-tensors")
    qc = __import__("json").loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    assert qc["format"] == "pack-quantized"  # weight-only int4 and int8 alike
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(logits(loaded), want, atol=2e-2, rtol=0)
    out = loaded.generate(IDS[:, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_compressed_tensors_refuses_a_float_model(tiny_dir, tmp_path):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors export needs pip install 'leanlm[export]'")
    from leanlm.errors import LeanLMError

    with pytest.raises(LeanLMError, match="no quantized layers"):
        export(tiny_dir, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_export_cli(tiny_dir, tmp_path, capsys):
    from leanlm.cli import main

    assert main(["export", str(tiny_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--gguf-type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(tiny_dir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir), "--runtime", "llama.cpp"]) == 2
    assert "runs .gguf files; export first" in capsys.readouterr().err


def test_w8a8_exports_as_int_quantized_with_dynamic_activations(tiny_dir, tmp_path):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors export needs pip install 'leanlm[export]'")
    import json

    from transformers import AutoModelForCausalLM

    from leanlm.quantize import SmoothQuantConfig

    m = load_model(tiny_dir, device="cpu")
    quantize_(m.model, SmoothQuantConfig(search_samples=2, batch_size=2, grid=3),
              calibration=torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0)))
    save_model(m.model, m.tokenizer, tmp_path / "sq")
    info = export(tmp_path / "sq", tmp_path / "ct", "compressed-tensors")
    assert info["storage"] == "int-quantized"
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == "token"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(logits(loaded), logits(m.model), atol=3e-2, rtol=0)


def _rel_error(w: torch.Tensor, blocks: np.ndarray, qtype, weights: torch.Tensor | None = None) -> float:
    got = torch.from_numpy(gguf_dequantize(blocks, qtype)).reshape(w.shape)
    weights = torch.ones_like(w) if weights is None else weights.expand_as(w)
    return float((weights * (got - w) ** 2).sum() / (weights * w**2).sum())


def test_k_quants_decode_with_ggufs_reader_and_beat_the_32_weight_blocks():
    from leanlm.export import kquant_ops

    QT = gguf.GGMLQuantizationType
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    q4k = _rel_error(w, kquant_ops.quantize_q4_k(w), QT.Q4_K)
    q6k = _rel_error(w, kquant_ops.quantize_q6_k(w), QT.Q6_K)
    # Q4_K (4.5 bits/weight) does at least as well as Q4_1 (5.0); Q6_K (6.56) better than Q5_0 (5.5)
    assert q4k <= _rel_error(w, gguf.quants.quantize(w.numpy(), QT.Q4_1), QT.Q4_1)
    assert q6k < 0.5 * _rel_error(w, gguf.quants.quantize(w.numpy(), QT.Q5_0), QT.Q5_0)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) ** 4  # a few columns matter
    for quantize, qtype in ((kquant_ops.quantize_q4_k, QT.Q4_K), (kquant_ops.quantize_q6_k, QT.Q6_K)):
        assert _rel_error(w, quantize(w, imp), qtype, imp) < _rel_error(w, quantize(w), qtype, imp)


def wide_tiny_dir(tokenizer, tmp_path) -> Path:
    from tests.conftest import tiny_llama

    model = tiny_llama(len(tokenizer), hidden=256)  # q/k/v/o/gate/up rows of 256 weights; down of 128
    model.save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    return tmp_path / "wide"


def test_k_quant_export_falls_back_on_narrow_rows_and_loads(tokenizer, tmp_path, caplog):
    from leanlm.measure.evaluate import prepare_reference, score_windows

    source = wide_tiny_dir(tokenizer, tmp_path)
    info = export(source, tmp_path / "k.gguf", "gguf", weight_type="q4_k", imatrix_samples=2)
    assert info["tensor_types"]["Q4_K"] == 12 and info["tensor_types"]["Q5_0"] == 2
    assert "2 linear layers were written as Q5_0" in caplog.text
    windows = torch.randint(3, 300, (2, 64), generator=torch.Generator().manual_seed(2))
    ref = prepare_reference(load_model(source, device="cpu"), windows)
    got = score_windows(load_model(tmp_path / "k.gguf", device="cpu").model, windows, reference=ref)
    assert got["kld"] < 0.02
    with pytest.raises(ConfigError, match="importance matrix is used by the GGUF K-quants only"):
        export(source, tmp_path / "x.gguf", "gguf", weight_type="q8_0", imatrix_samples=2)


def test_sentencepiece_style_space_prefix_is_read_or_refused():
    from leanlm.export.gguf_vocab import _space_prefix

    prepend, replace = {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    assert _space_prefix({"normalizer": {"type": "Sequence", "normalizers": [prepend, replace]}}) is True
    assert _space_prefix({"normalizer": {"type": "Sequence", "normalizers": [replace]}}) is False
    assert _space_prefix({"pre_tokenizer": metaspace}) is True
    assert _space_prefix({"pre_tokenizer": {**metaspace, "prepend_scheme": "never"}}) is False
    for spec in ({"pre_tokenizer": {**metaspace, "split": True}},  # splits words apart: llama.cpp's SPM does not
                 {"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, prepend, replace]}}):
        with pytest.raises(UnsupportedModelError, match="cannot write this SentencePiece-style tokenizer"):
            _space_prefix(spec)


def test_sentencepiece_style_tokenizer_is_written_as_llama_cpp_s_llama_model(tmp_path):
    from tests.conftest import build_spm_tokenizer, tiny_llama

    tok = build_spm_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "m.gguf", "gguf", weight_type="f32")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields

    def value(key):
        field = fields[key]
        return [field.contents(i) for i in range(len(field.data))] if len(field.data) > 1 else field.contents()

    assert value("tokenizer.ggml.model") == "llama" and value("tokenizer.ggml.add_space_prefix") is True
    tokens, scores, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores"), value("tokenizer.ggml.token_type")
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE and types[tokens.index("<unk>")] == gguf.TokenType.UNKNOWN
    merges = json.loads((tmp_path / "m" / "tokenizer.json").read_text())["model"]["merges"]
    pieces = ["".join(m.split(" ", 1) if isinstance(m, str) else m) for m in merges[:3]]
    assert [scores[tokens.index(p)] for p in pieces] == [0.0, -1.0, -2.0]  # minus the merge's rank
