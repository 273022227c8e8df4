import pytest
import torch
from torch import nn

from leanlm.core.layerwise import process_layerwise
from leanlm.errors import ConfigError
from leanlm.pipeline.recipe import parse_recipe
from leanlm.quantize import GPTQConfig, RTNConfig, quantize_, rtn_ops
from leanlm.quantize.gptq_ops import gptq
from leanlm.quantize.int4_linear import Int4Linear, pack_int4, unpack_int4


def correlated_inputs(n=2048, dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.linspace(0.05, 3, dim)
    return torch.randn(n, dim, generator=g) @ mix


def output_error(w, codes, scale, zero, group_size, x):
    return ((x @ w.T - x @ rtn_ops.dequantize(codes, scale, zero, group_size).T) ** 2).mean().item()


@pytest.mark.parametrize("act_order,static", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_the_layer_output(act_order, static, symmetric):
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), correlated_inputs()
    H = x.T @ x / len(x)
    codes, scale, zero, loss = gptq(w, H, 4, 32, symmetric, act_order=act_order, static_groups=static)
    ours = output_error(w, codes, scale, zero, 32, x)
    base = output_error(w, *rtn_ops.rtn(w, 4, 32, symmetric), 32, x)
    assert ours < 0.8 * base and loss > 0
    lo, hi = rtn_ops.quant_range(4, symmetric)
    assert codes.min() >= lo and codes.max() <= hi


def test_gptq_with_identity_hessian_is_close_to_rtn():
    w = torch.randn(16, 64)
    codes, scale, zero, _ = gptq(w, torch.eye(64), 8, None, True, damp=1e-6)
    ref, _, _ = rtn_ops.rtn(w, 8, None, True)
    assert (codes - ref).abs().max() <= 1


def test_act_order_needs_static_groups():
    with pytest.raises(ValueError, match="static_groups"):
        gptq(torch.randn(4, 64), torch.eye(64), 4, 32, True, act_order=True, static_groups=False)
    with pytest.raises(ConfigError, match="static_groups: true"):
        parse_recipe({"steps": [{"type": "gptq", "act_order": True, "static_groups": False}]})


def test_int4_pack_round_trip():
    codes = torch.randint(0, 16, (8, 32))
    packed = pack_int4(codes)
    assert packed.shape == (8, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed).long(), codes)


@pytest.mark.parametrize("rows", [1, 33])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_linear_kernel_matches_dequantized(rows, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    codes, scale, zero = rtn_ops.rtn(lin.weight.data, 4, 64, symmetric)
    q = Int4Linear.from_codes(lin, codes, scale, zero, 64)
    x = torch.randn(rows, 128)
    want = torch.nn.functional.linear(x, rtn_ops.dequantize(codes, scale, zero, 64), lin.bias)
    torch.testing.assert_close(q(x), want, atol=5e-2, rtol=3e-2)
    # scales are stored as float16, zero points as uint8
    exact = rtn_ops.dequantize(codes if zero is not None else codes + 8, scale.half().float(),
                               zero if zero is not None else torch.full_like(scale, 8.0), 64)
    torch.testing.assert_close(q.dequantized_weight(), exact)
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.uint8


def test_layerwise_pipeline_sees_every_block_in_order(tiny):
    seen = []
    samples = torch.randint(0, 100, (3, 16))

    def fn(index, block, observe):
        outs = observe()
        seen.append((index, len(outs), tuple(outs[0].shape)))
        return {}

    process_layerwise(tiny.model, samples, fn, batch_size=2)
    assert seen == [(0, 2, (2, 16, 64)), (1, 2, (2, 16, 64))]


def test_layerwise_outputs_match_the_model(tiny):
    """Feeding block outputs forward reproduces the model's own last hidden state."""
    samples = torch.randint(0, 100, (2, 12))
    last = {}

    def fn(index, block, observe):
        return {}

    from leanlm.core import layerwise

    orig = layerwise.run_block
    def spy(block, inputs, *args):
        out = orig(block, inputs, *args)
        last["out"] = out
        return out
    layerwise.run_block = spy
    try:
        process_layerwise(tiny.model, samples, fn, batch_size=2)
    finally:
        layerwise.run_block = orig
    captured = []
    handle = tiny.model.model.layers[-1].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        tiny.model(input_ids=samples[:2])
    handle.remove()
    want = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    torch.testing.assert_close(last["out"][0], want, atol=1e-5, rtol=1e-4)


def test_gptq_on_tiny_model_beats_rtn(tiny_dir, tokenizer):
    from leanlm.data.corpus import calibration_samples, default_corpus
    from leanlm.measure.evaluate import eval_windows, prepare_reference, score_windows
    from leanlm.models.load import load_model

    text = default_corpus()
    calib = calibration_samples(tokenizer, text.train[:100_000], 16, 128)
    windows = eval_windows(tokenizer, text.eval[:20_000], 128)
    results = {}
    for name, cfg in {"rtn": RTNConfig(bits=4, group_size=32, symmetric=False),
                      "gptq": GPTQConfig(bits=4, group_size=32)}.items():
        m = load_model(tiny_dir, device="cpu")
        ref = prepare_reference(m, windows)
        stats = quantize_(m.model, cfg, calibration=calib) if name == "gptq" else quantize_(m.model, cfg)
        assert stats["layers_quantized"] == 14
        results[name] = score_windows(m.model, windows, reference=ref)["kld"]
    assert results["gptq"] < results["rtn"]


def test_gptq_refuses_layers_outside_blocks(tiny):
    with pytest.raises(ConfigError, match="inside decoder blocks only; lm_head"):
        quantize_(tiny.model, GPTQConfig(skip=[]), calibration=torch.randint(0, 100, (2, 8)))
