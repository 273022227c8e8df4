"""`leanlm cache calibrate` and `leanlm cache eval` over labelled pairs {"q1", "q2", "same", "kind"?}.

calibrate fits the verifier and picks its threshold for a false-hit target. The threshold is picked on
out-of-fold scores (5 folds grouped by q1, so no question is scored by weights that saw it), then the
weights are refit on every pair: the stated hit and false-hit rates are those of unseen pairs.

eval runs the semantic tier *as configured* (nothing is fitted on the file): for each pair, q1's answer
is stored in an empty cache and q2 is asked; it counts hits on same pairs and false hits on different
ones, overall and per kind."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leanlm.cache import guards_ops, verifier_ops
from leanlm.cache.semantic import Embedder, SemanticConfig, SemanticTier, features
from leanlm.errors import ConfigError


def load_pairs(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such pairs file (JSONL: one {{\"q1\", \"q2\", \"same\"}} per line)")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: expected an object with q1, q2 and same")
        missing = [k for k in ("q1", "q2", "same") if k not in row]
        if missing:
            raise ConfigError(f"{path}:{n}: missing {', '.join(missing)} (each line needs q1, q2 and same)")
        if not isinstance(row["same"], bool):
            raise ConfigError(f"{path}:{n}: same must be true or false, got {row['same']!r}")
        if not (isinstance(row["q1"], str) and isinstance(row["q2"], str) and row["q1"].strip() and row["q2"].strip()):
            raise ConfigError(f"{path}:{n}: q1 and q2 must be non-empty strings")
        pairs.append(row)
    if not pairs:
        raise ConfigError(f"{path}: holds no pairs")
    return pairs


def pair_table(pairs: list[dict], embedder: Embedder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, same, passed the guards) for every pair."""
    texts = sorted({p["q1"] for p in pairs} | {p["q2"] for p in pairs})
    vectors = dict(zip(texts, embedder.encode(texts)))
    x, same, passed = [], [], []
    for p in tqdm(pairs, desc="pair features", unit="pair"):
        cos = float(vectors[p["q1"]] @ vectors[p["q2"]])
        x.append(features(embedder, cos, p["q1"], p["q2"]))
        same.append(p["same"])
        passed.append(guards_ops.disagreement(guards_ops.facts(p["q1"]), guards_ops.facts(p["q2"])) is None)
    return np.array(x), np.array(same, dtype=bool), np.array(passed, dtype=bool)


def calibrate(pairs_path: str | Path, max_false_hits: float = 0.01, folds: int = 5, out: str | Path | None = None,
              embedder: Embedder | None = None) -> dict:
    pairs = load_pairs(pairs_path)
    if not 0 <= max_false_hits < 1:
        raise ConfigError(f"--max-false-hits must be in [0, 1), got {max_false_hits}")
    if len({p["same"] for p in pairs}) < 2:
        raise ConfigError(f"{pairs_path}: calibration needs both same and different pairs")
    embedder = embedder or Embedder()
    x, same, passed = pair_table(pairs, embedder)
    groups = {q: i % folds for i, q in enumerate(sorted({p["q1"] for p in pairs}))}
    fold = np.array([groups[p["q1"]] for p in pairs])
    scores = np.zeros(len(pairs))
    fit_on = passed  # the verifier only ever sees pairs the guards let through
    for k in range(folds):
        train, test = (fold != k) & fit_on, fold == k
        w, b, m, s = verifier_ops.fit_logistic(x[train], same[train].astype(float), signs=verifier_ops.SIGNS)
        scores[test] = verifier_ops.predict(x[test], w, b, m, s)
    pick = verifier_ops.pick_threshold(scores, same, passed, max_false_hits)
    best = verifier_ops.pick_threshold(scores, same, passed, 1.0)
    if pick is None or pick["hit_rate"] == 0:
        lowest = min(((scores >= t) & passed & ~same).sum() / max(1, (~same).sum()) for t in sorted(set(scores)))
        raise ConfigError(f"no threshold reaches a false-hit rate of {max_false_hits:.1%} with any hits on "
                          f"{pairs_path}: the best it found is {lowest:.1%} (at a hit rate of {best['hit_rate']:.1%} "
                          "for the loosest threshold); add labelled pairs or accept a higher --max-false-hits")
    w, b, m, s = verifier_ops.fit_logistic(x[fit_on], same[fit_on].astype(float), signs=verifier_ops.SIGNS)
    config = SemanticConfig(threshold=pick["threshold"], weights=w.tolist(), bias=b, mean=m.tolist(), scale=s.tolist(),
                            calibration={"pairs": len(pairs), "file": Path(pairs_path).name,
                                         "max_false_hits": max_false_hits, "folds": folds,
                                         "held_out_hit_rate": pick["hit_rate"],
                                         "held_out_false_hit_rate": pick["false_hit_rate"],
                                         "threshold_means": "the verifier's probability that two questions are the "
                                                            "same, after the guards; picked on out-of-fold scores",
                                         "features": list(verifier_ops.FEATURES)})
    data = asdict(config)
    if out:
        tmp = Path(str(out) + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(out)
    return data


def evaluate(pairs_path: str | Path, config_path: str | Path | None = None, embedder: Embedder | None = None) -> dict:
    """The semantic tier as configured, one empty cache per pair."""
    from leanlm.cache.sqlite_store import SQLiteStore

    pairs = load_pairs(pairs_path)
    config = SemanticConfig.load(config_path)
    embedder = embedder or Embedder()
    counts: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(tmp)
        tier = SemanticTier(store, config, embedder)
        for i, p in enumerate(tqdm(pairs, desc="cache eval", unit="pair")):
            tenant = f"pair-{i}"  # an empty cache for each pair
            ask = {"model": "m", "temperature": 0.0, "messages": [{"role": "user", "content": p["q1"]}]}
            tier.remember(tenant, "model", ask, b'{"answer": 1}', {}, None)
            hit = tier.lookup(tenant, "model", {**ask, "messages": [{"role": "user", "content": p["q2"]}]}) is not None
            for key in ("all", p.get("kind") or "unlabelled"):
                c = counts.setdefault(key, [0, 0, 0, 0])  # same pairs, their hits, different pairs, their hits
                c[0 if p["same"] else 2] += 1
                c[1 if p["same"] else 3] += int(hit)
        store.close()

    def rates(c):
        return {"same_pairs": c[0], "hit_rate": c[1] / c[0] if c[0] else None, "different_pairs": c[2],
                "false_hit_rate": c[3] / c[2] if c[2] else None}
    return {"pairs": len(pairs), "threshold": config.threshold, **rates(counts.pop("all")),
            "by_kind": {k: rates(v) for k, v in sorted(counts.items())}}
