"""Near-duplicate and conflict detection on planted data built from Python's documentation.

Chunks: the built-in corpus' paragraphs merged to ~50 words (about 1,300 chunks). Planted copies: exact ones,
ones that differ only in case and whitespace, and near ones (5-15% of words deleted, swapped with a
neighbour or replaced, case and whitespace changed, half with a boilerplate sentence appended). Measured:
recall of each kind, precision of what was removed (a removal is right when the record and the one it was
matched to come from the same chunk), and records/s for exact + near-duplicate detection; datasketch and
rensa at their usual settings (128 permutations, word 5-grams, LSH threshold 0.8) in the same run.
Conflicts: question/answer chat records with planted contradicting answers and agreeing rephrasings.

Throughput: 100,000 distinct synthetic records through the exact and near-duplicate stages, end to end, with
1 and 2 workers, against rensa's bare loop. Memory: 1,000,000 short records through every default stage.

    python benchmarks/clean_dedup.py [--json benchmarks/results/clean_dedup.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

BOILERPLATE = ["Subscribe to our newsletter for more updates.", "Copyright 2024 All rights reserved.",
               "Click here to read the full article.", "This page was last edited on 3 March.",
               "Share this post with your friends."]


def chunks(target_words: int = 40) -> list[str]:
    from pydoc_data import topics

    out = []
    for k in sorted(topics.topics):
        buf = []
        for para in re.split(r"\n\s*\n", topics.topics[k]):
            if para.strip():
                buf.append(para.strip())
                if sum(len(p.split()) for p in buf) >= target_words:
                    out.append("\n\n".join(buf))
                    buf = []
        if buf:
            out.append("\n\n".join(buf))
    # the manual repeats some sections word for word: distinct chunks only, so every copy is a planted one
    seen, distinct = set(), []
    for c in out:
        key = " ".join(c.lower().split())
        if key not in seen:
            seen.add(key)
            distinct.append(c)
    return distinct


def near_copy(text: str, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    edits = max(1, round(rng.uniform(0.05, 0.15) * len(words)))
    for _ in range(edits):
        i = rng.randrange(len(words))
        kind = rng.choice(("delete", "swap", "replace"))
        if kind == "delete" and len(words) > 2:
            del words[i]
        elif kind == "swap" and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words[i] = rng.choice(vocab)
    words = [w.upper() if rng.random() < 0.05 else w for w in words]
    out = "".join(w + rng.choice((" ", " ", " ", "  ", "\n")) for w in words).strip()
    if rng.random() < 0.5:
        out = out.lower()
    if rng.random() < 0.5:
        out += " " + rng.choice(BOILERPLATE)
    return out


def planted(seed: int = 0):
    """Records (text, origin chunk, kind) in shuffled order."""
    rng = random.Random(seed)
    base = chunks()
    vocab = sorted({w for c in base for w in c.split()})
    rows = [(c, i, "original") for i, c in enumerate(base)]
    for i, c in enumerate(base):
        r = rng.random()
        if r < 0.10:
            rows.append((c, i, "exact"))
        elif r < 0.15:
            rows.append(("  ".join(c.upper().split()), i, "normalized"))
        elif r < 0.45:
            rows += [(near_copy(c, rng, vocab), i, "near") for _ in range(rng.choice((1, 1, 2)))]
    rng.shuffle(rows)
    return rows


def oracle_pairs(rows) -> set[tuple[int, int]]:
    """Pairs of chunks that the manual itself holds as near-copies: their unedited texts already clear leanlm's
    default exact-similarity threshold, so matching copies of them is right, not a false positive."""
    from leanlm.clean.config import NearConfig
    from leanlm.clean.near_ops import similarity
    from leanlm.clean.text_ops import shingles, words

    cfg = NearConfig()
    base = {c: shingles(words(t), cfg.ngram, cfg.drop_stopwords) for t, c, k in rows if k == "original"}
    ids = sorted(base)
    return {(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if similarity(base[a], base[b], cfg.measure) >= cfg.threshold}


def score(rows, removed: dict[int, int | None], oracle: set[tuple[int, int]]) -> dict:
    """Recall per planted kind (a copy counts when it, or its chunk's other record, was removed as a duplicate
    of a record from the same chunk) and precision of the removals."""
    by_chunk: dict[int, list[int]] = {}
    for i, (_, c, _) in enumerate(rows):
        by_chunk.setdefault(c, []).append(i)
    same = sum(1 for i, of in removed.items() if of is not None and rows[of][1] == rows[i][1])
    right = sum(1 for i, of in removed.items() if of is not None and (
        rows[of][1] == rows[i][1] or tuple(sorted((rows[of][1], rows[i][1]))) in oracle))
    recall = {}
    for kind in ("exact", "normalized", "near"):
        copies = [i for i, r in enumerate(rows) if r[2] == kind]
        # one record of each chunk survives; a copy is found when its chunk shrank by one for it
        found = sum(1 for i in copies if i in removed or any(j in removed and rows[j][2] == "original"
                                                             for j in by_chunk[rows[i][1]]))
        recall[kind] = found / len(copies) if copies else None
    n = len(removed)
    return {"recall": recall, "precision": right / n if n else None, "precision_planted_only": same / n if n else None,
            "removed": n}


def run_leanlm(rows) -> tuple[dict[int, int | None], float]:
    from leanlm.clean import clean

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t, _, _ in rows))
        cfg = {"quality": {"enabled": False}, "pii": {"enabled": False}, "conflicts": {"enabled": False}}
        t0 = time.perf_counter()
        clean([src], Path(tmp) / "out", cfg, progress=False)
        seconds = time.perf_counter() - t0
        removed = {}
        for line in (Path(tmp) / "out" / "removed.jsonl").read_text().splitlines():
            row = json.loads(line)
            removed[row["index"]] = row["of"]
    return removed, seconds


def run_peer(rows, library: str) -> tuple[dict[int, int | None], float]:
    """The usual setting: whitespace words of the lower-cased text, 5-grams, 128 permutations, LSH at 0.8."""
    t0 = time.perf_counter()
    sets = []
    for text, _, _ in rows:
        w = text.lower().split()
        sets.append([" ".join(w[i:i + 5]) for i in range(max(1, len(w) - 4))])
    removed = {}
    if library == "rensa":
        from rensa import RMinHash, RMinHashLSH

        lsh = RMinHashLSH(threshold=0.8, num_perm=128, num_bands=16)
        for i, s in enumerate(sets):
            m = RMinHash(num_perm=128, seed=42)
            m.update(s)
            hits = [j for j in lsh.query(m) if j < i and j not in removed]
            if hits:
                removed[i] = min(hits)
            else:
                lsh.insert(i, m)
    else:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=0.8, num_perm=128)
        for i, s in enumerate(sets):
            m = MinHash(num_perm=128, seed=42)
            m.update_batch([x.encode() for x in s])
            hits = [j for j in lsh.query(m) if j not in removed]
            if hits:
                removed[i] = min(hits)
            else:
                lsh.insert(i, m)
    return removed, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="benchmarks/results/clean_dedup.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--throughput", type=int, default=100_000, help="synthetic records for the records/s row (0: skip)")
    ap.add_argument("--memory", type=int, default=1_000_000, help="short records for the peak-RSS row (0: skip)")
    args = ap.parse_args()
    results = []
    for seed in range(args.seeds):
        rows = planted(seed)
        oracle = oracle_pairs(rows)
        for name, fn in (("leanlm", run_leanlm), ("rensa 5-gram/0.8", lambda r: run_peer(r, "rensa")),
                         ("datasketch 5-gram/0.8", lambda r: run_peer(r, "datasketch"))):
            removed, seconds = fn(rows)
            results.append({"seed": seed, "tool": name, "records": len(rows), "seconds": seconds,
                            "records_per_s": len(rows) / seconds, **score(rows, removed, oracle)})
    print(f"{'tool':24} {'seed':>4} {'records':>7} {'exact':>6} {'norm.':>6} {'near':>6} {'precision':>9} {'planted':>8} {'rec/s':>8}")
    for r in results:
        rc = r["recall"]
        print(f"{r['tool']:24} {r['seed']:4d} {r['records']:7d} {rc['exact']:6.1%} {rc['normalized']:6.1%} "
              f"{rc['near']:6.1%} {r['precision']:9.1%} {r['precision_planted_only']:8.1%} {r['records_per_s']:8.0f}")
    speed = throughput(args.throughput) if args.throughput else None
    if speed:
        print(f"\nthroughput on {speed['records']} distinct synthetic records (exact + near stages, end to end): "
              f"leanlm {speed['leanlm_records_per_s']:.0f} rec/s with {speed['workers']} workers "
              f"({speed['leanlm_1_worker_records_per_s']:.0f} with 1), rensa's bare loop {speed['rensa_records_per_s']:.0f} "
              f"rec/s (ratio {speed['leanlm_records_per_s'] / speed['rensa_records_per_s']:.2f})")
    mem = memory(args.memory) if args.memory else None
    if mem:
        print(f"all default stages on {mem['records']} short records ({mem['input_mb']:.0f} MB of JSONL, 10% copies), "
              f"{mem['workers']} workers: peak RSS {mem['peak_rss_mb']:.0f} MB, {mem['records_per_s']:.0f} rec/s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"results": results, "throughput": speed, "memory": mem, "date": time.strftime("%Y-%m-%d"),
                                           "python": sys.version.split()[0]}, indent=2))


def synthetic(count: int, seed: int = 0) -> list[str]:
    """Distinct short records whose words follow the manual's word frequencies, for throughput."""
    rng = random.Random(seed)
    stream = " ".join(chunks()).split()
    out = []
    for _ in range(count):
        out.append(" ".join(rng.choices(stream, k=rng.randrange(20, 60))))
    return out


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def throughput(count: int, workers: int = 2, repeats: int = 3) -> dict:
    """Records/s of `leanlm data clean` with the exact and near-duplicate stages only, end to end (reading
    JSONL, three passes, writing), and of rensa's usual loop on the same records; medians of `repeats` runs
    (this machine is shared, single runs vary by a third)."""
    from leanlm.clean import clean

    texts = synthetic(count)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "many.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cfg = {"quality": {"enabled": False}, "pii": {"enabled": False}, "conflicts": {"enabled": False}}
        seconds1 = _median_seconds(lambda i: clean([src], Path(tmp) / f"one{i}", cfg, progress=False), repeats)
        seconds = _median_seconds(lambda i: clean([src], Path(tmp) / f"two{i}", cfg, progress=False,
                                                  workers=workers), repeats)
        report = json.loads((Path(tmp) / "two0" / "report.json").read_text())
    peer_seconds = _median_seconds(lambda i: run_peer([(t, 0, "") for t in texts], "rensa"), repeats)
    return {"records": count, "workers": workers, "leanlm_seconds": seconds, "leanlm_records_per_s": count / seconds,
            "leanlm_1_worker_records_per_s": count / seconds1,
            "rensa_seconds": peer_seconds, "rensa_records_per_s": count / peer_seconds,
            "near_candidates": report["stats"].get("near_candidates"), "removed": report["counts"]}


def memory(count: int, workers: int = 2) -> dict:
    """Peak RSS of `leanlm data clean` (all stages at their defaults) on `count` short synthetic records with
    10% planted copies, summed over the process and its workers, sampled every 0.1 s."""
    import subprocess

    import psutil

    rng = random.Random(1)
    stream = " ".join(chunks()).split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "short.jsonl"
        with open(src, "w") as fh:
            prev = []
            for _ in range(count):
                text = rng.choice(prev) if prev and rng.random() < 0.1 else " ".join(rng.choices(stream, k=rng.randrange(8, 30)))
                prev = (prev + [text])[-100:]
                fh.write(json.dumps({"text": text}) + "\n")
        cmd = [sys.executable, "-m", "leanlm", "data", "clean", str(src), "--out", str(Path(tmp) / "out"),
               "--workers", str(workers), "--json"]
        input_mb = src.stat().st_size / 2**20
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        parent, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]))
            except psutil.Error:  # a worker ended between listing and reading
                pass
            time.sleep(0.1)
        out, _ = proc.communicate()
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        report = json.loads(out)
    return {"records": count, "workers": workers, "peak_rss_mb": peak / 2**20, "seconds": seconds,
            "records_per_s": count / seconds, "counts": report["counts"], "input_mb": input_mb}


if __name__ == "__main__":
    main()
