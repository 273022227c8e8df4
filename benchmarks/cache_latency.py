"""The response cache's own latency, in process: an exact hit (key + SQLite read + checksum) and a semantic
lookup (embed the question, search N stored vectors, guards and verifier on the candidates) with N
entries in the cache, both for entries this server stored (their questions were analysed when stored, as
`remember` does) and for entries another server wrote (analysed at their first lookup); and the semantic tier's pair numbers (held-out rates from its calibration, raw
cosine on the same pairs). Prints a table and writes JSON.

    python benchmarks/cache_latency.py --entries 10000 --out benchmarks/results/cache-latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leanlm.cache.keys import request_key  # noqa: E402
from leanlm.cache.response_cache import CacheConfig, ResponseCache  # noqa: E402
from leanlm.cache.semantic import Embedder, SemanticConfig, SemanticTier, split_request  # noqa: E402
from leanlm.cache.sqlite_store import SQLiteStore  # noqa: E402
from leanlm.data.corpus import default_corpus  # noqa: E402


def questions(n: int) -> list[str]:
    """n distinct question-like lines from the built-in corpus."""
    text = default_corpus().train
    lines = [line.strip() for line in text.splitlines() if 20 < len(line.strip()) < 160]
    out = list(dict.fromkeys(lines))
    while len(out) < n:
        out += [f"{line} (variant {len(out)})" for line in lines[: n - len(out)]]
    return [f"What does this mean: {q}?" for q in out[:n]]


def p50(xs):
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/cache-latency.json")
    args = ap.parse_args()
    qs = questions(args.entries)
    embedder = Embedder()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(tmp, max_entries=args.entries * 3)
        tier = SemanticTier(store, embedder=embedder)
        cache = ResponseCache(store, "fp", CacheConfig(), tier)
        body = {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": "x" * 400}}],
                "usage": {"completion_tokens": 100}}
        start = time.perf_counter()
        vectors = embedder.analyse(qs)  # what remember() computes, in batches
        for q, v in zip(qs, vectors):  # filled directly, as remember() would, without re-embedding
            request = {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": q}]}
            store.put(request_key("t", "fp", "chat", request), json.dumps(body).encode(), tenant="t", model="fp",
                      tier="exact", ttl=None)
            context = split_request(request)[1]
            meta = {"question": q, "context": context, "vector": [round(float(x), 6) for x in v]}
            store.put("s" + request_key("t", "fp", "chat", request), json.dumps(body).encode(), tenant="t",
                      model="fp", tier="semantic", ttl=None, meta=meta)
        fill_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        picks = [qs[i] for i in rng.integers(0, len(qs), args.lookups)]
        exact, semantic, cold = [], [], []
        # a second server on the same store: its embedder has analysed none of the stored questions
        other = SemanticTier(SQLiteStore(tmp, max_entries=args.entries * 3), embedder=Embedder())
        for t in (tier, other):
            t.lookup("t", "fp", {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": "warm"}]})
        for q in picks:
            request = {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": q}]}
            t0 = time.perf_counter()
            found, tier_name = cache.lookup("t", "chat", request)
            exact.append(time.perf_counter() - t0)
            assert tier_name == "exact"
            para = {**request, "messages": [{"role": "user", "content": q.replace("What does this mean", "Explain")}]}
            t0 = time.perf_counter()
            tier.lookup("t", "fp", para)
            semantic.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            other.lookup("t", "fp", para)
            cold.append(time.perf_counter() - t0)
    calib = SemanticConfig.load().calibration
    report = {"entries": args.entries, "exact_hit_p50_ms": p50(exact) * 1000,
              "exact_hit_p99_ms": float(np.percentile(exact, 99)) * 1000,
              "semantic_lookup_p50_ms": p50(semantic) * 1000,
              "semantic_lookup_p99_ms": float(np.percentile(semantic, 99)) * 1000,
              "semantic_cold_p50_ms": p50(cold) * 1000, "semantic_cold_p99_ms": float(np.percentile(cold, 99)) * 1000,
              "fill_s": fill_s,
              "calibration": calib, "date": time.strftime("%Y-%m-%d")}
    print(f"{'entries':>8} {'exact p50':>10} {'exact p99':>10} {'semantic p50':>13} {'semantic p99':>13} "
          f"{'cold p50':>10} {'cold p99':>10}")
    print(f"{args.entries:>8} {report['exact_hit_p50_ms']:>8.2f}ms {report['exact_hit_p99_ms']:>8.2f}ms "
          f"{report['semantic_lookup_p50_ms']:>11.1f}ms {report['semantic_lookup_p99_ms']:>11.1f}ms "
          f"{report['semantic_cold_p50_ms']:>8.1f}ms {report['semantic_cold_p99_ms']:>8.1f}ms")
    print("semantic: entries this server stored; cold: the same entries read by a server that did not store them")
    print(f"semantic tier, held out: hit rate {calib.get('held_out_hit_rate')} at false-hit rate "
          f"{calib.get('held_out_false_hit_rate')} on {calib.get('pairs')} pairs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
