"""The semantic-duplicate stage of `leanlm data clean`: the pair search against brute force, and paraphrases
(which MinHash cannot see) removed through the real pipeline with all-MiniLM-L6-v2."""

import numpy as np
import pytest

from leanlm.clean import clean
from leanlm.clean.semantic_ops import similar_pairs
from leanlm.errors import ConfigError
from tests.test_clean import DOC, OTHER, THIRD, removed, write_jsonl

DOC_PARAPHRASE = ("A for loop walks through the items of a sequence like a list, tuple or string, or through any "
                  "other iterable; its starred expression list is computed one time and gives back an iterator.")
THIRD_PARAPHRASE = ("The raise statement raises exceptions, and try statements handle them: their except clauses "
                    "list the exception classes they catch, and finally clauses run no matter what happened.")
WHILE = ("The while statement is used for repeated execution as long as an expression is true; it tests the "
         "expression repeatedly and, if it is true, executes the first suite of statements.")


def test_clustered_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 32))
    x = np.repeat(centers, 25, axis=0) + 0.35 * rng.standard_normal((1000, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rng.shuffle(x)
    x = x.astype(np.float16).astype(np.float32)  # the stage keeps embeddings as float16
    sims = x @ x.T
    truth = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(sims >= 0.9, k=1)))}
    assert len(truth) > 200  # enough pairs for the comparison to mean something
    a, b, cos = similar_pairs(x.astype(np.float16), 0.9, cluster_size=100)
    found = set(zip(a.tolist(), b.tolist()))
    assert found <= truth and len(found) >= 0.97 * len(truth)  # clusters lose only pairs split across borders
    assert (a < b).all() and np.allclose(cos, sims[a, b], atol=2e-3)
    assert list(zip(b.tolist(), a.tolist())) == sorted(zip(b.tolist(), a.tolist()))  # by later, then earlier
    whole = set(zip(*similar_pairs(x, 0.9, cluster_size=10_000)[:2]))
    assert whole == truth  # one cluster: every pair compared


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_paraphrases_go_as_semantic_duplicates_and_disagreeing_answers_stay(tmp_path):
    rows = [{"text": DOC}, {"text": OTHER}, {"text": DOC_PARAPHRASE}, {"text": THIRD}, {"text": WHILE},
            {"text": THIRD_PARAPHRASE}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    clean([src], tmp_path / "plain", progress=False)
    assert removed(tmp_path / "plain") == []  # word-level MinHash does not see a paraphrase
    report = clean([src], tmp_path / "out", {"semantic_duplicates": {"enabled": True, "threshold": 0.85}},
                   progress=False)
    got = {r["index"]: (r["reason"], r["of"]) for r in removed(tmp_path / "out")}
    assert got == {2: ("semantic-duplicate", 0), 5: ("semantic-duplicate", 3)}  # the while loop is another topic
    assert report["counts"] == {"semantic-duplicate": 2} and report["stats"]["semantic_pairs"] == 2
    # chat examples that ask the same in other words but answer differently are the conflict stage's business
    chat = [{"messages": [{"role": "user", "content": DOC}, {"role": "assistant", "content": "It runs 3 times."}]},
            {"messages": [{"role": "user", "content": DOC_PARAPHRASE},
                          {"role": "assistant", "content": "It runs 5 times."}]}]
    src = write_jsonl(tmp_path / "chat.jsonl", chat)
    clean([src], tmp_path / "chat", {"semantic_duplicates": {"enabled": True, "threshold": 0.8},
                                     "conflicts": {"enabled": False}}, progress=False)
    assert removed(tmp_path / "chat") == []


def test_semantic_config_is_checked(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": DOC}])
    with pytest.raises(ConfigError, match="outside"):
        clean([src], tmp_path / "o", {"semantic_duplicates": {"enabled": True, "threshold": 1.5}}, progress=False)
    with pytest.raises(ConfigError, match="cluster_size"):
        clean([src], tmp_path / "o", {"semantic_duplicates": {"cluster_size": 1}}, progress=False)
    with pytest.raises(ConfigError, match="treshold"):
        clean([src], tmp_path / "o", {"semantic_duplicates": {"treshold": 0.9}}, progress=False)
