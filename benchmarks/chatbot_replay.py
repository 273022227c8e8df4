"""A chatbot replay through real servers: Zipf-distributed repeated questions, a third of the repeats
paraphrased, and near-miss questions that must not be answered from another question's entry, sent to
`leanlm serve --cache exact,semantic` and to the same server without a cache. Reports requests/s of both,
hits by tier, and the rate of wrong cached answers judged against the pair labels. Prints a table and
writes JSON.

The questions come from the hand-labelled pairs (tests/data/cache_pairs.jsonl): each first question and
the questions labelled the same as it form one class; a question labelled different from it (a near miss:
"convert an int to a string" against "a string to an int") is a topic of its own. A cached answer is
wrong when the question that produced it is not in the asking question's class. The pairs are the ones
the shipped verifier was calibrated on, so its rate here is an in-sample figure; its held-out rates are
in BENCHMARKS.md.

    python benchmarks/chatbot_replay.py --requests 2000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Proc, free_port, leanlm_cmd  # noqa: E402

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "data" / "cache_pairs.jsonl"


def classes(pairs: list[dict]) -> tuple[list[str], dict[str, list[str]], dict[str, int]]:
    """(topics, paraphrases of each topic, class of every question)."""
    cls: dict[str, int] = {}
    para: dict[str, list[str]] = {}
    for p in pairs:
        cls.setdefault(p["q1"], len(cls))
        if p["same"]:
            para.setdefault(p["q1"], []).append(p["q2"])
            cls.setdefault(p["q2"], cls[p["q1"]])
    for p in pairs:
        cls.setdefault(p["q2"], len(cls))  # a near miss with no paraphrase label: a class of its own
    topics = list(dict.fromkeys([p["q1"] for p in pairs] + [p["q2"] for p in pairs if not p["same"]]))
    return topics, para, cls


def workload(pairs: list[dict], total: int, zipf_s: float, paraphrased: float, seed: int) -> list[str]:
    topics, para, _ = classes(pairs)
    rng = random.Random(seed)
    rng.shuffle(topics)
    weights = [1 / (rank + 1) ** zipf_s for rank in range(len(topics))]
    asked: set[str] = set()
    out = []
    for topic in rng.choices(topics, weights, k=total):
        if topic in asked and para.get(topic) and rng.random() < paraphrased:
            out.append(rng.choice(para[topic]))
        else:
            out.append(topic)
        asked.add(topic)
    return out


async def replay(url: str, questions: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    queue = list(enumerate(questions))
    results: list[dict | None] = [None] * len(questions)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i, q = queue.pop(0)
            body = {"model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                    "temperature": 0}
            start = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            seconds = time.perf_counter() - start
            answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
            results[i] = {"question": q, "status": r.status_code, "seconds": seconds, "answer": answer,
                          "cache": r.headers.get("x-leanlm-cache", "-")}

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    rows = [r for r in results if r is not None]
    for r in rows:
        r["wall"] = wall
    return rows


def judge(rows: list[dict], cls: dict[str, int]) -> dict:
    """Hits by tier and wrong cached answers: a hit is right when a question of the asker's class produced
    that answer (misses and exact hits say which questions produced which answers)."""
    producers: dict[str, set[int]] = {}
    for r in rows:
        if r["cache"] == "miss" and r["answer"] is not None:
            producers.setdefault(r["answer"], set()).add(cls[r["question"]])
    hits = [r for r in rows if r["cache"].startswith("hit")]
    wrong = [r for r in hits if cls[r["question"]] not in producers.get(r["answer"], set())]
    semantic = [r for r in hits if r["cache"] == "hit-semantic"]
    return {"hits": len(hits), "exact_hits": sum(r["cache"] == "hit-exact" for r in hits),
            "semantic_hits": len(semantic), "wrong": len(wrong),
            "wrong_rate_of_hits": len(wrong) / max(1, len(hits)),
            "wrong_rate_of_requests": len(wrong) / max(1, len(rows)),
            "wrong_examples": [r["question"] for r in wrong[:10]]}


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    hit_s = [r["seconds"] for r in ok if r["cache"].startswith("hit")]
    return {"requests": len(rows), "errors": len(rows) - len(ok), "seconds": rows[0]["wall"],
            "requests_per_s": len(rows) / rows[0]["wall"],
            "latency_p50_s": statistics.median(r["seconds"] for r in ok),
            "hit_latency_p50_ms": statistics.median(hit_s) * 1000 if hit_s else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--baseline-requests", type=int, default=300,
                    help="requests replayed against the server without a cache (its rate does not depend on repeats)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--paraphrased", type=float, default=1 / 3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/chatbot-replay.json")
    args = ap.parse_args()
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    questions = workload(pairs, args.requests, args.zipf, args.paraphrased, args.seed)
    _, _, cls = classes(pairs)
    report = {"settings": vars(args), "unique_questions": len(set(questions)), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="leanlm-replay-") as tmp:
        work = Path(tmp)
        for label, extra, count in (("no cache", [], args.baseline_requests),
                                    ("cache exact,semantic", ["--cache", "exact,semantic", "--cache-dir",
                                                              str(work / "cache")], args.requests)):
            port = free_port()
            print(f"== {label}: {count} requests at concurrency {args.concurrency}", flush=True)
            proc = Proc(label, leanlm_cmd(args.model, port, "m", extra), f"http://127.0.0.1:{port}",
                        work / f"{label.split()[0]}.log")
            try:
                rows = asyncio.run(replay(proc.url, questions[:count], args.concurrency, args.max_tokens))
            finally:
                proc.stop()
            report[label] = summary(rows)
            if extra:
                report[label].update(judge(rows, cls))
    base, cached = report["no cache"], report["cache exact,semantic"]
    report["speedup"] = cached["requests_per_s"] / base["requests_per_s"]
    print(f"\n{report['unique_questions']} distinct questions in {args.requests} requests\n")
    print(f"{'server':22} {'requests':>8} {'req/s':>8} {'p50 s':>7} {'hits':>6} {'semantic':>8} {'wrong':>6}")
    for label in ("no cache", "cache exact,semantic"):
        r = report[label]
        print(f"{label:22} {r['requests']:>8} {r['requests_per_s']:>8.2f} {r['latency_p50_s']:>7.3f} "
              f"{r.get('hits', '-'):>6} {r.get('semantic_hits', '-'):>8} {r.get('wrong', '-'):>6}")
    print(f"\nrequests/s with the cache: {report['speedup']:.2f}x; wrong cached answers: "
          f"{cached['wrong']} ({cached['wrong_rate_of_requests']:.2%} of requests, "
          f"{cached['wrong_rate_of_hits']:.2%} of hits)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
