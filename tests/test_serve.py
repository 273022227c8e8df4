"""leanlm serve through real clients on real loopback ports: the official openai client (sync, async,
streaming), plain HTTP for bad input, API keys, continuous batching against single-request greedy output,
stop strings across token boundaries, seeds, logprobs, metrics and the engine's KV rows."""

import asyncio
import json
import threading

import httpx
import openai
import pytest
import torch

from leanlm.runtime.generate import generate
from tests.serve_helpers import Server, write_chat_model

KEY, OTHER = "sk-test-acme", "sk-test-beta"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    keys = work / "keys.txt"
    keys.write_text(f"# key tenant\n{KEY} acme\n{OTHER} beta\n")
    srv = Server([str(chat_model), "--served-model-name", "tiny", "--api-keys", str(keys), "--max-batch", "4",
                  "--max-len", "512", "--prefill-chunk", "16", "--max-body", "65536"], work / "server.log")
    yield srv
    assert srv.stop() == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def ask(client, content="Lists are", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_chat_and_completions_through_the_openai_client(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = ask(client)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    text = client.completions.create(model="tiny", prompt="def foo(", max_tokens=5, temperature=0)
    assert text.choices[0].text and text.usage.completion_tokens == 5


def test_streaming_matches_the_whole_answer_and_reports_usage(client):
    whole = ask(client, "Strings are", max_tokens=20).choices[0].message.content
    chunks = list(ask(client, "Strings are", max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_concurrent_requests_are_batched_and_answer_as_alone(client, server):
    prompts = [f"Question {i}: how do dicts {'work' * (i + 1)}?" for i in range(7)]  # 7 requests, 4 rows
    alone = [ask(client, p, max_tokens=10 + i).choices[0].message.content for i, p in enumerate(prompts)]

    async def together():
        a = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        replies = await asyncio.gather(*[a.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=10 + i, temperature=0)
            for i, p in enumerate(prompts)])
        await a.close()
        return [r.choices[0].message.content for r in replies]
    assert asyncio.run(together()) == alone
    batches = httpx.get(server.url + "/metrics").text
    assert 'leanlm_batch_size_bucket{le="4.0"}' in batches
    hist = {line.split(" ")[0]: float(line.split(" ")[1]) for line in batches.splitlines() if line.startswith("leanlm_batch_size_bucket")}
    assert hist['leanlm_batch_size_bucket{le="4.0"}'] > hist['leanlm_batch_size_bucket{le="1.0"}']  # some steps held several


def test_seed_n_and_logprobs(client):
    one = ask(client, temperature=1.0, seed=7, n=3, max_tokens=8)
    again = ask(client, temperature=1.0, seed=7, n=3, max_tokens=8)
    assert [c.message.content for c in one.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in one.choices}) > 1  # each choice draws its own tokens
    greedy = ask(client, logprobs=True, top_logprobs=3, max_tokens=6)
    content = greedy.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)  # greedy takes the top one


def test_a_stop_string_across_token_boundaries_cuts_the_answer(client):
    text = ask(client, "Tuples are", max_tokens=24).choices[0].message.content
    assert len(text) > 8
    stop = text[5:9]  # four characters from the middle: they need not sit in one token
    cut = ask(client, "Tuples are", max_tokens=24, stop=[stop, "never-there"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, "Tuples are", max_tokens=24, stop=stop,
                                                                      stream=True) if c.choices)
    assert streamed == text[: text.index(stop)]


def test_api_keys(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {OTHER}"})
    assert r.status_code == 200
    assert "tenant=beta" in server.log.read_text()


BAD = [  # (body, status, what the message must say)
    (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    (b'\xff\xfe{"model": "tiny"}', 400, "not valid UTF-8"),
    (b'[1, 2]', 400, "JSON object"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "'nope' is not served"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "unknown role wizard"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "def " * 600}]}, 400, "context of 512 tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "context of 512"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 100}, 400, "at most 8 choices"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 1000}, 400, "at most 4"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools: leanlm serve does not implement"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text parts"),
    ({"model": "tiny", "prompt": [10**7], "max_tokens": 2}, 400, "outside this model's vocabulary"),
]


@pytest.mark.parametrize("body,status,says", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, says):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Authorization": f"Bearer {KEY}",
                                                                "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"]
    assert ask(client, max_tokens=2).usage.completion_tokens == 2


def test_a_body_over_the_limit_and_unknown_routes(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 100_000, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


def test_metrics_and_stats(server, client):
    ask(client, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("leanlm_requests_total", "leanlm_queue_depth", "leanlm_time_to_first_token_seconds_bucket",
                 "leanlm_inter_token_seconds_bucket", "leanlm_generated_tokens_total", "leanlm_batch_size_bucket"):
        assert name in text
    stats = httpx.get(server.url + "/stats").json()
    assert stats["ready"] and stats["model"] == "tiny" and stats["generated_tokens"] > 0 and stats["slots"] == 4


def _engine_matches_alone(loaded, prefill_chunk: int = 5, base: str = "item"):
    """9 greedy sequences through 3 rows, prefill in `prefill_chunk`-token chunks, one cancelled midway;
    every finished one equals generating it alone. Returns the closed engine."""
    from leanlm.serve.batch_engine import BatchEngine
    from leanlm.serve.sequence import SamplingParams, Sequence

    engine = BatchEngine(loaded, max_batch=3, max_queue=16, max_len=256, prefill_chunk=prefill_chunk)
    tok = loaded.tokenizer
    done = threading.Semaphore(0)

    def sink(event):
        if event["type"] in ("done", "error"):
            done.release()
    seqs = [Sequence(tok(f"{base} {i} " * (i + 1))["input_ids"], SamplingParams(max_tokens=4 + 3 * i, temperature=0),
                     tok, set(), sink) for i in range(9)]
    engine.submit(seqs)
    engine.cancel([seqs[4]])
    for _ in seqs:
        assert done.acquire(timeout=120)
    engine.close()
    for i, seq in enumerate(seqs):
        if seq.finish_reason == "cancelled":
            continue
        alone = generate(loaded.model, torch.tensor([seq.prompt_ids]), 4 + 3 * i)[0].tolist()
        assert seq.out_ids == alone, f"sequence {i}"
    assert engine.cache.lengths == [0, 0, 0]
    return engine


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-step", "padded-steps"])
def test_engine_rows_stay_correct_when_sequences_leave_in_any_order(chat_model, monkeypatch, mixed):
    """Both step kinds: the mixed pass (decode rows + a prompt chunk at once) and the padded passes."""
    from leanlm.models.load import load_model
    from leanlm.serve.batch_engine import BatchEngine

    if not mixed:
        monkeypatch.setattr(BatchEngine, "_check_mixed", lambda self, layers: False)
    assert _engine_matches_alone(load_model(str(chat_model), "cpu")).mixed is mixed


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-step", "padded-steps"])
def test_engine_rows_on_a_sliding_window_model(tokenizer, tmp_path, monkeypatch, mixed):
    """A Gemma 3 layout (sliding-window layers of 8 tokens and a full one), prompts and answers longer
    than the window: each row sees only its own last 8 keys on the sliding layers, in both step kinds."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from leanlm.models.load import load_model
    from leanlm.serve.batch_engine import BatchEngine

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    Gemma3ForCausalLM(cfg).eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    if not mixed:
        monkeypatch.setattr(BatchEngine, "_check_mixed", lambda self, layers: False)
    engine = _engine_matches_alone(load_model(tmp_path, "cpu"), prefill_chunk=6, base="the window slides")
    assert engine.mixed is mixed and engine.window == 8


def test_a_model_the_mixed_step_does_not_fit_is_served_with_padded_steps(chat_model, monkeypatch, caplog):
    """An attention that does not keep rows apart fails the start-up check: a warning, then padded steps."""
    import leanlm.serve.slot_attention as slots
    from leanlm.models.load import load_model

    def wrong(module, query, key, value, attention_mask, **kwargs):  # every token attends to row 0's first key
        kwargs["slot_layout"].calls += 1
        return value[:1, :, :1].repeat_interleave(query.shape[1] // key.shape[1], 1).transpose(1, 2).expand(
            1, query.shape[2], query.shape[1], query.shape[3]), None
    monkeypatch.setattr(slots, "slot_attention", wrong)
    engine = _engine_matches_alone(load_model(str(chat_model), "cpu"))
    assert not engine.mixed and "does not fit this model" in caplog.text


def test_text_stream_holds_back_a_possible_stop_and_whole_characters():
    from leanlm.serve.text import TextStream

    class Bytes:  # a byte-level tokenizer: each token one UTF-8 byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")
    stream = TextStream(Bytes(), stop=["END"])
    out = "".join(stream.push(b) for b in "café E".encode())
    assert out == "café "  # "E" may start "END": held back; "é" (two bytes) only once whole
    assert "".join(stream.push(b) for b in b"ND more") == "" and stream.stopped
    stream = TextStream(Bytes(), stop=["END"])
    assert "".join(stream.push(b) for b in b"ENx") == "ENx"


def test_sampling_ops():
    from leanlm.serve.sampling_ops import pick_token

    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert pick_token(logits, 0.0, 1.0, None) == 1
    g = torch.Generator().manual_seed(0)
    assert {pick_token(logits, 1.0, 0.5, g) for _ in range(50)} == {1}  # top_p 0.5 keeps only the top token
    assert {pick_token(logits, 1.0, 0.99, g) for _ in range(200)} == {1, 2}


def test_slot_cache_mask_and_moves():
    from leanlm.serve.kv_slots import SlotCache

    cache = SlotCache(layers=1, slots=3, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"),
                      capacity=2, max_len=16)
    cache.begin(slice(0, 2), torch.tensor([[0], [2]]))
    mask = cache.mask(torch.float32)
    assert mask.shape == (2, 1, 1, 3) and cache.capacity == 4  # grew to hold position 2
    assert (mask[0, 0, 0] == 0).tolist() == [True, False, False] and (mask[1, 0, 0] == 0).all()
    key = torch.ones(2, 1, 1, 2)
    k, v = cache.update(key, key * 2, 0)
    cache.finish()
    assert k.shape == (2, 1, 3, 2) and cache.lengths[:2] == [1, 3]
    cache.move(1, 0)
    assert cache.lengths == [3, 0, 0] and float(cache.keys[0][0, 0, 2, 0]) == 1.0
    with pytest.raises(ValueError, match="exceed"):
        cache.ensure(17)


def test_a_request_cancelled_while_waiting_leaves_the_engine_idle_and_quiet(chat_model, caplog):
    """With one row busy, a waiting request is cancelled: the engine drops it, logs no failure, and serves
    the next request; a step with no row at all runs nothing."""
    from leanlm.models.load import load_model
    from leanlm.serve.batch_engine import BatchEngine
    from leanlm.serve.sequence import SamplingParams, Sequence

    loaded = load_model(str(chat_model), "cpu")
    engine = BatchEngine(loaded, max_batch=1, max_queue=4, max_len=128)
    tok = loaded.tokenizer
    events: dict[int, threading.Event] = {i: threading.Event() for i in range(3)}

    def sink_for(i):
        return lambda event: event["type"] in ("done", "error") and events[i].set()
    seqs = [Sequence(tok("lists are")["input_ids"], SamplingParams(max_tokens=n, temperature=0), tok, set(), sink_for(i))
            for i, n in enumerate((24, 4, 4))]
    engine.submit(seqs[:2])
    engine.cancel([seqs[1]])
    assert events[0].wait(60) and events[1].wait(60)
    engine.submit([seqs[2]])
    assert events[2].wait(60)
    engine.close()
    assert seqs[1].finish_reason == "cancelled" and seqs[2].finish_reason in ("length", "stop")
    assert "engine step failed" not in caplog.text
    engine._step()  # what the loop runs when a burst of cancelled requests left no row: nothing, not a crash
    assert engine.cache.lengths == [0]


def test_an_attention_with_logit_soft_capping_is_refused_by_the_mixed_step(tokenizer, tmp_path, caplog):
    """Gemma 2 caps attention logits; the slot attention has no cap, so the start-up check must refuse the
    mixed step (and say why) rather than serve answers that differ from the model's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from leanlm.models.load import load_model
    from leanlm.serve.batch_engine import BatchEngine

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                       attn_logit_softcapping=50.0, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)
    Gemma2ForCausalLM(cfg).eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, "cpu")
    loaded.model.config._attn_implementation = "eager"  # transformers' own path for soft-capping
    engine = BatchEngine(loaded, max_batch=2, max_len=128)
    engine.close()
    assert not engine.mixed and "softcap" in caplog.text
