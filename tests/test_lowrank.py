"""Low-rank factorization: the whitened SVD's error, rank allocation, the step, saving, composing, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import tiny_llama

from leanlm.core.config import parse_config
from leanlm.errors import ConfigError, LeanLMError, UnsupportedModelError
from leanlm.lowrank.lowrank import LowRankConfig, factorize_lowrank
from leanlm.lowrank.lowrank_linear import LowRankLinear
from leanlm.lowrank.lowrank_ops import (
    allocate_ranks,
    cholesky_factor,
    factorize,
    max_saving_rank,
    spectrum,
    uniform_ranks,
)


def _correlated_inputs(n=2000, d=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) * torch.logspace(0, -2, d)[None]
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix.double().T


def test_whitened_truncation_error_is_the_dropped_spectrum_and_beats_plain_svd():
    X = _correlated_inputs()
    W = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    S = cholesky_factor(X.T @ X, damp=1e-9)
    sigma = spectrum(W, S)
    for rank in (4, 12, 30):
        A, B = factorize(W, S, rank)
        err = ((X @ (W - A @ B).T) ** 2).sum()
        assert torch.isclose(err, (sigma[rank:] ** 2).sum(), rtol=1e-6)
        A0, B0 = factorize(W, None, rank)
        assert err < ((X @ (W - A0 @ B0).T) ** 2).sum()  # whitening pays on correlated inputs
    A, B = factorize(W, None, 48 - 8)
    assert torch.allclose(torch.linalg.matrix_rank(A @ B), torch.tensor(40))


def test_cholesky_survives_a_singular_covariance():
    X = _correlated_inputs(n=10)  # 10 rows, 48 columns: rank 10
    S = cholesky_factor(X.T @ X, damp=0.0)
    assert torch.isfinite(S).all()


def test_allocation_meets_the_budget_and_spends_it_where_errors_are_small():
    shapes = {"flat": (64, 64), "steep": (64, 64)}
    spectra = {"flat": torch.ones(64), "steep": torch.logspace(0, -4, 64) ** 2}
    dense = 2 * 64 * 64
    ranks = allocate_ranks(spectra, shapes, int(dense * 0.6), relative=True)
    params = sum(64 * 64 if r is None else r * 128 for r in ranks.values())
    assert dense * 0.55 <= params <= dense * 0.6
    assert ranks["flat"] is None or ranks["flat"] > ranks["steep"]  # the steep spectrum loses little per value
    assert allocate_ranks(spectra, shapes, dense) == {"flat": None, "steep": None}
    # in loss units (not relative), a layer the loss ignores gives up its rank first, whatever its spectrum
    costs = {"flat": torch.ones(64) * 1e-6, "steep": torch.logspace(0, -4, 64) ** 2}
    ranks = allocate_ranks(costs, shapes, int(dense * 0.6))
    assert ranks["steep"] is None and ranks["flat"] is not None
    with pytest.raises(LeanLMError, match="remove a smaller share"):
        allocate_ranks(spectra, shapes, 10)
    assert uniform_ranks(shapes, 0.5) == {"flat": 16, "steep": 16}
    with pytest.raises(LeanLMError, match="rank 0"):
        uniform_ranks({"tiny": (2, 2)}, 0.1)
    assert max_saving_rank(64, 64) == 31


@pytest.fixture
def calibration():
    return torch.randint(1, 320, (8, 48), generator=torch.Generator().manual_seed(0))


def _kld(a, b, ids):
    with torch.no_grad():
        p, q = torch.log_softmax(a(ids).logits, -1), torch.log_softmax(b(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("method", ["svd_llm", "asvd", "svd"])
@pytest.mark.parametrize("allocation", ["sensitivity", "uniform"])
def test_step_removes_the_asked_share_and_the_model_still_predicts(method, allocation, calibration):
    original = tiny_llama(320, layers=2, hidden=64)
    model = copy.deepcopy(original)
    report = factorize_lowrank(model, LowRankConfig(params_removed=0.3, method=method, allocation=allocation,
                                                    rank_multiple=1), calibration)
    assert abs(report["params_removed"] - 0.3) < 0.03
    assert report["layers_factorized"] == sum(isinstance(m, LowRankLinear) for m in model.modules()) > 0
    assert _kld(original, model, calibration) < 0.05


def test_loss_costs_weight_directions_by_the_output_fisher():
    from leanlm.lowrank.lowrank_ops import loss_costs

    W = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    costs = loss_costs(W, None, torch.tensor([0.0, 1.0, 4.0]))
    assert torch.allclose(costs, torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64))  # sigma^2 * fisher / 2


def test_output_fisher_is_the_mean_squared_gradient_per_channel(calibration):
    from leanlm.lowrank.fisher import output_fisher

    model = tiny_llama(320, layers=2, hidden=64)
    layer = model.model.layers[1].mlp.down_proj
    fisher = output_fisher(model, {"down": layer}, calibration[:2], batch_size=1)["down"]
    grads = []
    def keep(module, args, out):
        out.register_hook(grads.append)

    handle = layer.register_forward_hook(keep)
    for i in range(2):
        ids = calibration[i:i + 1]
        out = model(input_ids=ids, labels=ids)
        (out.loss * (ids.shape[1] - 1)).backward()
    handle.remove()
    want = sum(g.double().pow(2).sum(dim=(0, 1)) for g in grads) / (2 * (calibration.shape[1] - 1))
    assert torch.allclose(fisher, want, rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_whitening_beats_plain_svd_on_the_model(calibration):
    original = tiny_llama(320, layers=2, hidden=64)
    klds = {}
    for method in ("svd", "svd_llm"):
        model = copy.deepcopy(original)
        factorize_lowrank(model, LowRankConfig(params_removed=0.4, method=method, allocation="uniform"), calibration)
        klds[method] = _kld(original, model, calibration)
    assert klds["svd_llm"] < klds["svd"]


def test_saved_factorized_model_loads_back_and_quantizes(tiny, tmp_path, calibration):
    from leanlm.models.load import load_model
    from leanlm.models.save import save_model
    from leanlm.quantize import quantize_
    from leanlm.quantize.rtn import RTNConfig

    model = tiny.model
    factorize_lowrank(model, LowRankConfig(params_removed=0.25, ranks={"*.o_proj": 8}), calibration)
    assert model.model.layers[0].self_attn.o_proj.rank == 8
    save_model(model, tiny.tokenizer, tmp_path / "lr")
    back = load_model(tmp_path / "lr", device="cpu")
    assert _kld(model, back.model, calibration) < 1e-9
    quantize_(back.model, RTNConfig(bits=8))  # the factors are plain linears: later steps reach them
    factored = [m for m in back.model.modules() if isinstance(m, LowRankLinear)]
    assert len(factored) > 1 and all(type(m.down).__name__ == type(m.up).__name__ == "Int8Linear" for m in factored)
    save_model(back.model, back.tokenizer, tmp_path / "lr8")
    again = load_model(tmp_path / "lr8", device="cpu")
    assert _kld(back.model, again.model, calibration) < 1e-9


def test_gguf_export_refuses_factorized_layers_with_the_reason(tiny, tmp_path, calibration):
    from leanlm.export.gguf_export import export_gguf

    factorize_lowrank(tiny.model, LowRankConfig(params_removed=0.2), calibration)
    with pytest.raises(UnsupportedModelError, match="no factorized"):
        export_gguf(tiny.model, tiny.tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_configs_are_refused_with_the_reason(tiny):
    with pytest.raises(ConfigError, match=r"params_removed .* in \(0, 1\)"):
        LowRankConfig(params_removed=1.0)
    with pytest.raises(ConfigError, match="rank 0"):
        LowRankConfig(ranks={"*": 0})
    with pytest.raises(ConfigError, match="unknown.*rnak"):
        parse_config(LowRankConfig, {"rnak": 3}, "step")
    with pytest.raises(ConfigError, match="not below its full rank 64"):
        LowRankConfig(ranks={"*.q_proj": 64}).check(tiny.model)
    with pytest.raises(ConfigError, match="needs calibration"):
        from leanlm.core.layerwise import check_calibration

        check_calibration(tiny.model, LowRankConfig(), None)


def test_a_later_grouped_quantizer_that_cannot_take_the_factors_is_refused_before_any_work(tiny):
    from leanlm.core.step import check_steps, parse_step

    steps = [parse_step({"type": "lowrank"}, "s0"), parse_step({"type": "rtn", "bits": 8, "group_size": 64}, "s1")]
    with pytest.raises(ConfigError, match=r"steps\[0\] \(lowrank\): steps\[1\] \(rtn\) needs input dimensions "
                                          r"that are multiples of 64.*set rank_multiple to a multiple of 64"):
        check_steps(tiny.model, steps)
    with pytest.raises(ConfigError, match="can be 24"):  # a hand-set rank too
        check_steps(tiny.model, [parse_step({"type": "lowrank", "rank_multiple": 32, "ranks": {"*.o_proj": 24}},
                                            "s0"), parse_step({"type": "rtn", "group_size": 32}, "s1")])
    check_steps(tiny.model, [parse_step({"type": "lowrank", "rank_multiple": 64}, "s0"), steps[1]])
    check_steps(tiny.model, [steps[0], parse_step({"type": "rtn", "bits": 8}, "s1")])  # per-channel fits any rank


def test_recipe_runs_through_optimize(tiny_dir, tmp_path):
    from leanlm.cli import main

    recipe = tmp_path / "lr.yaml"
    recipe.write_text("name: lr\nsteps:\n  - type: lowrank\n    params_removed: 0.2\n"
                      "calibration: {samples: 4, length: 32}\n")
    out = tmp_path / "out"
    assert main(["optimize", str(tiny_dir), "--recipe", str(recipe), "--out", str(out), "--no-bench"]) == 0
    assert "low_rank" in (out / "model" / "leanlm.json").read_text()
    report = json.loads((out / "report.json").read_text())
    assert abs(report["steps"][0]["stats"]["params_removed"] - 0.2) < 0.05
