import pytest
import torch

from leanlm.core.scale_pairs import apply_scale, call, capture_calls, find_scale_pairs
from leanlm.core.structure import find_structure
from leanlm.quantize import AWQConfig, RTNConfig, awq_ops, quantize_, rtn_ops


def family_model(family, kv_heads=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # fresh norms are all ones; random ones make the exactness test meaningful
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def block_example(model):
    block = find_structure(model).blocks[0]
    with capture_calls(block) as calls, torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 12)), use_cache=False)
    return block, calls[0][0]


def pair_table(model):
    block, example = block_example(model)
    return {(p.prev, tuple(p.nexts), p.parent) for p in find_scale_pairs(block, example)}


def test_llama_pairs_found_from_the_graph():
    pairs = pair_table(family_model("llama"))
    assert pairs == {
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    }


def test_v_to_o_is_a_pair_only_without_grouped_kv_heads():
    assert ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj") in pair_table(family_model("llama", 4))
    assert not any(p[0] == "self_attn.v_proj" for p in pair_table(family_model("llama", 2)))


def test_gemma_norms_are_not_scaled():
    """Gemma's RMSNorm multiplies by (1 + weight): dividing the weight is not exact, so no norm pair."""
    pairs = pair_table(family_model("gemma"))
    assert not any("norm" in p[0] for p in pairs)
    assert ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj") in pairs


@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3"])
def test_every_found_pair_is_exact(family):
    model = family_model(family)
    block, example = block_example(model)
    pairs = find_scale_pairs(block, example)
    assert pairs
    modules = dict(block.named_modules())
    with torch.no_grad():
        before = call(block, example)
        for p in pairs:
            apply_scale(modules[p.prev], [modules[n] for n in p.nexts], torch.rand(modules[p.nexts[0]].in_features) + 0.5)
        torch.testing.assert_close(call(block, example), before, atol=1e-4, rtol=1e-3)


def test_search_scale_picks_the_lowest_loss():
    x, w = torch.rand(16) + 0.1, torch.rand(16) + 0.1
    target = awq_ops.candidate_scale(x, w, 0.35)
    s, alpha, loss = awq_ops.search_scale(x, w, lambda s: (s - target).pow(2).sum().item(), grid=20)
    assert alpha == pytest.approx(0.35) and loss == pytest.approx(0.0, abs=1e-10)
    s, alpha, _ = awq_ops.search_scale(x, w, lambda s: (s - 1).pow(2).sum().item(), grid=20)
    assert alpha == -1 and torch.equal(s, torch.ones(16))


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 5] *= 8  # an outlier column makes some clipping worthwhile
    x = torch.randn(256, 128)
    ratio = awq_ops.search_clip(w, x, 4, 64, False)
    assert ratio.shape == (32, 2) and (ratio <= 1).all() and (ratio > 0.5).all() and (ratio < 1).any()

    def err(clip):
        return (x @ (rtn_ops.fake_quantize(w, 4, 64, False, clip) - w).T).pow(2).sum().item()
    assert err(ratio) < err(None)


def test_awq_on_tiny_model_beats_rtn(tiny_dir, tokenizer):
    from leanlm.data.corpus import calibration_samples, default_corpus
    from leanlm.measure.evaluate import eval_windows, prepare_reference, score_windows
    from leanlm.models.load import load_model

    text = default_corpus()
    calib = calibration_samples(tokenizer, text.train[:100_000], 16, 128)
    windows = eval_windows(tokenizer, text.eval[:20_000], 128)
    results = {}
    for name, cfg in {"rtn": RTNConfig(bits=4, group_size=32, symmetric=False),
                      "awq": AWQConfig(bits=4, group_size=32, search_samples=8, batch_size=4)}.items():
        m = load_model(tiny_dir, device="cpu")
        ref = prepare_reference(m, windows)
        stats = quantize_(m.model, cfg, calibration=calib) if name == "awq" else quantize_(m.model, cfg)
        assert stats["layers_quantized"] == 14
        results[name] = score_windows(m.model, windows, reference=ref)["kld"]
        if name == "awq":
            assert stats["scale_pairs"] == 6
    assert results["awq"] < results["rtn"]


def test_awq_nan_calibration_names_the_layer(tiny):
    with torch.no_grad():
        tiny.model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(Exception, match=r"layer .*mlp\..* NaN/Inf"):
        quantize_(tiny.model, AWQConfig(group_size=32), calibration=torch.randint(0, 100, (2, 8)))
