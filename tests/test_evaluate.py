import json
import math

import pytest
import torch

from leanlm.data.corpus import default_corpus, tokenize
from leanlm.errors import ConfigError, DataError
from leanlm.measure.evaluate import (
    Task,
    eval_windows,
    evaluate,
    load_tasks,
    prepare_reference,
    score_tasks,
    score_windows,
)
from tests.conftest import tiny_llama


def test_perplexity_matches_plain_transformers_loss(tiny):
    text = default_corpus().eval[:20_000]
    windows = eval_windows(tiny.tokenizer, text, 128)
    ours = score_windows(tiny.model, windows)["perplexity"]
    with torch.no_grad():  # the textbook computation: mean token NLL from transformers' own loss
        losses = [tiny.model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert ours == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)


def test_self_reference_gives_zero_kld_and_full_agreement(tiny):
    windows = eval_windows(tiny.tokenizer, default_corpus().eval[:20_000], 128)
    ref = prepare_reference(tiny, windows)
    out = score_windows(tiny.model, windows, reference=ref)
    assert abs(out["kld"]) < 1e-5 and out["top1"] == 1.0
    assert ref.perplexity == pytest.approx(out["perplexity"], rel=1e-6)


def test_kld_and_top1_match_a_direct_computation(tiny, tokenizer):
    windows = eval_windows(tiny.tokenizer, default_corpus().eval[:10_000], 64)
    ref = prepare_reference(tiny, windows)
    other = tiny_llama(len(tokenizer), seed=1)
    out = score_windows(other, windows, reference=ref)
    with torch.no_grad():
        p = torch.log_softmax(tiny.model(input_ids=windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(other(input_ids=windows).logits[:, :-1].double(), -1)
    kld = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert out["kld"] == pytest.approx(kld, rel=2e-3) and out["kld"] > 0
    assert out["top1"] == pytest.approx(top1, abs=1e-9)


def test_a_tokenizer_or_reference_of_another_model_is_refused(tiny, tokenizer):
    windows = eval_windows(tiny.tokenizer, default_corpus().eval[:5_000], 64)
    smaller = tiny_llama(len(tokenizer) // 2)  # the tokenizer's ids run past its embedding
    with pytest.raises(DataError, match=r"the evaluation text holds token id \d+ .* embedding has 160 rows"):
        score_windows(smaller, windows)
    ref = prepare_reference(tiny, windows)
    larger = tiny_llama(len(tokenizer) + 64)
    with pytest.raises(DataError, match="the reference scores 320 tokens per position and this model 384"):
        score_windows(larger, windows, reference=ref)


def test_reference_cache_is_reused(tiny):
    windows = eval_windows(tiny.tokenizer, default_corpus().eval[:5_000], 64)
    first = prepare_reference(tiny, windows).cache.path
    mtime = (first / "logprobs.f16").stat().st_mtime_ns
    assert prepare_reference(tiny, windows).cache.path == first
    assert (first / "logprobs.f16").stat().st_mtime_ns == mtime


def test_task_accuracy_is_loglikelihood_argmax(tiny):
    tasks = [Task("The keyword to define a function is", ["def", "xyzzy qq"], 0),
             Task("A list is written with", ["square brackets", "zz"], 1)]
    out = score_tasks(tiny.model, tiny.tokenizer, tasks)
    from leanlm.measure.evaluate import _choice_loglik

    expected = 0
    for t in tasks:
        lls = [_choice_loglik(tiny.model, tiny.tokenizer, t.question, c, "cpu")[0] for c in t.choices]
        expected += int(lls.index(max(lls)) == t.answer)
    assert out["task_accuracy"] == expected / 2 and out["tasks"] == 2


def test_choice_loglik_scores_only_the_continuation(tiny):
    from leanlm.measure.evaluate import _choice_loglik

    q, c = "import os and", "sys"
    ll, _ = _choice_loglik(tiny.model, tiny.tokenizer, q, c, "cpu")
    ctx = tokenize(tiny.tokenizer, q)
    full = tokenize(tiny.tokenizer, q + " " + c)
    with torch.no_grad():
        lp = torch.log_softmax(tiny.model(input_ids=full[None]).logits[0].float(), -1)
    want = sum(lp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))
    assert ll == pytest.approx(want, rel=1e-5)


def test_task_file_errors(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n" +
                 json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: 'answer' must be an index"):
        load_tasks(f)
    f.write_text("{not json}\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: malformed JSON"):
        load_tasks(f)
    f.write_text(json.dumps({"question": "q", "choices": "ab", "answer": 0}))
    with pytest.raises(DataError, match="list of at least two non-blank strings"):
        load_tasks(f)
    f.write_text(json.dumps({"question": "q", "choices": ["a", " "], "answer": 0}))
    with pytest.raises(DataError, match="non-blank strings"):
        load_tasks(f)
    f.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": True}))
    with pytest.raises(DataError, match="'answer' must be an index into choices .0..1., got True"):
        load_tasks(f)
    f.write_text(json.dumps({"question": None, "choices": ["a", "b"], "answer": 0}))
    with pytest.raises(DataError, match="'question' must be a string, got NoneType"):
        load_tasks(f)


def test_evaluate_collects_everything(tiny):
    out = evaluate(tiny, eval_windows(tiny.tokenizer, default_corpus().eval[:8_000], 64), prompts=["def"])
    assert out["windows"] >= 1 and out["perplexity"] > 1 and "def" in out["generations"]


def test_evaluate_takes_text_or_the_built_in_eval_split_and_refuses_what_it_cannot_score(tiny):
    built_in = evaluate(tiny)
    expected = score_windows(tiny.model, eval_windows(tiny.tokenizer, default_corpus().eval))["perplexity"]
    assert built_in["perplexity"] == pytest.approx(expected)
    text = default_corpus().eval[:20000]
    assert evaluate(tiny, text)["perplexity"] == pytest.approx(evaluate(tiny, eval_windows(tiny.tokenizer, text))["perplexity"])
    with pytest.raises(DataError, match="fewer than one 512-token window"):
        evaluate(tiny, "too short")
    with pytest.raises(DataError, match=r"windows must be a text or token ids, an integer tensor"):
        evaluate(tiny, torch.rand(2, 8))
    with pytest.raises(ConfigError, match="evaluate takes a LoadedModel .*got LlamaForCausalLM; build one with leanlm.load_model"):
        evaluate(tiny.model)


def test_logit_cache_keeps_the_newest_entries_when_full():
    from leanlm.measure.refcache import KEEP, LogitCache, cache_root

    for i in range(KEEP + 2):
        cache = LogitCache.create(f"entry{i}", (1, 3, 5))
        cache.write(0, torch.log_softmax(torch.randn(3, 5), -1))
        cache.finish({"perplexity": float(i)})
        assert LogitCache.open(f"entry{i}") is not None  # a new entry survives a full cache
    assert sorted(p.name for p in cache_root().iterdir()) == [f"entry{i}" for i in range(2, KEEP + 2)]
