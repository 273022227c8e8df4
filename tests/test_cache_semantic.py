"""The semantic cache: its guards on the cases a threshold gets wrong, the verifier's math, the pairs file's
errors, calibration and evaluation, conversation context, and `leanlm serve --cache exact,semantic`
through a real server."""

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from leanlm.cache import guards_ops, verifier_ops
from leanlm.errors import ConfigError
from tests.serve_helpers import Server, write_chat_model

PAIRS = "tests/data/cache_pairs.jsonl"
pytest.importorskip("sentence_transformers", reason="the semantic cache's embedding: pip install 'leanlm[cache]'")


def refused(a, b):
    return guards_ops.disagreement(guards_ops.facts(a), guards_ops.facts(b))


@pytest.mark.parametrize("a,b,why", [
    ("How do I convert an int to a string?", "How do I convert a string to an int?", "opposite direction"),
    ("Does the warranty cover water damage?", "Does the warranty not cover water damage?", "negated"),
    ("Can I return an item after 30 days?", "Can I return an item after 60 days?", "numbers"),
    ("Is my appointment on March 3 confirmed?", "Is my appointment on May 3 confirmed?", "dates"),
    ("How much does shipping to Canada cost?", "How much does shipping from Canada cost?", "other end"),
    ("Is Python 3.12 faster than 3.11?", "Is Python 3.11 faster than 3.12?", "order"),
    ("Should I increase my dose from 10 mg to 20 mg?", "Should I decrease my dose from 20 mg to 10 mg?", "direction"),
    ("What does __init__ do in a class?", "What does __repr__ do in a class?", "identifiers"),
    ("Why was I charged twice this month?", "Why was I charged twice last month?", "dates"),
    ("Is a cough lasting 3 weeks a concern?", "Is a cough lasting 3 days a concern?", "numbers"),
    ("When should I use != instead of is not?", "When should I use == instead of is not?", "operators"),
    ("Which fruits should I eat during pregnancy?", "Which fruits should I avoid during pregnancy?", "negated"),
    ("Can I pay by card instead of cash?", "Can I pay by cash instead of card?", "opposite direction"),
    ("Does the Pixel 8 charger fit the Pixel 7?", "Does the Pixel 7 charger fit the Pixel 8?", "order"),
])
def test_guards_refuse_what_a_threshold_lets_through(a, b, why):
    assert refused(a, b) and refused(b, a), why  # either way round; `why` is the kind of difference


@pytest.mark.parametrize("a,b", [
    ("Does the warranty cover water damage?", "Is water damage covered by the warranty?"),
    ("How do I transfer money from savings to checking?", "How can I move money from my savings into checking?"),
    ("Is Python 3.12 faster than 3.11?", "Does 3.12 run faster than Python 3.11?"),
    ("What vaccines does a baby get at 2 months?", "Which shots are given at the 2-month visit?"),
    ("Is it safe to take two Advil at once?", "Can I take 2 Advil together?"),
    ("Can I get my second dose before 21 days?", "Is it okay to take the second dose earlier than 21 days?"),
    ("How do I copy a folder without its hidden files?", "How do I copy a folder but skip the hidden files instead?"),
    ("Is version 2 or 3 better for beginners?", "For beginners, is 3 or 2 the better version?"),
    ("How do I compare x = 5 and y = 5?", "With x = 5 and y = 5, how do I compare them?"),
])
def test_guards_let_paraphrases_through(a, b):
    assert refused(a, b) is None


def test_logistic_fit_and_threshold_pick():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(1, 1, (200, 2)), rng.normal(-1, 1, (200, 2))])
    y = np.r_[np.ones(200), np.zeros(200)]
    w, b, m, s = verifier_ops.fit_logistic(x, y)
    p = verifier_ops.predict(x, w, b, m, s)
    assert ((p > 0.5) == (y == 1)).mean() > 0.85 and w[0] > 0 and w[1] > 0
    pick = verifier_ops.pick_threshold(p, y == 1, np.ones(400, dtype=bool), 0.01)
    served_different = ((p >= pick["threshold"]) & (y == 0)).sum()
    assert served_different <= 2 and pick["false_hit_rate"] <= 0.01 and pick["hit_rate"] > 0.2


def test_pairs_file_errors(tmp_path):
    from leanlm.cache.calibrate import load_pairs

    for text, says in [('{"q1": "a", "q2": "b", "same": true}\n{"q1": "a", "same": false}\n', "bad.jsonl:2: missing q2"),
                       ('{"q1": "a", "q2": "b", "same": "yes"}\n', "bad.jsonl:1: same must be true or false"),
                       ('{"q1": "a", "q2": "b", "same": true}\nnot json\n', "bad.jsonl:2: not JSON")]:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(ConfigError, match=says):
            load_pairs(tmp_path / "bad.jsonl")


@pytest.fixture(scope="module")
def embedder():
    from leanlm.cache.semantic import Embedder

    return Embedder()


def test_the_tier_serves_verified_paraphrases_only_in_their_own_conversation(embedder, tmp_path):
    from leanlm.cache.semantic import SemanticTier
    from leanlm.cache.sqlite_store import SQLiteStore

    tier = SemanticTier(SQLiteStore(tmp_path), embedder=embedder)

    def ask(question, history=(), tenant="t"):
        request = {"model": "m", "temperature": 0.0, "messages": [*history, {"role": "user", "content": question}]}
        return tier.lookup(tenant, "fp", request)

    base = {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": "How do I reset my password?"}]}
    tier.remember("t", "fp", base, b'{"a": 1}', {}, None)
    assert ask("How do I reset my password?") is not None
    assert ask("How do I reset my PIN?") is None
    assert ask("How do I reset my password?", tenant="other") is None
    assert ask("How do I reset my password?", history=[{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}]) is None
    int_str = {**base, "messages": [{"role": "user", "content": "How do I convert an int to a string?"}]}
    tier.remember("t", "fp", int_str, b'{"a": 2}', {}, None)
    assert ask("How do I convert a string to an int?") is None  # cosine 0.99, still refused


def test_a_tier_refreshes_from_its_store_reading_only_the_entries_it_lacks(embedder, tmp_path):
    from leanlm.cache.semantic import SemanticTier
    from leanlm.cache.sqlite_store import SQLiteStore

    def request(question):
        return {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": question}]}

    writer = SemanticTier(SQLiteStore(tmp_path), embedder=embedder)
    store = SQLiteStore(tmp_path)  # a second server on the same cache directory
    reader = SemanticTier(store, embedder=embedder, refresh_s=0)
    assert reader.lookup("t", "fp", request("How do I reset my password?")) is None
    writer.remember("t", "fp", request("How do I reset my password?"), b'{"a": 1}', {}, None)
    assert reader.lookup("t", "fp", request("how do I reset my  password?")) is not None  # same words
    keys = [key for key, _, _ in store.entries("t", "fp", "semantic")]
    assert len(keys) == 1 and store.entries("t", "fp", "semantic", skip=set(keys)) == []


def test_a_lookup_embeds_only_the_new_question_when_the_candidates_were_stored_here(tmp_path, monkeypatch):
    from leanlm.cache.semantic import Embedder, SemanticTier
    from leanlm.cache.sqlite_store import SQLiteStore

    embedder = Embedder()  # its own caches: what this test counts must not be warm from another test
    calls = []
    encode = embedder.model.encode
    monkeypatch.setattr(embedder.model, "encode", lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw))

    def request(question):
        return {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": question}]}

    tier = SemanticTier(SQLiteStore(tmp_path), embedder=embedder)
    tier.remember("t", "fp", request("How can I reset the password of my account?"), b'{"a": 1}', {}, None)
    tier.remember("t", "fp", request("How do I reset my password after 3 failed logins?"), b'{"a": 2}', {}, None)
    calls.clear()
    tier.lookup("t", "fp", request("How do I reset my account password?"))  # verified or not, it was a candidate
    # the question (sentence and tokens in one pass) and its words not seen before; no stored question again
    assert calls[0] == ["How do I reset my account password?"] and len(calls) <= 2
    assert not any("logins" in text or "How can I" in text for call in calls for text in call)
    # a store written by another server: its questions are analysed at their first lookup, and only those
    # that pass the guards (the one with a number does not)
    cold = SemanticTier(SQLiteStore(tmp_path), embedder=Embedder(), refresh_s=0)
    seen = []
    cold_encode = cold.embedder.model.encode
    monkeypatch.setattr(cold.embedder.model, "encode",
                        lambda texts, **kw: seen.append(list(texts)) or cold_encode(texts, **kw))
    cold.lookup("t", "fp", request("How do I reset my account password?"))
    flat = [text for call in seen for text in call]
    assert "How can I reset the password of my account?" in flat and not any("logins" in t for t in flat)


def test_the_embedders_caches_are_bounded_least_recently_used_first(embedder, monkeypatch):
    monkeypatch.setattr(embedder, "TOKEN_TEXTS", 2)
    embedder._tokens.clear()
    for text in ("first question", "second question", "third question"):
        embedder.tokens(text)
    assert list(embedder._tokens) == ["second question", "third question"]
    embedder.tokens("second question")  # used again: now the newest
    embedder.tokens("fourth question")
    assert list(embedder._tokens) == ["second question", "fourth question"]


def test_lookups_from_several_threads_share_small_caches_safely(embedder, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from leanlm.cache.semantic import SemanticTier
    from leanlm.cache.sqlite_store import SQLiteStore

    monkeypatch.setattr(embedder, "TOKEN_TEXTS", 2)  # every lookup evicts what another thread just read
    monkeypatch.setattr(embedder, "WORDS", 4)
    tier = SemanticTier(SQLiteStore(tmp_path), embedder=embedder)
    topics = ["reset my password", "change my email", "cancel my order", "track my parcel", "update my card"]
    for i, topic in enumerate(topics):
        request = {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": f"How do I {topic}?"}]}
        tier.remember("t", "fp", request, f'{{"a": {i}}}'.encode(), {}, None)

    def ask(i):
        question = f"How can I {topics[i % len(topics)]}?"
        return tier.lookup("t", "fp", {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": question}]})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, range(24)))  # raises here if a thread read a half-evicted cache
    assert len(embedder._tokens) <= 2 and len(embedder._words) <= 4


def test_calibrate_and_eval_commands(tmp_path):
    rows = [json.loads(line) for line in open(PAIRS)]
    subset = tmp_path / "pairs.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows[::6]))
    config = tmp_path / "semantic.json"
    run = subprocess.run([sys.executable, "-m", "leanlm", "cache", "calibrate", str(subset), "--max-false-hits", "0.05",
                          "--out", str(config)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(config.read_text())
    assert data["weights"] and 0 < data["threshold"] <= 1 and data["calibration"]["pairs"] == len(rows[::6])
    run = subprocess.run([sys.executable, "-m", "leanlm", "cache", "eval", str(subset), "--config", str(config),
                          "--json"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["pairs"] == len(rows[::6]) and out["false_hit_rate"] <= 0.1 and "reversal" in out["by_kind"]
    only_same = tmp_path / "same.jsonl"
    only_same.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["same"]][:10]))
    run = subprocess.run([sys.executable, "-m", "leanlm", "cache", "calibrate", str(only_same), "--out",
                          str(tmp_path / "x.json")], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "needs both same and different pairs" in run.stderr


def test_serve_with_the_semantic_tier(tmp_path):
    model = write_chat_model(tmp_path / "model")
    srv = Server([str(model), "--served-model-name", "tiny", "--cache", "exact,semantic", "--cache-dir",
                  str(tmp_path / "cache")], tmp_path / "server.log")
    try:
        def chat(text):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], r.headers["x-leanlm-cache"]
        answer, state = chat("How do I reset my password?")
        assert state == "miss"
        assert chat("How do I reset my password?") == (answer, "hit-exact")
        assert chat("How do I reset my PIN?")[1] == "miss"
        assert "leanlm_cache_lookups_total" in httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
