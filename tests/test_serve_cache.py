"""leanlm serve's caches through real servers: the exact tier (SQLite and Redis), tenants kept apart, a
changed model never served the old answers, acknowledged entries surviving kill -9, a lost Redis, the
prefix (KV) cache's answers token-identical, and the cache commands."""

import asyncio
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.serve_helpers import Server, free_port, write_chat_model

KEYS = "sk-a acme\nsk-b beta\n"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("cache-model"))


def chat(url, content, key="sk-a", headers=None, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {key}", **(headers or {})})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.headers.get("x-leanlm-cache")


def start(chat_model, tmp_path, *extra, name="server", model=None):
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS)
    return Server([str(model or chat_model), "--served-model-name", "tiny", "--api-keys", str(keys),
                   "--cache", "exact", *extra], tmp_path / f"{name}.log")


def test_exact_hits_only_the_same_tenant_model_and_deterministic_request(chat_model, tmp_path):
    cache_dir = tmp_path / "cache"
    srv = start(chat_model, tmp_path, "--cache-dir", str(cache_dir))
    try:
        first, state = chat(srv.url, "What is a set?")
        assert state == "miss"
        again, state = chat(srv.url, "What is a set?")
        assert (again, state) == (first, "hit-exact")
        assert chat(srv.url, "What is a set?", key="sk-b")[1] == "miss"  # tenant B never gets A's answer
        assert chat(srv.url, "What is a set?", temperature=0.9)[1] == "bypass"  # not determined: never cached
        assert chat(srv.url, "What is a set?", temperature=0.9, seed=3)[1] == "miss"
        assert chat(srv.url, "What is a set?", temperature=0.9, seed=3)[1] == "hit-exact"
        assert chat(srv.url, "What is a set?", headers={"Cache-Control": "no-cache"})[1] == "miss"
        assert chat(srv.url, "Sets?", headers={"Cache-Control": "no-store"})[1] == "miss"
        assert chat(srv.url, "Sets?")[1] == "miss"  # no-store stored nothing
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-a", max_retries=0)
        streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is a set?"}],
                                                  max_tokens=8, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
        chunks = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first
        assert chunks[-1].usage.completion_tokens == 8
        stats = httpx.get(srv.url + "/stats").json()["cache"]["response"]
        assert stats["store"] == "sqlite" and stats["entries"]["exact"]["entries"] >= 3
        assert "leanlm_cache_lookups_total{result=\"exact\"}" in httpx.get(srv.url + "/metrics").text
    finally:
        assert srv.stop() == 0
    other = write_chat_model(tmp_path / "other-model", hidden=32)  # other weights under the same name
    srv = start(chat_model, tmp_path, "--cache-dir", str(cache_dir), model=other, name="other")
    try:
        assert chat(srv.url, "What is a set?")[1] == "miss"
    finally:
        srv.stop()
    run = subprocess.run([sys.executable, "-m", "leanlm", "cache", "stats", "--cache-dir", str(cache_dir),
                          "--price-per-million", "2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "hits exact" in run.stdout and "$" in run.stdout, run.stderr
    run = subprocess.run([sys.executable, "-m", "leanlm", "cache", "clear", "--cache-dir", str(cache_dir), "--tenant",
                          "beta"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "removed 1 cached answers of tenant 'beta'" in run.stdout, run.stdout


def test_every_acknowledged_entry_survives_kill_9(chat_model, tmp_path):
    cache_dir = tmp_path / "cache"
    srv = start(chat_model, tmp_path, "--cache-dir", str(cache_dir), "--max-batch", "4")
    acknowledged = []

    async def burst():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": "Bearer sk-a"}) as c:
            async def one(i):
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4,
                        "temperature": 0}
                try:
                    r = await c.post(srv.url + "/v1/chat/completions", json=body)
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acknowledged.append((i, r.json()["choices"][0]["message"]["content"]))
            tasks = [asyncio.create_task(one(i)) for i in range(200)]
            while len(acknowledged) < 20:
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGKILL)  # mid-burst, no chance to flush anything
            await asyncio.gather(*tasks)
    asyncio.run(burst())
    srv.proc.wait(30)
    assert 20 <= len(acknowledged) < 200
    srv = start(chat_model, tmp_path, "--cache-dir", str(cache_dir), name="restarted")
    try:
        for i, answer in acknowledged:
            assert chat(srv.url, f"question {i}", max_tokens=4) == (answer, "hit-exact")
    finally:
        srv.stop()


def redis_server(port: int, tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("Debian's redis-server is not installed (.ci/run installs it)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    import redis

    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def test_two_servers_share_redis_and_survive_losing_it(chat_model, tmp_path):
    port = free_port()
    redis = redis_server(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    a = start(chat_model, tmp_path, "--cache-store", url, name="a")
    b = start(chat_model, tmp_path, "--cache-store", url, name="b")
    try:
        first, state = chat(a.url, "What is a frozenset?")
        assert state == "miss"
        assert chat(b.url, "What is a frozenset?") == (first, "hit-exact")  # the other instance's entry
        assert chat(b.url, "What is a frozenset?", key="sk-b")[1] == "miss"
        redis.terminate()
        redis.wait(20)
        assert chat(a.url, "What is a frozenset?") == (first, "miss")  # uncached, still answered
        assert "unreachable" in a.log.read_text()
        redis = redis_server(port, tmp_path)  # back (empty: it kept nothing on disk)
        assert chat(a.url, "Tuples?")[1] == "miss"
        assert chat(b.url, "Tuples?")[1] == "hit-exact"
        assert "is back" in a.log.read_text() or "is back" in b.log.read_text()
    finally:
        a.stop()
        b.stop()
        redis.terminate()


def test_the_prefix_cache_gives_token_identical_answers(chat_model, tmp_path):
    system = "You answer questions about Python's documentation. " * 20  # ~200 tokens shared
    plain = Server([str(chat_model), "--served-model-name", "tiny"], tmp_path / "plain.log")
    cached = Server([str(chat_model), "--served-model-name", "tiny", "--cache", "prefix", "--prefill-chunk", "64"],
                    tmp_path / "prefix.log")
    try:
        for question in ("What is a list?", "And a dict?", "How do sets work?"):
            kw = dict(model="tiny", max_tokens=10, temperature=0,
                      messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
            want = openai.OpenAI(base_url=plain.url + "/v1", api_key="x").chat.completions.create(**kw)
            got = openai.OpenAI(base_url=cached.url + "/v1", api_key="x").chat.completions.create(**kw)
            assert got.choices[0].message.content == want.choices[0].message.content
        prefix = httpx.get(cached.url + "/stats").json()["cache"]["prefix"]
        assert prefix["hit_tokens"] >= 2 * 160 and prefix["blocks"] >= 5  # the later two reused the system prompt
    finally:
        plain.stop()
        cached.stop()


def test_bad_cache_settings_fail_before_serving(chat_model, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "responses.sqlite").write_bytes(b"this is not a database" * 100)
    cases = [(["--cache", "exact", "--cache-dir", str(corrupt)], "responses.sqlite is corrupt"),
             (["--cache", "exact", "--cache-store", f"redis://127.0.0.1:{free_port()}/0"], "cannot be reached"),
             (["--cache", "exact,everything"], "unknown tier; the tiers are exact, semantic, prefix"),
             (["--cache", "exact", "--cache-dir", "/proc/leanlm-cache"], "is not writable")]
    for extra, says in cases:
        run = subprocess.run([sys.executable, "-m", "leanlm", "serve", str(chat_model), "--port", str(free_port()),
                              *extra], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and says in run.stderr, (extra, run.stderr[-500:])
