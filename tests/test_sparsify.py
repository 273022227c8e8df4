"""Activation sparsity (TEAL) and MoE-fication: the math on random tensors, the runtime modules
against their dense equivalents, and round trips through leanlm checkpoints."""

import pytest
import torch
from torch import nn

from leanlm.core.data import calibration_samples, default_corpus
from leanlm.core.models import load_model, save_model
from leanlm.core.structure import find_structure
from leanlm.errors import ConfigError, UnsupportedModelError
from leanlm.export import export
from leanlm.pipeline.recipe import parse_recipe
from leanlm.sparsify import ActSparseLinear, ActSparsityConfig, MoEFFN, MoefyConfig, moefy_, sparsify_activations_
from leanlm.sparsify import act_sparse_ops, moe_ops

IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def calibration(tokenizer):
    return calibration_samples(tokenizer, default_corpus().train, 8, 64, 0)


def test_threshold_hits_the_sparsity():
    x = torch.randn(4000, 32)
    t = act_sparse_ops.threshold_for(x, 0.4)
    assert (x.abs() <= t).float().mean().item() == pytest.approx(0.4, abs=0.01)


def test_sparse_gemv_equals_the_masked_dense_product():
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(24, 40, generator=g), torch.randn(1, 1, 40, generator=g), torch.randn(24, generator=g)
    t = torch.tensor(0.7)
    dense = nn.functional.linear(act_sparse_ops.sparsify(x, t), w, b)
    torch.testing.assert_close(act_sparse_ops.sparse_gemv(x, w.T.contiguous(), t, b), dense)


def test_act_sparse_linear_one_token_and_many_tokens_agree():
    linear = nn.Linear(40, 24)
    mod = ActSparseLinear.from_linear(linear, 0.5)
    x = torch.randn(3, 40)
    many = mod(x)
    one = torch.cat([mod(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(one, many)
    torch.testing.assert_close(mod.dequantized_weight(), linear.weight.data)


def test_act_sparsity_step_round_trips_and_keeps_quality_close(tiny_dir, tmp_path, calibration):
    m = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        dense = m.model(input_ids=IDS).logits
    stats = sparsify_activations_(m.model, ActSparsityConfig(sparsity=0.3, rows=256), calibration)
    assert stats["layers_sparsified"] == 14 and all(t > 0 for t in stats["thresholds"].values())
    assert sum(isinstance(mod, ActSparseLinear) for mod in m.model.modules()) == 14
    with torch.no_grad():
        sparse = m.model(input_ids=IDS).logits
    assert 0 < (sparse - dense).abs().max() < dense.abs().max()
    save_model(m.model, m.tokenizer, tmp_path / "s")
    back = load_model(tmp_path / "s", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=IDS).logits, sparse)
    ids = IDS[:1, :6]
    out = back.model.generate(ids, max_new_tokens=5, do_sample=False)  # decode takes the gather path
    ref = ids
    for _ in range(5):
        with torch.no_grad():
            ref = torch.cat([ref, back.model(input_ids=ref).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


def test_act_sparsity_bad_inputs():
    with pytest.raises(ConfigError, match=r"sparsity must be in \(0, 1\)"):
        parse_recipe({"steps": [{"type": "act_sparsity", "sparsity": 1}]})
    with pytest.raises(ConfigError, match="unknown key 'sparse'"):
        parse_recipe({"steps": [{"type": "act_sparsity", "sparse": 0.5}]})


def test_balanced_clustering_gives_equal_experts_and_finds_groups():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    features = centers.repeat_interleave(8, 0) + 0.1 * torch.randn(32, 16, generator=g)
    assign = moe_ops.cluster_channels(features, 4)
    assert torch.bincount(assign).tolist() == [8, 8, 8, 8]
    for group in range(4):  # channels made from one center land in one expert
        assert len(set(assign[group * 8 : group * 8 + 8].tolist())) == 1


def test_router_regression_predicts_contributions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    true_w = torch.randn(6, 16, generator=g)
    targets = x @ true_w.T + 0.5
    w, b = moe_ops.fit_router(x, targets, ridge=1e-6)
    assert moe_ops.top_recall(x @ w.T + b, targets, 2) > 0.99


def test_moefy_all_experts_equal_dense_and_top_k_round_trips(tiny_dir, tmp_path, calibration):
    m = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        dense = m.model(input_ids=IDS).logits
    stats = moefy_(m.model, MoefyConfig(experts=8, top_k=4, rows=256), calibration)
    assert stats["ffn_fraction_per_token"] == 0.5 and 0 < stats["router_recall_mean"] <= 1
    moes = [mod for mod in m.model.modules() if isinstance(mod, MoEFFN)]
    assert len(moes) == len(find_structure(m.model).blocks)
    for mod in moes:
        mod.top_k = mod.experts
    with torch.no_grad():
        torch.testing.assert_close(m.model(input_ids=IDS).logits, dense, atol=1e-4, rtol=1e-4)
    for mod in moes:
        mod.top_k = 4
    with torch.no_grad():
        routed = m.model(input_ids=IDS).logits
    save_model(m.model, m.tokenizer, tmp_path / "moe")
    back = load_model(tmp_path / "moe", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=IDS).logits, routed)
    ids = IDS[:1, :6]
    out = back.model.generate(ids, max_new_tokens=5, do_sample=False)  # one token at a time: the expert loop
    ref = ids
    for _ in range(5):
        with torch.no_grad():
            ref = torch.cat([ref, back.model(input_ids=ref).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


def test_moefy_bad_inputs(tiny_dir, calibration):
    with pytest.raises(ConfigError, match="1 <= top_k < experts"):
        parse_recipe({"steps": [{"type": "moefy", "experts": 4, "top_k": 4}]})
    m = load_model(tiny_dir, device="cpu")
    with pytest.raises(ConfigError, match="does not split into 7 equal experts"):
        moefy_(m.model, MoefyConfig(experts=7, top_k=2), calibration)


def test_exporting_a_moe_model_is_refused(tiny_dir, tmp_path, calibration):
    m = load_model(tiny_dir, device="cpu")
    moefy_(m.model, MoefyConfig(experts=8, top_k=4, rows=128), calibration)
    save_model(m.model, m.tokenizer, tmp_path / "moe")
    with pytest.raises(UnsupportedModelError, match="MoE"):
        export(tmp_path / "moe", tmp_path / "out", "hf")
