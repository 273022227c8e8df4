"""Self-speculation and early exit: one KV cache in two parts, lossless verification, the exit head's
training and checks, the threshold sweep, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import tiny_llama
from tests.test_speculate import _chi_square_ok, second_token_marginal

from leanlm.errors import ConfigError, LeanLMError
from leanlm.runtime.generate import generate
from leanlm.speculate import DraftLength, Sampling, SpecStats, speculative_generate
from leanlm.speculate.early_exit import ExitStats, early_exit_generate, exit_quality
from leanlm.speculate.exit_head import ExitHead, load_exit_head, save_exit_head, train_exit_head
from leanlm.speculate.exit_ops import pick_threshold
from leanlm.speculate.self_draft import SelfDraft
from leanlm.speculate.split import LayerSplit


def _disagreeing_model(vocab: int = 96):
    """A 4-block model whose last two blocks move the residual stream a lot, so that an exit after block 2
    is often wrong: the rejection and rollback paths run."""
    model = tiny_llama(vocab, layers=4, seed=0)
    for block in model.model.layers[2:]:
        block.mlp.down_proj.weight.data.mul_(40)
    return model


def _prompts(vocab: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (1, 6 + i % 9), generator=gen) for i in range(count)]


def test_split_parts_reproduce_the_full_forward():
    model = tiny_llama(96, layers=4, seed=1)
    split = LayerSplit(model, 3)
    ids = _prompts(96, 1)[0]
    with torch.inference_mode():
        want = model(ids).logits[0]
        from leanlm.runtime.generate import new_cache
        cache = new_cache(model)
        got = split.deep_logits(split.shallow(ids[0].tolist(), cache), cache)
    assert torch.allclose(got, want, atol=1e-5)
    assert cache.get_seq_length(0) == cache.get_seq_length(3) == ids.shape[1]


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_greedy_self_speculation_is_plain_greedy_with_rejections(layer):
    model = _disagreeing_model()
    split = LayerSplit(model, layer)
    drafter = SelfDraft(split, ExitHead(split.norm, 64, 0).eval())
    stats = SpecStats()
    for ids in _prompts(96, 12):
        want = generate(model, ids, 30)
        got = speculative_generate(model, ids, 30, drafter, length=DraftLength(start=3, most=6), stats=stats)
        assert torch.equal(got, want)
    assert 0 < stats.accepted < stats.drafted  # both kept and rejected drafts were exercised


def test_confidence_stop_and_eos_keep_output_exact():
    model = _disagreeing_model()
    split = LayerSplit(model, 2)
    ids = _prompts(96, 1, seed=3)[0]
    plain = generate(model, ids, 25)[0].tolist()
    eos = plain[9]
    drafter = SelfDraft(split, ExitHead(split.norm, 64, 0).eval(), stop_below=0.5)
    got = speculative_generate(model, ids, 25, drafter, eos_token_id=eos)
    assert torch.equal(got, generate(model, ids, 25, eos_token_id=eos)) and got[0, -1] == eos


def test_sampled_self_speculation_follows_the_targets_distribution():
    vocab, trials = 10, 1200
    model = tiny_llama(vocab, layers=3, seed=0)
    model.lm_head.weight.data.mul_(4)
    split = LayerSplit(model, 1)
    ids = torch.tensor([[1, 2, 3, 4]])
    p2 = second_token_marginal(model, ids, vocab)
    sampling = Sampling(temperature=1.0, generator=torch.Generator().manual_seed(0))
    drafter = SelfDraft(split, ExitHead(split.norm, 32, 0).eval())
    counts = torch.zeros(vocab)
    for _ in range(trials):
        counts[speculative_generate(model, ids, 2, drafter, sampling=sampling, length=DraftLength(start=2))[0, 1]] += 1
    assert _chi_square_ok(counts, p2)


def test_early_exit_thresholds_bound_what_leaves():
    model = _disagreeing_model()
    split = LayerSplit(model, 2)
    head = ExitHead(split.norm, 64, 0).eval()
    for ids in _prompts(96, 6):
        plain = generate(model, ids, 20)
        never = ExitStats()
        assert torch.equal(early_exit_generate(model, head, split, ids, 20, 1.01, stats=never), plain)
        assert never.exited == 0 and never.deep_passes == never.tokens
        always = ExitStats()
        out = early_exit_generate(model, head, split, ids, 20, 0.0, stats=always)
        assert always.exited == always.tokens == out.shape[1] - 1 and always.deep_passes == 0


def test_early_exit_generation_matches_the_sweep_it_was_calibrated_on():
    """Teacher-forced on a model's own greedy output, a token exits in the sweep exactly when it does in
    generation, so the exit share the sweep reports is the one generation sees."""
    model = _disagreeing_model()
    split = LayerSplit(model, 2)
    head = ExitHead(split.norm, 64, 0).eval()
    ids = _prompts(96, 1, seed=5)[0]
    stats = ExitStats()
    out = early_exit_generate(model, head, split, ids, 24, 0.3, stats=stats)
    text = torch.cat([ids, out], 1)
    with torch.inference_mode():
        from leanlm.speculate.exit_head import exit_logits_on
        from leanlm.speculate.exit_ops import confidence
        _, exit_ = exit_logits_on(model, head, split, text)
    conf = confidence(exit_[0, ids.shape[1]:-1])  # decisions for generated tokens 2..n
    assert int((conf >= 0.3).sum()) == stats.exited


def test_sweep_and_threshold_pick():
    model = _disagreeing_model()
    split = LayerSplit(model, 2)
    head = ExitHead(split.norm, 64, 0).eval()
    windows = torch.randint(1, 96, (3, 32), generator=torch.Generator().manual_seed(0))
    rows = exit_quality(model, head, split, windows, [0.0, 0.5, 1.01])
    assert rows[0]["exit_share"] == 1.0 and rows[-1]["exit_share"] == 0.0
    assert rows[-1]["kld"] == 0.0 and rows[-1]["top1"] == 1.0 and rows[0]["kld"] >= rows[1]["kld"] >= 0
    assert pick_threshold(rows, 1e9)["threshold"] == 0.0
    assert pick_threshold(rows, 0.0)["threshold"] == 1.01
    assert pick_threshold([{"threshold": 0.5, "kld": 1.0, "exit_share": 0.5}], 0.1) is None


def test_exit_head_trains_toward_the_full_model_and_round_trips(tiny, tmp_path):
    model = _disagreeing_model(len(tiny.tokenizer))
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n\n" * 60
    split = LayerSplit(model, 2)
    windows = tiny.tokenizer(text, return_tensors="pt")["input_ids"][0][:96].view(3, 32)
    before = exit_quality(model, ExitHead(split.norm, 64, 0).eval(), split, windows, [0.0])[0]
    head, stats = train_exit_head(model, tiny.tokenizer, text, 2, steps=60, width=64, seq_len=32, lr=3e-3)
    after = exit_quality(model, head, split, windows, [0.0])[0]
    assert stats["final_kl"] < stats["first_kl"] and after["kld"] < before["kld"]
    save_exit_head(head, split, tmp_path / "exit", stats)
    with pytest.raises(LeanLMError, match="already exists"):
        save_exit_head(head, split, tmp_path / "exit")
    loaded, split2 = load_exit_head(tmp_path / "exit", model)
    ids = windows[:1]
    from leanlm.speculate.exit_head import exit_logits_on
    assert torch.equal(exit_logits_on(model, head, split, ids)[1], exit_logits_on(model, loaded, split2, ids)[1])
    with pytest.raises(ConfigError, match="trained on another model"):
        load_exit_head(tmp_path / "exit", _disagreeing_model(len(tiny.tokenizer)).requires_grad_(False).apply(
            lambda m: m.weight.data.add_(0.1) if isinstance(m, torch.nn.Linear) else None))
    with pytest.raises(ConfigError, match="no exit head"):
        load_exit_head(tmp_path, model)


def test_exit_layer_outside_the_blocks_and_sliding_window_models_are_refused():
    from leanlm.errors import UnsupportedModelError

    model = tiny_llama(96, layers=2)
    for bad in (0, 2, -1):
        with pytest.raises(ConfigError, match="outside the model's blocks: it has 2"):
            LayerSplit(model, bad)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="sliding_attention layers"):
        LayerSplit(model, 1)


def test_exit_head_cli_and_self_and_early_exit_bench(tiny_dir, tmp_path, capsys):
    from leanlm.cli import main

    out = tmp_path / "exit"
    assert main(["distill", str(tiny_dir), "--exit-layer", "1", "--exit-steps", "3", "--seq-len", "64",
                 "--out", str(out)]) == 0
    assert "exit share" in capsys.readouterr().out
    assert json.loads((out / "exit_head.json").read_text())["layer"] == 1
    assert main(["distill", str(tiny_dir), "--exit-layer", "1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["distill", str(tiny_dir), "--exit-layer", "5", "--out", str(tmp_path / "x")]) == 2
    assert "outside the model's blocks" in capsys.readouterr().err
    assert main(["distill", str(tiny_dir), "--out", str(tmp_path / "y")]) == 2
    assert "--teacher" in capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": "def f(x):\n    return x + 1\n\n" * 3}) for _ in range(2)))
    common = ["--workload", str(prompts), "--new-tokens", "10", "--repeats", "1", "--warmup", "0", "--json"]
    assert main(["bench", str(tiny_dir), "--speculative", f"self:{out}", *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["identical"] and result["tokens_per_step"] >= 1
    assert main(["bench", str(tiny_dir), "--early-exit", str(out), "--kld-budget", "0.05", *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    never = [r for r in result["timed"] if r["threshold"] > 1]
    assert never and never[0]["identical_prompts"] == 2 and never[0]["exit_share"] == 0.0
    assert main(["bench", str(tiny_dir), "--speculative", "self:9", *common]) == 2
    assert "outside the model's blocks" in capsys.readouterr().err
    assert main(["bench", str(tiny_dir), "--speculative", f"self:{tmp_path}", *common]) == 2
    assert "no exit head" in capsys.readouterr().err
