"""Operating leanlm serve: a full queue answers 429, dropped streams free their rows, SIGTERM drains,
startup failures are clear, the playground page works in headless Chromium, the llama.cpp backend and
the upstream proxy answer through the openai client, and `leanlm loadtest` measures a real server."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.serve_helpers import Server, free_port, write_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("ops-model"), layers=2, hidden=64)


@pytest.fixture(scope="module")
def small(chat_model, tmp_path_factory):
    """Two rows, a queue of four: easy to fill."""
    srv = Server([str(chat_model), "--served-model-name", "tiny", "--max-batch", "2", "--max-queue", "4",
                  "--max-len", "1024"], tmp_path_factory.mktemp("ops") / "server.log")
    yield srv
    srv.stop()


def body(tokens: int, stream: bool = False) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Explain lists."}], "max_tokens": tokens,
            "temperature": 0, "stream": stream}


def test_a_full_queue_answers_429_with_retry_after(small):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(small.url + "/v1/chat/completions", json=body(200)) for _ in range(20)])
    replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert set(codes) == {200, 429} and codes.count(200) >= 6  # 2 rows + 4 queued at least
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"


def test_dropped_streams_free_their_rows_and_the_server_keeps_serving(small):
    start_rss = small.rss_bytes()

    async def drop(c):
        try:
            async with c.stream("POST", small.url + "/v1/chat/completions", json=body(800, stream=True)) as r:
                if r.status_code == 200:
                    async for _ in r.aiter_lines():
                        break  # the first event, then the client goes away
        except httpx.HTTPError:
            pass

    async def many():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as c:
            for _ in range(10):  # 500 streams, 50 at a time
                await asyncio.gather(*[drop(c) for _ in range(50)])
    asyncio.run(many())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = httpx.get(small.url + "/stats").json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["waiting"] == 0, stats
    r = httpx.post(small.url + "/v1/chat/completions", json=body(5), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert small.rss_bytes() < start_rss * 1.5 + 200e6


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(chat_model, tmp_path):
    srv = Server([str(chat_model), "--served-model-name", "tiny"], tmp_path / "server.log")
    events = []
    with httpx.Client(timeout=120) as c, c.stream("POST", srv.url + "/v1/chat/completions",
                                                  json=body(300, stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line)
                if len(events) == 2:
                    srv.proc.send_signal(signal.SIGTERM)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[5:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert srv.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")


def test_startup_failures_are_clear(chat_model, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "leanlm", "serve", str(chat_model), "--port", str(port)],
                         capture_output=True, text=True, timeout=120)
    holder.close()
    assert run.returncode != 0 and f"port {port} on 127.0.0.1 is already in use" in run.stderr
    port = free_port()
    run = subprocess.run([sys.executable, "-m", "leanlm", "serve", str(tmp_path / "missing"), "--port", str(port)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "missing" in run.stderr
    with socket.socket() as s:  # it failed before binding: the port is still free
        s.bind(("127.0.0.1", port))
    keys = tmp_path / "keys.txt"
    keys.write_text("only-one-word\n")
    run = subprocess.run([sys.executable, "-m", "leanlm", "serve", str(chat_model), "--api-keys", str(keys)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "keys.txt:1: expected 'KEY TENANT'" in run.stderr


def test_the_playground_page_chats_and_shows_metrics_in_headless_chromium(small, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(small.url + "/")
        page.wait_for_selector("text=model: tiny")
        page.fill("#max", "12")
        page.fill("#prompt", "What is a tuple?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
        answer = page.inner_text(".msg.assistant .text")
        page.wait_for_function("Number(document.getElementById('m-tokens').textContent) >= 12", timeout=10_000)
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        if os.environ.get("LEANLM_KEEP_SCREENSHOT"):
            shutil.copy(tmp_path / "playground.png", os.environ["LEANLM_KEEP_SCREENSHOT"])
        user = page.inner_text(".msg.user .text")
        browser.close()
    assert user == "What is a tuple?" and len(answer) > 0
    assert (tmp_path / "playground.png").stat().st_size > 5000


def test_the_upstream_proxy_forwards_and_streams(small, tmp_path):
    front = Server(["--upstream", small.url], tmp_path / "front.log")
    try:
        client = openai.OpenAI(base_url=front.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        direct = openai.OpenAI(base_url=small.url + "/v1", api_key="none", max_retries=0)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "Dicts?"}], max_tokens=8, temperature=0)
        assert client.chat.completions.create(**kw).choices[0].message.content == \
            direct.chat.completions.create(**kw).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        assert streamed == direct.chat.completions.create(**kw).choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(tools=[{"type": "function", "function": {"name": "f"}}], **kw)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**{**kw, "model": "other"})
    finally:
        front.stop()


def test_loadtest_measures_a_real_server(small, tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "-m", "leanlm", "loadtest", small.url, "--concurrency", "1,2",
                          "--requests", "4", "--mean-tokens", "8", "--max-tokens", "16", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert r["ok"] == 4 and r["errors"] == {} and r["output_tokens_per_s"] > 0 and r["ttft_p50_s"] > 0
    assert "TTFT p50" in run.stdout


def test_the_llama_cpp_backend_serves_a_gguf_export(chat_model, tmp_path):
    from leanlm.runtime.llamacpp import check_llama_cpp_runs

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it)")
    try:
        check_llama_cpp_runs()
    except Exception as err:
        pytest.skip(str(err))
    from leanlm.export import export

    gguf = tmp_path / "tiny.gguf"
    export(str(chat_model), gguf, "gguf", weight_type="f32")
    srv = Server([str(gguf), "--backend", "llama.cpp", "--served-model-name", "tiny"], tmp_path / "llama.log")
    local = Server([str(chat_model), "--served-model-name", "tiny"], tmp_path / "local.log")
    try:
        kw = dict(model="tiny", prompt="Lists are", max_tokens=8, temperature=0)
        gguf_text = openai.OpenAI(base_url=srv.url + "/v1", api_key="x").completions.create(**kw).choices[0].text
        torch_text = openai.OpenAI(base_url=local.url + "/v1", api_key="x").completions.create(**kw).choices[0].text
        assert gguf_text == torch_text  # the same float weights, greedy: the same answer
        assert httpx.get(srv.url + "/stats").json()["slots"] == 1
    finally:
        srv.stop()
        local.stop()


def test_prepacked_linears_answer_as_eager_ones_do_and_on_refuses_nothing_to_pack(small, chat_model, tmp_path):
    # `small` runs with the default --prepack off (eager nn.Linear); this one with its float32 linears packed
    eager = Server([str(chat_model), "--served-model-name", "tiny", "--prepack", "on"], tmp_path / "packed.log")
    try:
        for question in ("Explain lists.", "What is a tuple?", "Sort a dict by value."):
            req = {**body(8), "messages": [{"role": "user", "content": question}], "logprobs": True}
            a = httpx.post(f"{small.url}/v1/chat/completions", json=req, timeout=60).json()["choices"][0]
            b = httpx.post(f"{eager.url}/v1/chat/completions", json=req, timeout=60).json()["choices"][0]
            assert a["message"]["content"] == b["message"]["content"]
            for x, y in zip(a["logprobs"]["content"], b["logprobs"]["content"]):
                assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-3)
    finally:
        eager.stop()
    from leanlm.models.load import load_model
    from leanlm.models.save import save_model
    from leanlm.quantize.rtn import RTNConfig, quantize_rtn

    loaded = load_model(chat_model, device="cpu")
    quantize_rtn(loaded.model, RTNConfig(bits=8, skip=[]))  # every linear int8, the LM head too
    save_model(loaded.model, loaded.tokenizer, tmp_path / "int8")
    run = subprocess.run([sys.executable, "-m", "leanlm", "serve", str(tmp_path / "int8"), "--prepack", "on",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--prepack on: nothing to prepack" in run.stderr and "no float32" in run.stderr
