import pytest
import torch

from leanlm.errors import ConfigError, LeanLMError
from leanlm.pipeline.recipe import parse_recipe
from leanlm.prune import (
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    prune_,
    prune_ops,
)
from leanlm.core.registry import register_step
from leanlm.prune.base import PRUNERS, finish
from leanlm.quantize import RTNConfig


def correlated_inputs(n=1024, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.linspace(0.05, 3, dim)
    return torch.randn(n, dim, generator=g) @ mix


def output_error(w, pruned, x):
    return ((x @ w.T - x @ pruned.T) ** 2).mean().item()


def test_nm_mask_keeps_n_of_every_m():
    scores = torch.rand(8, 16)
    mask = prune_ops.nm_mask(scores, 2, 4)
    assert (mask.reshape(8, 4, 4).sum(-1) == 2).all()
    kept = scores.masked_fill(mask, -1).reshape(8, 4, 4).max(-1).values
    dropped = scores.masked_fill(~mask, 2).reshape(8, 4, 4).min(-1).values
    assert (kept >= dropped).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_ops.nm_mask(torch.rand(2, 6), 2, 4)


def test_row_and_matrix_masks_hit_the_sparsity():
    s = torch.rand(10, 40)
    assert (prune_ops.row_mask(s, 0.5).sum(1) == 20).all()
    assert prune_ops.matrix_mask(s, 0.25).sum() == 100


def sparsegpt_layer(pattern):
    """A random layer, correlated inputs, their Hessian, and SparseGPT's weights and mask at 50%."""
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), correlated_inputs()
    H = x.T @ x / len(x)
    return w, x, H, *prune_ops.sparsegpt(w, H, 0.5, pattern)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_the_layer_output(pattern):
    w, x, H, pruned, mask = sparsegpt_layer(pattern)
    assert (pruned[mask] == 0).all() and mask.float().mean().item() == pytest.approx(0.5, abs=0.01)
    if pattern:
        assert (mask.reshape(48, 16, 4).sum(-1) == 2).all()
    magnitude = w.masked_fill(prune_ops.magnitude_mask(w, 0.5, pattern), 0)
    wanda = w.masked_fill(prune_ops.wanda_mask(w, x.norm(dim=0), 0.5, pattern), 0)
    ours = output_error(w, pruned, x)
    assert ours < output_error(w, wanda, x) and ours < output_error(w, magnitude, x)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_masked_refit_is_the_least_squares_optimum_for_the_mask(pattern):
    w, x, H, pruned, mask = sparsegpt_layer(pattern)
    refit = prune_ops.masked_refit(w, H, mask, damp=1e-7, start=pruned, iterations=300)
    assert (refit[mask] == 0).all()
    assert output_error(w, refit, x) < 0.95 * output_error(w, pruned, x)
    for r in (0, 5, 47):  # rows keep different columns; each is its own least-squares problem
        kept = ~mask[r]
        direct = torch.linalg.lstsq(x[:, kept].double(), (x @ w[r]).double()).solution.float()
        torch.testing.assert_close(refit[r, kept], direct, atol=1e-3, rtol=1e-3)


def test_pattern_and_sparsity_are_checked():
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        parse_recipe({"steps": [{"type": "magnitude", "sparsity": 1.0}]})
    with pytest.raises(ConfigError, match="looks like '2:4'"):
        parse_recipe({"steps": [{"type": "wanda", "pattern": "half"}]})
    with pytest.raises(ConfigError, match="N must be between 1 and M - 1 = 3"):
        parse_recipe({"steps": [{"type": "sparsegpt", "pattern": "4:4"}]})
    with pytest.raises(ConfigError, match="M must be at least 2"):
        parse_recipe({"steps": [{"type": "sparsegpt", "pattern": "1:1"}]})
    assert parse_recipe({"steps": [{"type": "sparsegpt", "pattern": "2:4"}]}).steps[0].sparsity == 0.5


def test_prune_dispatch_refuses_other_configs_models_and_a_second_handler(tiny):
    with pytest.raises(ConfigError, match="prune_: no pruner for RTNConfig; known: .*MagnitudeConfig"):
        prune_(tiny.model, RTNConfig())
    with pytest.raises(ConfigError, match=r"must be a torch nn.Module \(a causal LM\); got OrderedDict: e.g. leanlm.load_model"):
        prune_(tiny.model.state_dict(), MagnitudeConfig())
    with pytest.raises(ConfigError, match="got LoadedModel: pass its .model, the nn.Module it holds"):
        prune_(tiny, MagnitudeConfig())
    with pytest.raises(ValueError, match="step type 'magnitude' registered twice"):
        register_step("magnitude", MagnitudeConfig, lambda model, config: {}, family=PRUNERS)


def test_pattern_that_does_not_divide_a_layer_is_refused(tiny):
    with pytest.raises(ConfigError, match="divisible by 48; layer .* has 64"):
        prune_(tiny.model, MagnitudeConfig(pattern="1:48"))


def test_a_layer_left_too_dense_is_an_error(tiny):
    layers = {"model.layers.0.mlp.up_proj": tiny.model.model.layers[0].mlp.up_proj}
    with pytest.raises(LeanLMError, match="did not reach their sparsity; e.g. model.layers.0.mlp.up_proj has 0.000, target 0.500"):
        finish(layers, MagnitudeConfig(sparsity=0.5))


def test_pruning_the_tiny_model_orders_the_methods(tiny_dir, tokenizer):
    from leanlm.data.corpus import calibration_samples, default_corpus
    from leanlm.measure.evaluate import eval_windows, prepare_reference, score_windows
    from leanlm.models.load import load_model

    text = default_corpus()
    calib = calibration_samples(tokenizer, text.train[:100_000], 16, 128)
    windows = eval_windows(tokenizer, text.eval[:20_000], 128)
    kld = {}
    for name, cfg in {"magnitude": MagnitudeConfig(sparsity=0.5), "wanda": WandaConfig(sparsity=0.5, batch_size=4),
                      "sparsegpt": SparseGPTConfig(sparsity=0.5, batch_size=4),
                      "wanda+refit": WandaConfig(sparsity=0.5, batch_size=4, refit=True),
                      "sparsegpt+refit": SparseGPTConfig(sparsity=0.5, batch_size=4, refit=True)}.items():
        m = load_model(tiny_dir, device="cpu")
        ref = prepare_reference(m, windows)
        stats = prune_(m.model, cfg) if name == "magnitude" else prune_(m.model, cfg, calibration=calib)
        assert stats["layers_pruned"] == 14 and stats["achieved_sparsity"] >= 0.495
        assert m.model.lm_head.weight.eq(0).float().mean() < 0.01  # skipped
        kld[name] = score_windows(m.model, windows, reference=ref)["kld"]
    assert kld["sparsegpt"] < kld["magnitude"] and kld["wanda"] < kld["magnitude"]
    assert kld["wanda+refit"] < kld["wanda"] and kld["sparsegpt+refit"] < kld["sparsegpt"]


def test_bitmask_pack_round_trips():
    from leanlm.models import sparse_storage

    w = torch.randn(7, 13)
    w[w.abs() < 0.6] = 0
    bits, values = sparse_storage.pack(w)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-w.numel() // 8) and values.numel() == (w != 0).sum()
    assert torch.equal(sparse_storage.unpack(bits, values, list(w.shape)), w)


def test_pruned_checkpoint_is_smaller_and_loads_back_exactly(tiny_dir, tmp_path):
    from leanlm.core.paths import dir_size
    from leanlm.export import export
    from leanlm.models.load import load_model
    from leanlm.models.save import save_model

    m = load_model(tiny_dir, device="cpu")
    prune_(m.model, MagnitudeConfig(sparsity=0.5))
    save_model(m.model, m.tokenizer, tmp_path / "sparse")
    dense_bytes = sum(p.numel() * 4 for n, p in m.model.named_parameters())
    weights = tmp_path / "sparse" / "leanlm-model.safetensors"
    assert weights.stat().st_size < 0.85 * dense_bytes  # 14 of the model's 16 tensors are half zeros
    back = load_model(tmp_path / "sparse", device="cpu")
    for (n, p), (_, q) in zip(m.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(p, q), n
    export(tmp_path / "sparse", tmp_path / "dense", "hf")  # plain transformers gets dense weights
    assert dir_size(tmp_path / "dense") > dir_size(tmp_path / "sparse")


def test_owl_spreads_sparsity_by_outliers_around_the_target():
    s = prune_ops.owl_sparsities([0.01, 0.03, 0.02, 0.05], target=0.5, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.5) and max(s) - min(s) == pytest.approx(0.16)
    assert s[3] == min(s) and s[0] == max(s)  # most outliers -> least pruned


def test_wanda_with_owl_prunes_each_block_to_its_own_target(tiny_dir):
    from leanlm.data.corpus import calibration_samples, default_corpus
    from leanlm.models.load import load_model

    m = load_model(tiny_dir, device="cpu")
    calib = calibration_samples(m.tokenizer, default_corpus().train, 4, 64)
    stats = prune_(m.model, WandaConfig(sparsity=0.5, owl_lambda=0.1), calibration=calib)
    assert len(stats["block_sparsity"]) == 2 and abs(stats["block_sparsity"][0] - stats["block_sparsity"][1]) == pytest.approx(0.2)
    assert stats["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ConfigError, match="OWL needs activation statistics"):
        parse_recipe({"steps": [{"type": "magnitude", "owl_lambda": 0.1}]})
    with pytest.raises(ConfigError, match="use one or the other"):
        parse_recipe({"steps": [{"type": "wanda", "owl_lambda": 0.1, "pattern": "2:4"}]})


@pytest.mark.parametrize("calibration, message", [
    (None, "WandaConfig needs calibration=token ids"),
    (torch.randn(2, 16), "must be token ids, an integer tensor .* got a 2-d torch.float32 tensor"),
    (torch.zeros(16, dtype=torch.long), "got a 1-d torch.int64 tensor"),
    (torch.zeros(0, 16, dtype=torch.long), "the calibration tensor is empty"),
    (torch.full((2, 16), 5000), "calibration data holds token id 5000 .* embedding has 320 rows"),
])
def test_calibration_a_method_cannot_use_is_refused_before_any_work(calibration, message):
    from tests.conftest import tiny_llama

    model = tiny_llama(320)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(LeanLMError, match=message):
        prune_(model, WandaConfig(), calibration=calibration)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
