"""leanlm serve against `transformers serve` (with and without --continuous-batching) and llama.cpp's server,
each started here on the same machine, replaying the same chat workload (`leanlm loadtest`'s) at the
same concurrency levels. Then leanlm's HTTP overhead at concurrency 1 (the same request through the
server and straight into its engine), and a load run (1,000 requests at concurrency 64). Prints tables and
writes JSON.

    pip install 'transformers[serving]' 'llama-cpp-python[server]'   # the peers
    python benchmarks/serve_load.py --out benchmarks/results/serve-cpu.json

Peers that cannot start here (not installed) are reported as such, not left out silently.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leanlm.serve.loadtest import format_table, loadtest  # noqa: E402
from tests.serve_helpers import free_port  # noqa: E402


class Proc:
    def __init__(self, name: str, cmd: list[str], url: str, log: Path, ready_path: str = "/v1/models"):
        self.name, self.url, self.log = name, url, log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {log.read_text()[-1500:]}")
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{name} was not ready in 600 s")

    def rss(self) -> int:
        import psutil

        p = psutil.Process(self.proc.pid)
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def leanlm_cmd(model: str, port: int, name: str, extra=()) -> list[str]:
    return [sys.executable, "-m", "leanlm", "serve", model, "--port", str(port), "--served-model-name", name, *extra]


class ModelFiles(dict):
    """The float model's directory, leanlm int8/int4 models of it and its Q8_0/Q4_0 GGUF exports, each built
    the first time a measured server needs it (a run with --only builds only those)."""

    def __init__(self, work: Path, model: str, recipes: dict[str, str]):
        super().__init__()
        self.work, self.model, self.recipes = work, model, recipes

    def __missing__(self, name: str) -> str:
        from leanlm.export import export
        from leanlm.models.load import resolve_source

        if name == "float":
            path = resolve_source(self.model)
        elif name in self.recipes:
            path = self.work / f"opt-{name}" / "model"
            if not path.exists():
                quantized(self.model, self.recipes[name], path)
        else:
            path = self.work / f"model-{name}.gguf"
            if not path.exists():
                export(self.model, path, "gguf", weight_type=name)
        self[name] = str(path)
        return self[name]


def quantized(model: str, recipe_name: str, out: Path) -> None:
    """The recipe's model saved to `out` (its quality is `leanlm optimize`'s business, not this benchmark's)."""
    from leanlm.core.step import StepContext
    from leanlm.data.corpus import load_corpus
    from leanlm.models.load import load_model
    from leanlm.models.save import save_model
    from leanlm.pipeline.optimize import _calibration, apply_recipe
    from leanlm.pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    loaded = load_model(model, "cpu")
    train = load_corpus(None, loaded.tokenizer).train
    ctx = StepContext(loaded.tokenizer, _calibration(recipe, train, loaded.tokenizer), loaded.device,
                      train_text=train, source=str(loaded.path))
    apply_recipe(loaded.model, recipe, ctx)
    save_model(loaded.model, loaded.tokenizer, out)


def servers(paths: dict, peers: list[str]) -> list[tuple[str, list[str], str]]:
    """(label, command, model id) of every server to measure."""
    rows = []
    for variant in ("float", "int8", "int4"):
        rows.append((f"leanlm serve ({variant})", lambda p, v=variant: leanlm_cmd(paths[v], p, "m"), "m"))
    # what the mixed step buys: the same engine with a prefill pass and a decode pass per step
    rows.append(("leanlm serve --step padded (float)", lambda p: leanlm_cmd(paths["float"], p, "m", ["--step", "padded"]), "m"))
    for variant in ("float", "int8"):  # what prepacked float32 linears buy (int8: its float LM head)
        rows.append((f"leanlm serve --prepack on ({variant})",
                     lambda p, v=variant: leanlm_cmd(paths[v], p, "m", ["--prepack", "on"]), "m"))
    for kind in ("q8_0", "q4_0"):
        rows.append((f"leanlm serve llama.cpp ({kind})",
                     lambda p, k=kind: leanlm_cmd(paths[k], p, "m", ["--backend", "llama.cpp"]), "m"))
    if "transformers" in peers:
        for cb in (False, True):
            flag = "--continuous-batching" if cb else "--no-continuous-batching"
            rows.append((f"transformers serve {flag}",
                         lambda p, f=flag: ["transformers", "serve", paths["float"], "--port", str(p), f], paths["float"]))
    if "llama.cpp" in peers:
        for kind in ("q8_0", "q4_0"):
            rows.append((f"llama_cpp.server ({kind})",
                         lambda p, k=kind: [sys.executable, "-m", "llama_cpp.server", "--model", paths[k], "--port",
                                            str(p), "--n_ctx", "2048", "--model_alias", "m"], "m"))
    return rows


def measure_servers(paths, peers, levels, requests, work: Path, only: str | None = None) -> list[dict]:
    results = []
    for label, cmd, model_id in servers(paths, peers):
        if only and not any(part in label for part in only.split(",")):
            continue
        port = free_port()
        print(f"\n== {label}", flush=True)
        try:
            proc = Proc(label, cmd(port), f"http://127.0.0.1:{port}", work / f"{label.replace(' ', '_')}.log")
        except Exception as err:
            print(f"   could not start: {err}")
            results.append({"server": label, "error": str(err)[:500]})
            continue
        try:
            rows = loadtest(proc.url, model_id, levels, requests)
            print(format_table(rows))
            results.append({"server": label, "rows": rows, "rss_bytes": proc.rss()})
        except Exception as err:
            print(f"   failed: {err}")
            results.append({"server": label, "error": str(err)[:500]})
        finally:
            proc.stop()
    return results


def http_overhead(model: str, work: Path, repeats: int = 5, tokens: int = 64) -> dict:
    """A 64-token greedy request: through the server (non-streaming, openai client) and straight into the
    same engine in this process; medians of `repeats` after one warm-up each."""
    import openai

    from leanlm.models.load import load_model
    from leanlm.serve.batch_engine import BatchEngine
    from leanlm.serve.local import Limits, LocalService
    from leanlm.serve.metrics import Metrics
    from leanlm.serve.protocol import ChatRequest

    messages = [{"role": "user", "content": "Explain what a Python generator is."}]
    port = free_port()
    proc = Proc("overhead", leanlm_cmd(model, port, "m"), f"http://127.0.0.1:{port}", work / "overhead.log",
                ready_path="/health")
    client = openai.OpenAI(base_url=proc.url + "/v1", api_key="x", max_retries=0)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=tokens, temperature=0)
        times.append(time.perf_counter() - start)
    proc.stop()
    served_tokens = r.usage.completion_tokens
    loaded = load_model(model, "cpu")
    engine = BatchEngine(loaded, max_batch=16)
    service = LocalService(engine, "m", Limits(), Metrics(engine.load))
    import asyncio

    async def direct():
        req = ChatRequest.model_validate({"model": "m", "messages": messages, "max_tokens": tokens, "temperature": 0.0})
        start = time.perf_counter()
        await service.handle(req, None, "default", {"start": start})
        return time.perf_counter() - start
    direct_times = [asyncio.run(direct()) for _ in range(repeats + 1)]
    engine.close()
    http, inproc = statistics.median(times[1:]), statistics.median(direct_times[1:])
    return {"tokens": served_tokens, "http_s": http, "direct_s": inproc, "overhead": http / inproc - 1}


def load_run(model: str, work: Path, total: int = 1000, concurrency: int = 64, tokens: int = 16) -> dict:
    import asyncio

    import openai

    port = free_port()
    proc = Proc("load", leanlm_cmd(model, port, "m"), f"http://127.0.0.1:{port}", work / "load.log", ready_path="/health")
    codes: dict[int, int] = {}
    rss_after_100 = None
    done = 0

    async def run():
        nonlocal rss_after_100, done
        client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key="x", max_retries=0, timeout=600)
        left = list(range(total))

        async def worker():
            nonlocal rss_after_100, done
            while left:
                i = left.pop()
                try:
                    await client.chat.completions.create(model="m", max_tokens=tokens, temperature=0, messages=[
                        {"role": "user", "content": f"Request {i}: name a Python built-in."}])
                    code = 200
                except openai.APIStatusError as err:
                    code = err.status_code
                except openai.APIConnectionError:
                    code = 0
                codes[code] = codes.get(code, 0) + 1
                done += 1
                if done == 100:
                    rss_after_100 = proc.rss()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.close()
    start = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - start
    rss_end = proc.rss()
    proc.stop()
    server_errors = sum(n for c, n in codes.items() if c >= 500 or c == 0)
    return {"requests": total, "concurrency": concurrency, "codes": codes, "server_errors": server_errors,
            "seconds": wall, "rss_after_100": rss_after_100, "rss_end": rss_end,
            "rss_growth": rss_end / rss_after_100 - 1 if rss_after_100 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--peers", default="transformers,llama.cpp")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: servers, overhead, load")
    ap.add_argument("--work", default=None)
    ap.add_argument("--only", help="comma-separated parts of server names to measure (default: all)")
    ap.add_argument("--int8-recipe", default="w8-rtn")
    ap.add_argument("--int4-recipe", default="w4-g64-rtn")
    ap.add_argument("--out", default="benchmarks/results/serve-cpu.json")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="leanlm-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    levels = [int(c) for c in args.concurrency.split(",")]
    report = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "levels": levels, "requests": args.requests,
              "cpus": os.cpu_count()}
    if "servers" not in skip:
        paths = ModelFiles(work, args.model, {"int8": args.int8_recipe, "int4": args.int4_recipe})
        report["servers"] = measure_servers(paths, args.peers.split(","), levels, args.requests, work, args.only)
    if "overhead" not in skip:
        report["overhead"] = http_overhead(args.model, work)
        print(f"\nHTTP overhead at concurrency 1: {report['overhead']}")
    if "load" not in skip:
        report["load"] = load_run(args.model, work)
        print(f"\nload: {report['load']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    summarize(report)


def summarize(report: dict) -> None:
    rows = [s for s in report.get("servers", []) if "rows" in s]
    if not rows:
        return
    print(f"\n{'server':48} " + " ".join(f"{'c' + str(lv) + ' tok/s':>10} {'TTFT p50':>9}" for lv in report["levels"]))
    for s in rows:
        cells = " ".join(f"{r['output_tokens_per_s']:>10.1f} {(r['ttft_p50_s'] or 0) * 1000:>7.0f}ms" for r in s["rows"])
        print(f"{s['server']:48} {cells}")


if __name__ == "__main__":
    main()
