import pytest
import torch
from torch import nn

from leanlm.errors import ConfigError
from leanlm.measure.evaluate import eval_windows, prepare_reference, score_windows
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.pipeline.recipe import parse_recipe
from leanlm.quantize import MixedConfig, SmoothQuantConfig, quantize_, rtn_ops
from leanlm.quantize.sensitivity_ops import allocate, parse_format
from leanlm.quantize.w8a8_linear import W8A8Linear, quantize_per_token


def test_w8a8_linear_is_exact_integer_math():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    codes, scale, _ = rtn_ops.rtn(lin.weight.data, 8, None, True)
    q = W8A8Linear.from_codes(lin, codes, scale)
    x = torch.randn(2, 5, 64)
    a_codes, a_scale = quantize_per_token(x.reshape(-1, 64))
    want = (a_codes.double() @ codes.double().T) * a_scale.double() * scale.double().T + lin.bias.double()
    torch.testing.assert_close(q(x).double(), want.reshape(2, 5, 48), atol=1e-4, rtol=1e-5)
    assert q.qweight.dtype == torch.int8


@pytest.fixture(scope="module")
def setting(tokenizer):
    from leanlm.data.corpus import calibration_samples, default_corpus

    text = default_corpus()
    return (calibration_samples(tokenizer, text.train[:100_000], 16, 128),
            eval_windows(tokenizer, text.eval[:20_000], 128))


def _kld(model, windows, ref):
    return score_windows(model, windows, reference=ref)["kld"]


def test_smoothquant_beats_unsmoothed_w8a8_with_outlier_channels(tiny_dir, setting, tmp_path):
    calib, windows = setting

    def fresh():
        m = load_model(tiny_dir, device="cpu")
        with torch.no_grad():  # a few huge activation channels, as real LLMs have
            for layer in m.model.model.layers:
                layer.post_attention_layernorm.weight[:3] *= 40
                layer.mlp.gate_proj.weight[:, :3] /= 40
                layer.mlp.up_proj.weight[:, :3] /= 40
        return m

    base = fresh()
    ref = prepare_reference(base, windows)
    for name, layer in [(n, l) for n, l in base.model.named_modules() if isinstance(l, nn.Linear) and n != "lm_head"]:
        codes, scale, _ = rtn_ops.rtn(layer.weight.data, 8, None, True)
        parent, _, child = name.rpartition(".")
        setattr(base.model.get_submodule(parent), child, W8A8Linear.from_codes(layer, codes, scale))
    naive = _kld(base.model, windows, ref)

    m = fresh()
    stats = quantize_(m.model, SmoothQuantConfig(search_samples=8, batch_size=4), calibration=calib)
    assert stats["layers_quantized"] == 14 and stats["scale_pairs"] == 6
    smooth = _kld(m.model, windows, ref)
    assert smooth < 0.5 * naive
    save_model(m.model, m.tokenizer, tmp_path / "sq")
    back = load_model(tmp_path / "sq", device="cpu")
    assert isinstance(back.model.model.layers[0].mlp.down_proj, W8A8Linear)
    assert _kld(back.model, windows, ref) == pytest.approx(smooth, rel=1e-4)


def test_allocate_spends_the_budget_where_it_removes_most_error():
    options = {"a": {"lo": (100, 10.0), "hi": (200, 1.0)},
               "b": {"lo": (100, 3.0), "hi": (200, 2.0)}}
    assert allocate(options, 300) == {"a": "hi", "b": "lo"}
    assert allocate(options, 400) == {"a": "hi", "b": "hi"}
    with pytest.raises(ConfigError, match="budget is below"):
        allocate(options, 150)


def test_format_names_are_checked():
    assert parse_format("int4-g64").group_size == 64 and parse_format("int8").group_size is None
    with pytest.raises(ConfigError, match="unknown format 'int3'"):
        parse_format("int3")
    with pytest.raises(ConfigError, match="4-bit needs a group size"):
        parse_recipe({"steps": [{"type": "mixed", "formats": ["int4"]}]})


def test_mixed_keeps_the_budget_and_upgrades_sensitive_layers(tiny_dir, setting):
    calib, windows = setting
    results = {}
    for budget in (4.4, 6.0):
        m = load_model(tiny_dir, device="cpu")
        ref = prepare_reference(m, windows)
        stats = quantize_(m.model, MixedConfig(bits_per_weight=budget, formats=["int4-g64", "int8"],
                                               sensitivity_samples=4, batch_size=4), calibration=calib)
        assert stats["bits_per_weight"] <= budget and stats["layers_quantized"] == 14
        assert len(stats["layers"]) == 14 and all("estimated_kld" in r for r in stats["layers"])
        results[budget] = (stats["format_counts"], _kld(m.model, windows, ref))
    assert results[4.4][0] == {"int4-g64": 14}
    assert results[6.0][0].get("int8", 0) >= 3
    assert results[6.0][1] < results[4.4][1]


def test_mixed_gptq_rounds_the_lm_head_and_the_embedding_reads_it(tiny_dir, setting):
    """GPTQ calibrates on decoder blocks' inputs: a head in the selection is rounded to nearest in its chosen
    format (said in the stats), and the tied embedding then reads the head's codes."""
    calib, windows = setting
    m = load_model(tiny_dir, device="cpu")
    ref = prepare_reference(m, windows)
    stats = quantize_(m.model, MixedConfig(bits_per_weight=6.0, formats=["int4-g64", "int8"], skip=[],
                                           sensitivity_samples=4, batch_size=4), calibration=calib)
    assert stats["layers_quantized"] == 15 and stats["rounded_to_nearest"] == ["lm_head"]
    assert "tied_embedding" in stats and stats["bits_per_weight"] <= 6.0
    embed = m.model.get_input_embeddings()
    assert embed.qweight is m.model.get_output_embeddings().qweight
    assert _kld(m.model, windows, ref) < 0.5


def test_mixed_refuses_a_format_that_fits_no_layer(tiny):
    with pytest.raises(ConfigError, match="none of the formats .* fits layer"):
        quantize_(tiny.model, MixedConfig(formats=["int4-g256"], sensitivity_samples=1),
                  calibration=torch.randint(0, 100, (2, 16)))


def test_mixed_ties_layers_that_read_the_same_input(tiny_dir, setting):
    calib, _ = setting
    m = load_model(tiny_dir, device="cpu")
    stats = quantize_(m.model, MixedConfig(bits_per_weight=5.5, formats=["int4-g32", "int4-g64", "int8"],
                                           sensitivity_samples=4, batch_size=4), calibration=calib)
    fmt = {r["layer"]: r["format"] for r in stats["layers"]}
    for i in range(2):
        p = f"model.layers.{i}."
        assert fmt[p + "self_attn.q_proj"] == fmt[p + "self_attn.k_proj"] == fmt[p + "self_attn.v_proj"]
        assert fmt[p + "mlp.gate_proj"] == fmt[p + "mlp.up_proj"]
    assert stats["bits_per_weight"] <= 5.5


def test_report_shows_each_layers_format_and_why():
    from leanlm.pipeline.report import _layer_plan

    rows = [{"layer": "model.layers.0.mlp.down_proj", "format": "int8", "bits_per_weight": 8.02,
             "estimated_kld": {"int4-g64": 3e-3, "int8": 1e-5}}]
    text = "\n".join(_layer_plan(rows))
    assert "## Per-layer precision" in text
    assert "| model.layers.0.mlp.down_proj | int8 | 8.020 | 3.00e-03 | 1.00e-05 |" in text


def test_w8a8_requantizes_an_input_changed_in_place():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False)
    codes, scale, _ = rtn_ops.rtn(lin.weight.data, 8, None, True)
    q = W8A8Linear.from_codes(lin, codes, scale)
    x = torch.randn(4, 32)
    first = q(x)
    x.mul_(3)
    torch.testing.assert_close(q(x), 3 * first, atol=1e-4, rtol=1e-4)


def test_a_search_reuses_the_sensitivity_only_for_the_same_weights_and_text(tiny_dir, setting, monkeypatch):
    from leanlm.core import memo
    from leanlm.quantize import mixed

    calib, _ = setting
    calls = []
    real = mixed.fisher_diagonal
    monkeypatch.setattr(mixed, "fisher_diagonal", lambda *a: calls.append(1) or real(*a))

    def run(budget, samples=calib, nudge=False):
        m = load_model(tiny_dir, device="cpu").model
        if nudge:  # one weight changed: another model, another sensitivity
            with torch.no_grad():
                m.model.norm.weight[0] += 1e-3
        return quantize_(m, MixedConfig(bits_per_weight=budget, formats=["int4-g64", "int8"], sensitivity_samples=4,
                                        batch_size=4), calibration=samples)

    run(5.0)
    run(5.0)
    assert len(calls) == 2  # off unless a driver turns it on
    store = memo.Store(1)
    with memo.using(store):
        first, second = run(4.5), run(6.0)
        assert len(calls) == 3 and first["layers"][0]["estimated_kld"] == second["layers"][0]["estimated_kld"]
        run(6.0, nudge=True)
        run(6.0, samples=calib.flip(0))
        assert len(calls) == 5 and len(store.items) == 1
    run(6.0, samples=calib.flip(0))  # outside the block nothing is read from the store
    assert len(calls) == 6
    assert memo.fingerprint([torch.tensor(1.0, dtype=torch.bfloat16)]) != memo.fingerprint([torch.tensor(1.0)])
