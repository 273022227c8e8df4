"""Activation sparsity (TEAL) and MoE-fication: the math on random tensors, the runtime modules
against their dense equivalents, and round trips through leanlm checkpoints."""

import pytest
import torch
from torch import nn

from leanlm.core.structure import find_structure
from leanlm.data.corpus import calibration_samples, default_corpus
from leanlm.errors import ConfigError, UnsupportedModelError
from leanlm.export import export
from leanlm.models.load import load_model
from leanlm.models.save import save_model
from leanlm.pipeline.recipe import parse_recipe
from leanlm.sparsify import (
    ActSparseLinear,
    ActSparsityConfig,
    MoEFFN,
    MoefyConfig,
    act_sparse_ops,
    moe_ffn,
    moe_ops,
    moefy_,
    rotation_ops,
    sparsify_activations_,
)
from leanlm.sparsify.rotated_norm import NormThenRotate

IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


def greedy_by_full_forward(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens from full forwards (the many-token path), to check the one-token decode path against."""
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    return ids


def assert_round_trip(model, tokenizer, path, logits):
    """Save, load, same logits, and one-token decode (generate) agrees with full forwards."""
    save_model(model, tokenizer, path)
    back = load_model(path, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=IDS).logits, logits)
    ids = IDS[:1, :6]
    out = back.model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, greedy_by_full_forward(back.model, ids, 5))
    return back


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
    stats = sparsify_activations_(m.model, ActSparsityConfig(sparsity=0.3, rows=256, allocation="uniform"), calibration)
    assert stats["layers_sparsified"] == 14 and all(t > 0 for t in stats["thresholds"].values())
    assert sum(isinstance(mod, ActSparseLinear) for mod in m.model.modules()) == 14
    with torch.no_grad():
        sparse = m.model(input_ids=IDS).logits
    assert 0 < (sparse - dense).abs().max() < dense.abs().max()
    assert_round_trip(m.model, m.tokenizer, tmp_path / "s", sparse)
    # GGUF has no thresholds: llama.cpp gets the dense weights, i.e. the model before the step
    export(tmp_path / "s", tmp_path / "s.gguf", "gguf", weight_type="f32", embeddings="f32")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "s.gguf", device="cpu").model(input_ids=IDS).logits, dense,
                                   atol=1e-4, rtol=1e-4)


def test_evaluation_measures_the_sparsity_the_text_reaches(tiny_dir, calibration):
    """Thresholds are calibrated on one text; the report says what another text reaches through them."""
    from leanlm.measure.evaluate import evaluate

    m = load_model(tiny_dir, device="cpu")
    assert "measured_act_sparsity" not in evaluate(m, calibration[:2])
    sparsify_activations_(m.model, ActSparsityConfig(sparsity=0.5, rows=4096), calibration)
    on_calibration = evaluate(m, calibration)["measured_act_sparsity"]
    assert on_calibration == pytest.approx(0.5, abs=0.03)
    layers = [mod for mod in m.model.modules() if isinstance(mod, ActSparseLinear)]
    assert all(mod.tally is None for mod in layers)  # counting stops with the evaluation
    for mod in layers:  # half the thresholds, as for a text with inputs twice as large: fewer fall under them
        mod.threshold.mul_(0.5)
    assert evaluate(m, calibration)["measured_act_sparsity"] < on_calibration - 0.1


def test_greedy_allocation_reaches_the_target_and_spares_sensitive_layers(tiny_dir, calibration):
    m = load_model(tiny_dir, device="cpu")
    config = ActSparsityConfig(sparsity=0.4, rows=256, allocation="greedy", search_samples=4, batch_size=4)
    stats = sparsify_activations_(m.model, config, calibration)
    assert stats["calibrated_weighted_sparsity"] == pytest.approx(0.4, abs=1e-3)
    levels = stats["levels"]
    assert max(levels.values()) <= config.max_layer_sparsity + 1e-9
    for block in ("model.layers.0", "model.layers.1"):  # layers that read one tensor share a level
        assert levels[f"{block}.self_attn.q_proj"] == levels[f"{block}.self_attn.k_proj"] == levels[f"{block}.self_attn.v_proj"]
        assert levels[f"{block}.mlp.gate_proj"] == levels[f"{block}.mlp.up_proj"]
    assert set(stats["mean_level_by_layer"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_output_basis_keeps_outputs_and_makes_skipping_cheaper():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(48, 32, generator=g), torch.randn(16, 32, generator=g)]
    x = torch.randn(4000, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs
    basis = rotation_ops.output_basis(weights, x.T @ x / len(x))
    z = x @ basis
    assert z.var(0)[:-1].ge(z.var(0)[1:] * 0.999).all()  # columns by decreasing variance
    for w in weights:
        folded = rotation_ops.fold_into_readers(w, basis)
        torch.testing.assert_close(z @ folded.T, x @ w.T, rtol=1e-4, atol=1e-3)

    def error(inputs, readers):  # output error of zeroing the smaller half of each row
        kept = act_sparse_ops.sparsify(inputs, torch.tensor(act_sparse_ops.threshold_for(inputs, 0.5)))
        return sum((kept @ r.T - x @ w.T).pow(2).mean() for r, w in zip(readers, weights))

    rotated = error(z, [rotation_ops.fold_into_readers(w, basis) for w in weights])
    assert rotated < 0.5 * error(x, weights)


@pytest.mark.parametrize("rotation", ["int8", "float32"])
def test_rotated_act_sparsity_is_exact_when_dense_and_round_trips(tiny_dir, tmp_path, calibration, rotation):
    from leanlm.sparsify.act_allocation import DENSE

    m = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        dense = m.model(input_ids=IDS).logits
    config = ActSparsityConfig(sparsity=0.4, rows=256, rotation=rotation)
    stats = sparsify_activations_(m.model, config, calibration)
    wrapped = [mod for mod in m.model.modules() if isinstance(mod, NormThenRotate)]
    assert len(wrapped) == 4  # input and post-attention norm of both blocks
    assert stats["rotated_inputs"] == 6  # and the attention output, folded into v_proj and o_proj
    assert stats["rotated_by_kind"] == {"norm output (extra product)": 4, "attention output (folded)": 2}
    assert (type(wrapped[0].rotation).__name__ == "Int8Linear") == (rotation == "int8")
    assert 0.6 < stats["weight_reads_vs_dense"] < 0.6 + (0.2 if rotation == "int8" else 0.5)
    sparse_layers = [mod for mod in m.model.modules() if isinstance(mod, ActSparseLinear)]
    kept = [mod.threshold.clone() for mod in sparse_layers]
    for mod in sparse_layers:
        mod.threshold.fill_(DENSE)
    with torch.no_grad():  # with nothing skipped, the rotation changes nothing
        torch.testing.assert_close(m.model(input_ids=IDS).logits, dense, rtol=1e-3, atol=2e-3)
    for mod, t in zip(sparse_layers, kept):
        mod.threshold.copy_(t)
    with torch.no_grad():
        sparse = m.model(input_ids=IDS).logits
    assert_round_trip(m.model, m.tokenizer, tmp_path / "s", sparse)
    with pytest.raises(UnsupportedModelError, match="rotation: none"):
        export(tmp_path / "s", tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


class TwoPaths(nn.Module):
    """Two parallel layers, one of whose outputs is amplified 30x: its inputs are the costly ones to drop."""

    def __init__(self):
        super().__init__()
        self.loud, self.quiet = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)

    def forward(self, x, y):
        return 30 * self.loud(x) + self.quiet(y)


def test_greedy_allocator_moves_sparsity_to_the_cheap_layer():
    from leanlm.sparsify.act_allocation import DENSE, Allocator, find_groups

    block = TwoPaths()
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    observe = lambda limit=None: block(x, y)  # noqa: E731
    groups = find_groups(block, {"loud": block.loud, "quiet": block.quiet}, observe)
    assert sorted(g.names[0] for g in groups) == ["loud", "quiet"] and all(g.parent == "" for g in groups)
    for name in ("loud", "quiet"):
        setattr(block, name, ActSparseLinear.from_linear(getattr(block, name), DENSE, weighted=False))
    allocator = Allocator(block, groups, {"loud": x, "quiet": y}, {"loud": None, "quiet": None}, 0.1, 0.9)
    allocator.run(0.4, observe, 1)
    level = {g.names[0]: g.level for g in groups}
    assert level["quiet"] > level["loud"] and level["loud"] + level["quiet"] == pytest.approx(0.8)


def test_act_sparsity_bad_inputs():
    with pytest.raises(ConfigError, match=r"sparsity must be in \(0, 1\)"):
        parse_recipe({"steps": [{"type": "act_sparsity", "sparsity": 1}]})
    with pytest.raises(ConfigError, match="unknown key 'sparse'"):
        parse_recipe({"steps": [{"type": "act_sparsity", "sparse": 0.5}]})
    with pytest.raises(ConfigError, match="max_layer_sparsity"):
        parse_recipe({"steps": [{"type": "act_sparsity", "sparsity": 0.5, "max_layer_sparsity": 0.4}]})
    with pytest.raises(ConfigError, match="allocation"):
        parse_recipe({"steps": [{"type": "act_sparsity", "allocation": "clever"}]})
    with pytest.raises(ConfigError, match="rotation.*int8"):
        parse_recipe({"steps": [{"type": "act_sparsity", "rotation": "fp16"}]})


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


def test_shared_experts_take_the_most_important_channels():
    g = torch.Generator().manual_seed(0)
    h, down = torch.randn(500, 32, generator=g), torch.randn(8, 32, generator=g)
    h[:, [3, 7, 11, 20]] *= 10  # the four channels contributing most
    assign = moe_ops.assign_experts(h, down, experts=8, shared=1)
    assert torch.bincount(assign).tolist() == [4] * 8
    assert sorted((assign == 0).nonzero().squeeze(1).tolist()) == [3, 7, 11, 20]


def test_routed_channels_are_the_shared_and_top_k_experts():
    assign = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # 4 experts of 2 channels
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.1]])  # routed experts 1..3
    keep = moe_ops.routed_channels(scores, assign, shared=1, top_k=1)
    assert keep.tolist() == [[1, 0, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0]]


def test_expert_groups_sort_rows_by_expert():
    chosen = torch.tensor([[2, 0], [2, 1], [0, 2]])  # expert 2 is busiest (3 rows), expert 3 idle
    rows, ids, ends = moe_ops.expert_groups(chosen, experts=4)
    assert ids.tolist() == [0, 0, 1, 2, 2, 2] and rows.tolist() == [0, 2, 1, 0, 1, 2]
    assert ends.tolist() == [2, 3, 6, 6] and ends.dtype == torch.int32


@pytest.mark.parametrize("gated,bias,shared,intermediate",
                         [(True, False, 2, 64), (False, True, 0, 64), (True, True, 1, 64), (True, False, 1, 48)])
def test_moe_ffn_grouped_experts_match_the_masked_ffn_and_the_one_token_loop(gated, bias, shared, intermediate):
    g = torch.Generator().manual_seed(0)
    ffn = MoEFFN(16, intermediate, experts=8, top_k=2, gated=gated, activation="silu", bias=bias, shared=shared)
    for p in ffn.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    ffn.router_bias[0] += 50  # one expert takes every row, others none: uneven capacity and idle experts
    x = torch.randn(2, 9, 16, generator=g)
    flat = x.reshape(-1, 16)
    chosen = ffn.route(flat)
    masked = ffn.run_masked(flat, chosen)
    # 48 channels make experts of 6: rows of 24 bytes, which F.grouped_mm refuses, so they run masked
    assert ffn.groupable(flat) == (moe_ffn.cpu_grouped_mm(torch.float32) is not None and intermediate == 64)
    assert not ffn.groupable(flat.bfloat16())  # bfloat16 groups only from BF16_GROUPED_MIN_ROWS rows
    if ffn.groupable(flat):  # what many rows run on the CPU
        torch.testing.assert_close(ffn.run_grouped(flat, chosen), masked, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ffn(x).reshape(-1, 16), masked, atol=1e-4, rtol=1e-4)
    loop = torch.cat([ffn(row[None]) for row in flat])
    torch.testing.assert_close(loop, masked, atol=1e-4, rtol=1e-4)
    assert (ffn.route(flat)[:, 0] == shared).all()
    ffn.double()  # a dtype grouped_mm may not run on the CPU (torch 2.13 does not): whichever path, the same result
    torch.testing.assert_close(ffn(x.double()).reshape(-1, 16), ffn.run_masked(flat.double(), chosen))


def test_expert_contributions_are_the_norms_of_each_experts_output():
    g = torch.Generator().manual_seed(0)
    h, down = torch.randn(40, 12, generator=g), torch.randn(5, 12, generator=g)
    assign = torch.tensor([0, 1, 2] * 4)
    got = moe_ops.expert_contributions(h, down, assign, 3)
    for e in range(3):
        cols = assign == e
        torch.testing.assert_close(got[:, e], (h[:, cols] @ down[:, cols].T).norm(dim=1))


def test_refit_down_compensates_for_dropped_channels():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, 6, generator=g)
    h = base @ torch.randn(6, 24, generator=g) + 0.05 * torch.randn(3000, 24, generator=g)  # correlated channels
    down = torch.randn(10, 24, generator=g)
    target = h @ down.T

    def errors(keep):
        return [((h * keep) @ w.T - target).norm() for w in (down, moe_ops.refit_down(h, down, keep, damp=1e-4))]

    before, after = errors((torch.arange(24) < 12).float().expand_as(h))  # half the channels never run
    assert after < 0.1 * before  # the kept ones span what the dropped ones carried
    before, after = errors((torch.rand(3000, 24, generator=g) > 0.5).float())  # a different half for every token
    assert after < 0.7 * before
    before, after = errors(torch.ones_like(h))  # nothing dropped: the dense weights' outputs again
    assert after < 1e-2 * target.norm()  # up to the ridge


def test_moefy_with_shared_experts_and_refit(tiny_dir, tmp_path, calibration):
    m = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        dense = m.model(input_ids=IDS).logits
    stats = moefy_(m.model, MoefyConfig(experts=8, shared=2, top_k=2, rows=256), calibration)
    assert stats["ffn_fraction_per_token"] == 0.5 and stats["shared"] == 2
    assert stats["ffn_error_refit_mean"] < stats["ffn_error_mean"]  # least squares beats the dense weights
    moes = [mod for mod in m.model.modules() if isinstance(mod, MoEFFN)]
    assert all(mod.shared == 2 and mod.router.shape[0] == 6 for mod in moes)
    with torch.no_grad():
        routed = m.model(input_ids=IDS).logits
        chosen = moes[0].route(torch.randn(50, moes[0].hidden))
    assert (routed - dense).abs().max() > 1e-3 and chosen.min() >= 2  # shared experts are never routed
    assert_round_trip(m.model, m.tokenizer, tmp_path / "moe", routed)  # one-token loop (shared slice) vs full


def test_per_linear_methods_refuse_to_pass_over_moe_experts(tiny_dir, calibration):
    from leanlm.finetune.lora import lora_targets
    from leanlm.prune import MagnitudeConfig, prune_
    from leanlm.quantize import RTNConfig, quantize_

    m = load_model(tiny_dir, device="cpu")
    moefy_(m.model, MoefyConfig(experts=8, shared=2, top_k=2, rows=256), calibration)
    with pytest.raises(ConfigError, match=r"cannot quantize the weights inside 2 MoEFFN .*add '\*\.mlp' to 'skip'"):
        quantize_(m.model, RTNConfig(bits=8))
    with pytest.raises(ConfigError, match="cannot prune the weights inside 2 MoEFFN"):
        prune_(m.model, MagnitudeConfig(sparsity=0.5))
    with pytest.raises(ConfigError, match="cannot train LoRA on the weights inside 2 MoEFFN"):
        lora_targets(m.model, ["*"])
    assert all("self_attn" in n for n in lora_targets(m.model, ["*.self_attn.*"])[0])
    experts = [mod.expand.clone() for mod in m.model.modules() if isinstance(mod, MoEFFN)]
    stats = quantize_(m.model, RTNConfig(bits=8, skip=["lm_head", "*.mlp"]))  # attention only, as asked
    assert stats["layers_quantized"] == 4 * len(experts)
    assert all(torch.equal(a, mod.expand) for a, mod in zip(experts, (x for x in m.model.modules() if isinstance(x, MoEFFN))))


def test_moefy_all_experts_equal_dense_and_top_k_round_trips(tiny_dir, tmp_path, calibration):
    m = load_model(tiny_dir, device="cpu")
    with torch.no_grad():
        dense = m.model(input_ids=IDS).logits
    stats = moefy_(m.model, MoefyConfig(experts=8, shared=0, top_k=4, rows=256, refit=False), calibration)
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
    assert_round_trip(m.model, m.tokenizer, tmp_path / "moe", routed)


def test_moefy_bad_inputs(tiny_dir, calibration):
    with pytest.raises(ConfigError, match=r"1 <= top_k < experts - shared = 4 \(top_k counts the routed"):
        parse_recipe({"steps": [{"type": "moefy", "experts": 4, "shared": 0, "top_k": 4}]})
    with pytest.raises(ConfigError, match=r"1 <= top_k < experts - shared = 2"):
        parse_recipe({"steps": [{"type": "moefy", "experts": 4, "shared": 2, "top_k": 2}]})
    with pytest.raises(ConfigError, match=r"0 <= shared <= experts - 2"):
        MoefyConfig(experts=4, shared=3, top_k=1)
    m = load_model(tiny_dir, device="cpu")
    with pytest.raises(ConfigError, match="does not split into 7 equal experts"):
        moefy_(m.model, MoefyConfig(experts=7, shared=0, top_k=2), calibration)
    with pytest.raises(ConfigError, match=r"40 tokens \(2 samples x 20\) are too few, give at least"):
        moefy_(m.model, MoefyConfig(experts=4, shared=0, top_k=2), calibration[:2, :20])
    with pytest.raises(ConfigError, match=r"moefy_: the config must be a MoefyConfig, got dict"):
        moefy_(m.model, {"experts": 4}, calibration)
    m.model.config.__dict__["hidden_size"] = None
    with pytest.raises(UnsupportedModelError, match="no integer hidden_size; MoE-fication needs it"):
        moefy_(m.model, MoefyConfig(experts=4, shared=0, top_k=2), calibration)


def test_moefy_ignores_attention_biases(calibration):
    from transformers import (  # q/k/v have biases, the FFN none
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    stats = moefy_(model, MoefyConfig(experts=4, shared=0, top_k=2, rows=128), calibration[:4, :64])
    assert len(stats["router_recall"]) == 2 and type(model.model.layers[1].mlp) is MoEFFN
    assert not model.model.layers[1].mlp.has_bias


def _with_random_biases(model):
    """Untrained HF models start with zero biases, which would hide a bias the experts dropped."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model.eval()


def _gpt2_dir(tokenizer, path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=128,
                        bos_token_id=0, eos_token_id=0)
    _with_random_biases(GPT2LMHeadModel(config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_moefy_splits_a_biased_conv1d_ffn_and_round_trips(tokenizer, tmp_path, calibration):
    m = load_model(_gpt2_dir(tokenizer, tmp_path / "gpt2"), device="cpu")  # Conv1D c_fc/c_proj, GELU, biases
    with torch.no_grad():
        dense = m.model(input_ids=IDS).logits
    moefy_(m.model, MoefyConfig(experts=4, shared=0, top_k=2, rows=128, refit=False), calibration[:4, :64])
    moes = [mod for mod in m.model.modules() if isinstance(mod, MoEFFN)]
    assert len(moes) == 2 and all(mod.has_bias and mod.activation == "gelu_new" for mod in moes)
    for mod in moes:
        mod.top_k = mod.experts
    with torch.no_grad():
        torch.testing.assert_close(m.model(input_ids=IDS).logits, dense, atol=1e-4, rtol=1e-4)
        one_token = m.model(input_ids=IDS[:1, :1]).logits  # the expert loop of batch-1 decode, biases included
    torch.testing.assert_close(one_token, dense[:1, :1], atol=1e-4, rtol=1e-4)
    for mod in moes:
        mod.top_k = 2
    with torch.no_grad():
        routed = m.model(input_ids=IDS).logits
    assert (routed - dense).abs().max() > 1e-3  # top-2 of 4 is not the dense FFN
    assert_round_trip(m.model, m.tokenizer, tmp_path / "moe", routed)


@pytest.mark.parametrize("family", ["gpt_neox", "phi3"])
def test_moefy_splits_neox_and_fused_gate_up_ffns(family, calibration):
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )

    torch.manual_seed(0)
    if family == "gpt_neox":  # biased dense_h_to_4h / dense_4h_to_h, parallel residual
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=320, hidden_size=64, intermediate_size=256,
                                                 num_hidden_layers=2, num_attention_heads=4))
    else:  # gate_up_proj: gate rows, then up rows
        model = Phi3ForCausalLM(Phi3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    model = _with_random_biases(model)
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    moefy_(model, MoefyConfig(experts=4, shared=0, top_k=2, rows=128, refit=False), calibration[:4, :64])
    moes = [mod for mod in model.modules() if isinstance(mod, MoEFFN)]
    assert len(moes) == 2 and all(mod.gated == (family == "phi3") for mod in moes)
    for mod in moes:
        mod.top_k = mod.experts
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, dense, atol=1e-4, rtol=1e-4)


def test_moefy_refuses_an_ffn_without_its_own_module(calibration):
    from transformers import (  # fc1/fc2 sit in the decoder layer itself
        OPTConfig,
        OPTForCausalLM,
    )

    model = OPTForCausalLM(OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=64)).eval()
    with pytest.raises(UnsupportedModelError, match=r"\['fc1', 'fc2'\] of OPTDecoderLayer sit directly in the block"):
        moefy_(model, MoefyConfig(experts=4, shared=0, top_k=2), calibration[:4, :64])


def test_moefy_reads_gemmas_activation_name(calibration):
    from transformers import (  # hidden_activation, not hidden_act
        Gemma2Config,
        Gemma2ForCausalLM,
    )

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    moefy_(model, MoefyConfig(experts=4, shared=0, top_k=4 - 1, rows=128, refit=False), calibration[:4, :64])
    assert model.model.layers[0].mlp.activation == "gelu_pytorch_tanh"
    for block in model.model.layers:
        block.mlp.top_k = 4
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, dense, atol=1e-4, rtol=1e-4)


def test_exporting_a_moe_model_is_refused(tiny_dir, tmp_path, calibration):
    m = load_model(tiny_dir, device="cpu")
    moefy_(m.model, MoefyConfig(experts=8, shared=0, top_k=4, rows=128), calibration)
    save_model(m.model, m.tokenizer, tmp_path / "moe")
    with pytest.raises(UnsupportedModelError, match="MoE"):
        export(tmp_path / "moe", tmp_path / "out", "hf")
