"""Speculative decoding: the acceptance math, lossless greedy and sampled output, drafters, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import build_tokenizer, tiny_llama

from leanlm.errors import ConfigError, DataError
from leanlm.runtime.generate import generate
from leanlm.speculate import DraftLength, DraftModel, PromptLookup, Sampling, SpecStats, speculative_generate
from leanlm.speculate.accept_ops import accept_greedy, accept_sampled, warp


def test_greedy_acceptance_keeps_the_agreeing_prefix_then_the_targets_token():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 1, 9]):
        logits[row, best] = 5.0
    assert accept_greedy(logits, [3, 7, 1]) == (3, 9)
    assert accept_greedy(logits, [3, 2, 1]) == (1, 7)
    assert accept_greedy(logits[:1], []) == (0, 3)


def _first_token_counts(p, q, trials, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1])
    for _ in range(trials):
        x = int(torch.multinomial(q, 1, generator=gen)) if q is not None else 2
        kept, token = accept_sampled(torch.stack([p, p]), [x], q[None] if q is not None else None, gen)
        counts[x if kept else token] += 1
    return counts


def _chi_square_ok(counts, p):
    """Pearson's chi-square test at p = 0.001 (Wilson-Hilferty's approximation of the critical value), over
    the categories with an expected count of at least 5."""
    expected = p * counts.sum()
    keep = expected >= 5
    stat = float((((counts - expected) ** 2 / expected)[keep]).sum() + (counts[~keep].sum() - expected[~keep].sum())
                 ** 2 / max(float(expected[~keep].sum()), 1e-9) * bool((~keep).any()))
    df = int(keep.sum()) - 1 + int((~keep).any())
    critical = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3
    return stat < critical


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_rule_emits_the_targets_distribution(deterministic):
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(6, generator=gen) * 1.5, -1)
    q = None if deterministic else torch.softmax(torch.randn(6, generator=gen) * 1.5, -1)
    counts = _first_token_counts(p, q, 6000, seed=2)
    assert _chi_square_ok(counts, p)
    # and the test can fail: the draft's own distribution is not the target's
    if q is not None:
        assert not _chi_square_ok(torch.bincount(torch.multinomial(q, 6000, replacement=True, generator=gen),
                                                 minlength=6).float(), p)


def test_warp_matches_nucleus_sampling_mass():
    probs = warp(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 1.0, 0.7)
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], 3)[0] == [8, 9, 1]
    assert lookup.propose([5, 6, 7, 1, 5, 6, 2, 4, 6], 2)[0] == [2, 4]  # 1-gram: the latest earlier 6
    assert lookup.propose([1, 2, 3, 4], 3)[0] == []
    with pytest.raises(ConfigError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)


def _prompts(vocab, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        base = torch.randint(1, vocab, (12 + i,), generator=gen)
        out.append(torch.cat([base, base[: 6 + i % 5], torch.randint(1, vocab, (3,), generator=gen)])[None])
    return out


@pytest.mark.parametrize("drafter", ["lookup", "same", "other"])
def test_greedy_speculation_is_token_for_token_plain_greedy(drafter):
    target = tiny_llama(96, layers=2, seed=0)
    draft = {"lookup": PromptLookup(), "same": DraftModel(target),
             "other": DraftModel(tiny_llama(96, layers=1, seed=3))}[drafter]
    stats = SpecStats()
    for ids in _prompts(96, 16):
        want = generate(target, ids, 40)
        got = speculative_generate(target, ids, 40, draft, length=DraftLength(start=3, most=6), stats=stats)
        assert torch.equal(got, want)
    assert stats.drafted > 0
    if drafter == "same":
        assert stats.acceptance_rate > 0.95 and stats.tokens_per_step > 3


def test_greedy_speculation_stops_at_eos_and_the_token_limit():
    target = tiny_llama(64, seed=0)
    ids = _prompts(64, 1)[0]
    plain = generate(target, ids, 30)[0].tolist()
    eos = plain[7]
    want = generate(target, ids, 30, eos_token_id=eos)
    got = speculative_generate(target, ids, 30, DraftModel(target), eos_token_id=eos)
    assert torch.equal(got, want) and got[0, -1] == eos
    assert speculative_generate(target, ids, 5, DraftModel(target)).shape == (1, 5)


def second_token_marginal(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The exact distribution of the second token sampled after `ids` (temperature 1)."""
    with torch.inference_mode():
        p1 = torch.softmax(model(ids).logits[0, -1], -1)
        firsts = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
        return (p1[:, None] * torch.softmax(model(firsts).logits[:, -1], -1)).sum(0)


def test_sampled_speculation_follows_the_targets_distribution():
    """Over a 10-token vocabulary, the second generated token's frequency under speculative sampling with a
    different draft model matches the exact marginal computed from the target."""
    vocab, trials = 10, 1500
    target, other = tiny_llama(vocab, seed=0), tiny_llama(vocab, seed=5)
    for model in (target, other):  # sharper distributions, so that the drafts are sometimes right
        model.lm_head.weight.data.mul_(4)
    ids = torch.tensor([[1, 2, 3, 4]])
    p2 = second_token_marginal(target, ids, vocab)
    sampling = Sampling(temperature=1.0, generator=torch.Generator().manual_seed(0))
    stats, counts = SpecStats(), torch.zeros(vocab)
    drafter = DraftModel(other)
    for _ in range(trials):
        out = speculative_generate(target, ids, 2, drafter, sampling=sampling, length=DraftLength(start=2), stats=stats)
        counts[out[0, 1]] += 1
    assert stats.accepted > 0 and stats.accepted < stats.drafted
    assert _chi_square_ok(counts, p2)


def test_speculation_refuses_a_batch():
    target = tiny_llama(32)
    with pytest.raises(ValueError, match="one sequence at a time"):
        speculative_generate(target, torch.ones(2, 4, dtype=torch.long), 4, PromptLookup())


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory):
    tok = build_tokenizer(vocab_size=300)
    path = tmp_path_factory.mktemp("other-vocab")
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_drafter_modes_and_their_refusals(tiny, tiny_dir, other_vocab_dir, tmp_path, tokenizer):
    from leanlm.speculate.spec import make_drafter

    assert make_drafter("lookup:4", tiny).max_ngram == 4
    assert isinstance(make_drafter(f"draft:{tiny_dir}", tiny), DraftModel)
    with pytest.raises(ConfigError, match="unknown speculative mode 'medusa'.*lookup.*self:DIR"):
        make_drafter("medusa", tiny)
    with pytest.raises(ConfigError, match="outside the model's blocks"):
        make_drafter("self:3", tiny)
    with pytest.warns(UserWarning, match="rarely agrees"):
        assert make_drafter("self:1", tiny).split.layer == 1
    with pytest.raises(ConfigError, match="lookup:N takes"):
        make_drafter("lookup:x", tiny)
    with pytest.raises(ConfigError, match="needs the draft model"):
        make_drafter("draft:", tiny)
    with pytest.raises(ConfigError, match="vocabulary"):
        make_drafter(f"draft:{other_vocab_dir}", tiny)
    bigger = tmp_path / "bigger"
    tiny_llama(len(tokenizer), layers=4).save_pretrained(bigger)
    tokenizer.save_pretrained(bigger)
    with pytest.warns(UserWarning, match="cannot pay"):
        make_drafter(f"draft:{bigger}", tiny)


def test_drafter_with_a_different_tokenizer_is_refused(tiny, tmp_path, tokenizer):
    from leanlm.speculate.spec import make_drafter

    other = build_tokenizer(vocab_size=len(tokenizer), split=r"\w+|\s+|[^\w\s]+")
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        make_drafter(f"draft:{tmp_path}", tiny)


def test_workloads_and_prompt_files(tokenizer, tmp_path):
    from leanlm.data.corpus import default_corpus
    from leanlm.speculate.workload import build_prompts, read_prompts

    text = default_corpus().eval
    grounded, chat = build_prompts("grounded", tokenizer, text, 6), build_prompts("chat", tokenizer, text, 6)
    assert len(grounded) == len(set(grounded)) == 6 and len(chat) == 6
    assert all(len(g) > 1000 for g in grounded) and all(len(c) < 400 for c in chat)
    with pytest.raises(DataError, match="unknown workload"):
        build_prompts("poetry", tokenizer, text, 2)
    with pytest.raises(DataError, match="fewer than the 500"):
        build_prompts("grounded", tokenizer, text, 500)
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a b c"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert read_prompts(good, tokenizer)[0] == "a b c" and "hi" in read_prompts(good, tokenizer)[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: a record needs"):
        read_prompts(bad, tokenizer)
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        read_prompts(bad, tokenizer)


def test_bench_speculative_cli(tiny_dir, tmp_path, capsys):
    from leanlm.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": "def f(x):\n    return x + 1\n\n" * 3}) for _ in range(2)))
    args = ["bench", str(tiny_dir), "--speculative", f"draft:{tiny_dir}", "--workload", str(prompts),
            "--new-tokens", "12", "--repeats", "1", "--warmup", "0", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["identical"] and result["acceptance_rate"] > 0.9 and len(result["prompts"]) == 2
    assert main(["bench", str(tiny_dir), "--speculative", "lookup", "--runtime", "llama.cpp"]) == 2
    assert "llama-server --model-draft" in capsys.readouterr().err
    assert main(["bench", str(tiny_dir), "--speculative", "nope"]) == 2
    assert "valid: lookup" in capsys.readouterr().err


def test_prepacked_linears_match_eager_and_leave_training_alone():
    from leanlm.runtime.onednn_linear import PackedLinear, has_float_linears, pack_linears

    model = tiny_llama(96, seed=0)
    ids = _prompts(96, 1)[0]
    with torch.inference_mode():
        want = model(ids).logits
    count = pack_linears(model)
    assert count == sum(isinstance(m, PackedLinear) for m in model.modules()) > 0
    assert not has_float_linears(model)
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, want, atol=1e-4)
    model.train()  # gradients flow through the dense weight, which the packed copy does not hide
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    with pytest.raises(ValueError, match="no float32 CPU nn.Linear"):
        pack_linears(model)


def test_bench_prepack_flag(tiny_dir, capsys):
    from leanlm.cli import main

    assert main(["bench", str(tiny_dir), "--prepack", "--prompt-tokens", "16", "--decode-prompt-tokens", "8",
                 "--new-tokens", "4", "--batch", "2", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["config"]["prepack"] and result["decode_tps"] > 0
