import pytest
import torch
from torch import nn

from leanlm.errors import ConfigError
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.quantize import RTNConfig, quantize_, rtn_ops
from leanlm.quantize.int8_linear import Int8Linear
from leanlm.runtime.generate import generate


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_rtn_error_is_within_half_a_step(symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    codes, scale, zero = rtn_ops.rtn(w, 8, group_size, symmetric)
    back = rtn_ops.dequantize(codes, scale, zero, group_size)
    step = scale.repeat_interleave(128 if group_size is None else group_size, dim=1)
    assert (back - w).abs().le(step / 2 + 1e-6).all()
    lo, hi = rtn_ops.quant_range(8, symmetric)
    assert codes.min() >= lo and codes.max() <= hi


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        rtn_ops.rtn(torch.randn(4, 100), 8, 32, True)


@pytest.mark.parametrize("symmetric,group_size", [(True, None), (False, None), (True, 16)])
@pytest.mark.parametrize("rows", [1, 12, 40])  # leanlm's kernel, torch's packed kernel, dequantize + matmul
def test_int8_linear_matches_dequantized_matmul(symmetric, group_size, rows):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True)
    codes, scale, zero = rtn_ops.rtn(lin.weight.data, 8, group_size, symmetric)
    q = Int8Linear.from_codes(lin, codes, scale, zero, group_size, symmetric)
    x = torch.randn(rows, 64)
    want = torch.nn.functional.linear(x, rtn_ops.dequantize(codes, scale, zero, group_size), lin.bias)
    # the packed kernel computes with bfloat16 activations
    torch.testing.assert_close(q(x), want, atol=3e-2, rtol=2e-2)
    assert q.qweight.dtype in (torch.int8, torch.uint8)


def test_int8_linear_with_misaligned_codes_does_not_crash():
    """torch's packed int8 kernel segfaults on codes that are not 64-byte aligned, as safetensors can
    load them; the layer must not hand it such codes."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    codes, scale, zero = rtn_ops.rtn(lin.weight.data, 8, None, True)
    q = Int8Linear.from_codes(lin, codes, scale, zero, None, True)
    buffer = torch.zeros(q.qweight.numel() + 64, dtype=q.qweight.dtype)
    start = next(i for i in range(1, 64) if (buffer.data_ptr() + i) % 64)
    buffer[start:start + q.qweight.numel()] = q.qweight.reshape(-1)
    q.qweight = nn.Parameter(buffer[start:start + q.qweight.numel()].view_as(q.qweight), requires_grad=False)
    assert q.qweight.data_ptr() % 64
    x = torch.randn(12, 64)
    want = torch.nn.functional.linear(x, rtn_ops.dequantize(codes, scale, zero, None))
    torch.testing.assert_close(q(x), want, atol=3e-2, rtol=2e-2)


def test_quantize_replaces_layers_and_shrinks(tiny):
    stats = quantize_(tiny.model, RTNConfig())
    kinds = {type(m).__name__ for n, m in tiny.model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert kinds == {"Int8Linear"} and type(tiny.model.lm_head) is nn.Linear
    assert stats["layers_quantized"] == 14
    assert stats["quantized_bytes_after"] < 0.3 * stats["quantized_bytes_before"]


def test_bad_group_size_names_layer_and_valid_sizes(tiny):
    with pytest.raises(ConfigError, match=r"group size 48 does not divide the input dimension 64 of layer model\.layers\.0\.self_attn\.q_proj; group sizes that would work: 32, 64"):
        quantize_(tiny.model, RTNConfig(group_size=48))


def test_no_matching_layer_and_unsupported_layer(tiny):
    with pytest.raises(ConfigError, match="no linear layer matches"):
        quantize_(tiny.model, RTNConfig(targets=["nothing*"]))
    from transformers.pytorch_utils import Conv1D

    tiny.model.model.layers[0].mlp.up_proj = Conv1D(128, 64)
    with pytest.raises(ConfigError, match=r"cannot quantize these layers: model\.layers\.0\.mlp\.up_proj \(Conv1D\)"):
        quantize_(tiny.model, RTNConfig())


@pytest.mark.parametrize("config,module", [(RTNConfig(), "Int8Linear"),
                                           (RTNConfig(bits=4, group_size=32, symmetric=False), "Int4Linear")])
def test_quantized_checkpoint_round_trip(tmp_path, tiny, config, module):
    quantize_(tiny.model, config)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    before = generate(tiny.model, ids, 8)
    save_model(tiny.model, tiny.tokenizer, tmp_path / "q")
    back = load_model(tmp_path / "q", device="cpu")
    assert type(back.model.model.layers[1].mlp.down_proj).__name__ == module
    assert back.model.lm_head.weight.data_ptr() == back.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(generate(back.model, ids, 8), before)
    assert back.disk_bytes < tiny.disk_bytes
    # torch's packed CPU kernels need 64-byte aligned codes; safetensors does not promise them
    assert all(t.data_ptr() % 64 == 0 for t in back.model.state_dict().values() if t.numel())
    long = torch.arange(3, 15)[None]  # 12 rows: torch's packed int8 kernel
    torch.testing.assert_close(back.model(long).logits, tiny.model(long).logits)


def test_plain_transformers_refuses_a_leanlm_checkpoint(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    quantize_(tiny.model, RTNConfig())
    save_model(tiny.model, tiny.tokenizer, tmp_path / "q")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_w4_g64_layers_take_under_30_percent_of_bf16(tiny):
    stats = quantize_(tiny.model, RTNConfig(bits=4, group_size=64, symmetric=False))
    assert stats["fraction_of_bf16"] == pytest.approx((0.5 + 3 / 64) / 2)
    assert stats["fraction_of_bf16"] <= 0.30


def _output_error(w, clip, H, bits, group_size, symmetric):
    codes, scale, zero = rtn_ops.rtn(w, bits, group_size, symmetric, clip)
    err = w - rtn_ops.dequantize(codes, scale, zero, group_size)
    return torch.einsum("oi,ij,oj->", err, H, err).item()


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (8, None, False), (4, 32, False)])
def test_scale_search_lowers_output_error(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(4096, 128)
    x[:, 5] *= 40  # one input channel with outsized activations, as in real down projections
    H = x.T @ x / x.shape[0]
    ratios = torch.cat([torch.linspace(0.5, 1.6, 221), torch.ones(1)]).unique()
    clip = rtn_ops.search_clip(w, H, bits, group_size, symmetric, ratios)
    groups = 1 if group_size is None else 128 // group_size
    assert clip.shape == (64, groups) and clip.min() >= 0.5 and clip.max() <= 1.6
    plain = _output_error(w, None, H, bits, group_size, symmetric)
    searched = _output_error(w, clip, H, bits, group_size, symmetric)
    assert searched < 0.8 * plain
    codes, _, _ = rtn_ops.rtn(w, bits, group_size, symmetric, clip)
    lo, hi = rtn_ops.quant_range(bits, symmetric)
    assert codes.min() >= lo and codes.max() <= hi


def test_scale_search_with_diagonal_only_never_loses_to_max_abs():
    torch.manual_seed(1)
    w, d = torch.randn(32, 64), torch.rand(64) * 10
    clip = rtn_ops.search_clip(w, d, 8, None, True, torch.tensor([1.0, 1.02, 1.05, 1.1]))
    assert _output_error(w, clip, torch.diag(d), 8, None, True) <= _output_error(w, None, torch.diag(d), 8, None, True)


def test_rtn_scale_search_through_quantize_(tiny, tokenizer):
    from leanlm.data.corpus import calibration_samples, default_corpus

    calib = calibration_samples(tokenizer, default_corpus().train[:50_000], 8, 64)
    ids = calibration_samples(tokenizer, default_corpus().eval[:20_000], 2, 64, seed=1)
    with torch.no_grad():
        want = tiny.model(ids).logits
    errors = {}
    for search in ("none", "activation"):
        model = load_model(tiny.path, device="cpu").model
        config = RTNConfig(scale_search=search, search_steps=60)
        assert config.needs_calibration == (search == "activation")
        stats = quantize_(model, config, calibration=calib if config.needs_calibration else None)
        assert stats["layers_quantized"] == 14 and type(model.model.layers[0].mlp.down_proj) is Int8Linear
        with torch.no_grad():
            errors[search] = (model(ids).logits - want).pow(2).mean().item()
    assert 0 < errors["activation"] < errors["none"]


def test_rtn_scale_search_bad_input(tiny):
    with pytest.raises(ConfigError, match=r"RTNConfig needs calibration=token ids \[samples, length\]"):
        quantize_(tiny.model, RTNConfig(scale_search="activation"))
    with pytest.raises(ConfigError, match="search_min <= search_max"):
        RTNConfig(scale_search="activation", search_min=1.2, search_max=1.1)


def test_int4_body_with_int8_lm_head_round_trip(tmp_path, tiny):
    """llama.cpp's layout for 4-bit files (the output matrix kept at more bits): the tied embedding reads the
    int8 head's codes rather than keeping a float copy, and both survive a save and load."""
    from leanlm.core.packed import parameter_count
    from leanlm.quantize.int8_embedding import TiedInt8Embedding

    original = parameter_count(tiny.model)
    quantize_(tiny.model, RTNConfig(bits=4, group_size=32, symmetric=False))
    stats = quantize_(tiny.model, RTNConfig(bits=8, targets=["lm_head"], skip=[]))
    assert stats["layers_quantized"] == 1 and type(tiny.model.lm_head) is Int8Linear
    assert type(tiny.model.model.embed_tokens) is TiedInt8Embedding and "tied_embedding" in stats
    assert tiny.model.model.embed_tokens.qweight is tiny.model.lm_head.qweight
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    before = generate(tiny.model, ids, 8)
    save_model(tiny.model, tiny.tokenizer, tmp_path / "q")
    back = load_model(tmp_path / "q", device="cpu")
    assert type(back.model.lm_head) is Int8Linear and type(back.model.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    assert torch.equal(generate(back.model, ids, 8), before)
    # the shared matrix counted once, as in the original
    assert parameter_count(back.model) == parameter_count(tiny.model) == original


@pytest.mark.parametrize("config", [RTNConfig(), RTNConfig(bits=4, group_size=32, symmetric=False, skip=[])])
def test_packed_codes_are_frozen_parameters_counted_by_what_they_encode(tiny, config):
    from leanlm.core.packed import parameter_count

    before = parameter_count(tiny.model)
    quantize_(tiny.model, config)
    layer = tiny.model.model.layers[0].mlp.down_proj
    assert {n for n, _ in layer.named_parameters()} >= {"qweight", "scale"} and not list(layer.buffers())
    assert not any(p.requires_grad for p in layer.parameters())
    # a packed tied head (int8 or int4) lends its codes to the embedding: the shared matrix counted once
    assert parameter_count(tiny.model) == before
