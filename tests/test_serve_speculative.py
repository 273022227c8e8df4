"""`serve --speculative`: exact answers (greedy and seeded sampling) against the plain engine, the gate
that turns speculation off where it measures slower, bad modes, and a real server on a real port."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from leanlm.errors import ConfigError
from leanlm.serve.speculative import SpeedGate
from tests.serve_helpers import Server, write_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("spec-serve-model"))


def _answers(engine, tok, prompts, params) -> list:
    from leanlm.serve.sequence import Sequence

    out = []
    for text in prompts:  # one at a time: speculation runs while a sequence decodes alone
        done = threading.Event()
        seq = Sequence(tok(text)["input_ids"], params, tok, set(),
                       lambda e, d=done: d.set() if e["type"] in ("done", "error") else None)
        engine.submit([seq])
        assert done.wait(120)
        out.append((seq.out_ids, seq.finish_reason))
    return out


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_speculative_engine_answers_exactly_as_the_plain_one(chat_model, mode):
    from leanlm.models.load import load_model
    from leanlm.serve.batch_engine import BatchEngine
    from leanlm.serve.sequence import SamplingParams
    from leanlm.serve.speculative import SpeedGate

    loaded = load_model(str(chat_model), "cpu")
    tok = loaded.tokenizer
    prompts = [f"item {i} and item {i} and item {i} and " * 3 for i in range(5)]
    spec_mode = "lookup:2" if mode == "lookup" else f"draft:{chat_model}"
    plain = BatchEngine(loaded, max_batch=2, max_len=256)
    spec = BatchEngine(loaded, max_batch=2, max_len=256, speculative=spec_mode, max_draft=5)
    spec.spec.gate = SpeedGate(sample=10**6)
    spec.spec.gate.phase = "spec"  # measuring speculation throughout: every step of a lone sequence speculates
    for params in (SamplingParams(max_tokens=24, temperature=0),
                   SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7),
                   SamplingParams(max_tokens=24, temperature=0, stop=["item 3"])):
        assert _answers(spec, tok, prompts, params) == _answers(plain, tok, prompts, params)
    stats = spec.spec.stats
    assert stats.steps > 0 and stats.drafted > 0 and stats.accepted > 0
    if mode == "draft":  # the same model drafting for itself: every greedy draft is kept
        assert stats.tokens_per_step > 2
    plain.close()
    spec.close()
    assert spec.cache.lengths == [0, 0]


def test_the_gate_keeps_the_faster_mode_and_measures_again():
    gate = SpeedGate(sample=2, hold=3)
    assert not gate.use_speculation()
    for _ in range(2):
        gate.record(False, 1.0, 1)  # plain: 1 token/s
    assert gate.use_speculation()
    for _ in range(2):
        gate.record(True, 1.0, 0.5)  # speculation measured slower: 0.5 tokens/s
    assert gate.phase == "hold" and gate.winner == "plain" and not gate.use_speculation()
    for _ in range(3):
        gate.record(False, 1.0, 1)
    assert gate.phase == "plain"  # measuring again
    for _ in range(2):
        gate.record(False, 1.0, 1)
    for _ in range(2):
        gate.record(True, 1.0, 3)
    assert gate.winner == "spec" and gate.use_speculation() and gate.rates == {"plain": 1.0, "spec": 3.0}


@pytest.mark.parametrize("options, says", [
    ({"speculative": "self:4"}, "bench --speculative self:DIR"),
    ({"speculative": "medusa"}, "lookup, lookup:N"),
    ({"speculative": "lookup", "backend": "llama.cpp"}, "llama-server --model-draft"),
    ({"speculative": "lookup", "upstream": "http://127.0.0.1:1"}, "--speculative-config"),
    ({"speculative": "lookup", "max_draft": 0}, "max_draft must be at least 1"),
])
def test_modes_the_server_cannot_run_are_refused(options, says):
    from leanlm.core.config import parse_config
    from leanlm.serve.server import ServeConfig

    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace("[", r"\[")):
        parse_config(ServeConfig, options, "serve")


def test_speculative_server_through_the_openai_client(chat_model, tmp_path):
    srv = Server([str(chat_model), "--served-model-name", "tiny", "--max-len", "512", "--speculative", "lookup",
                  "--max-draft", "4"], tmp_path / "server.log")
    plain = Server([str(chat_model), "--served-model-name", "tiny", "--max-len", "512"], tmp_path / "plain.log")
    try:
        content = "repeat after me: one two three four five one two three four five"
        answers = []
        for s in (srv, plain):
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            answers.append([client.chat.completions.create(model="tiny", max_tokens=30, temperature=0, messages=[
                {"role": "user", "content": content}]).choices[0].message.content for _ in range(3)])
        assert answers[0] == answers[1]
        text = httpx.get(srv.url + "/metrics").text
        assert "leanlm_speculative_steps" in text and "leanlm_speculative_enabled" in text
        spec = httpx.get(srv.url + "/stats").json()["speculative"]
        assert spec["steps"] > 0 and spec["phase"] in ("plain", "spec", "hold")
    finally:
        assert srv.stop() == 0 and plain.stop() == 0
