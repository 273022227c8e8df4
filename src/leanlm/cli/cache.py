"""`leanlm cache`: inspect, clear, evaluate and calibrate leanlm serve's response cache."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from leanlm.cli.options import command

    p = command(sub, "cache", "inspect, clear, evaluate and calibrate the response cache",
                "Work on the response cache `leanlm serve --cache ...` uses: `stats` (entries, hits and misses per "
                "tier, tokens and seconds saved), `clear` (everything, or one tenant's entries), `calibrate` (fit the "
                "semantic verifier on labelled pairs), `eval` (run the semantic tier over labelled pairs).", run)
    groups = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for name, help_, action in (("stats", "entries, hits and misses per tier, what they saved", run_stats),
                                ("clear", "delete cached answers (all, or one tenant's)", run_clear)):
        q = groups.add_parser(name, help=help_, description=help_)
        q.set_defaults(action=action)
        q.add_argument("--cache-store", metavar="URL", help="sqlite (default, in --cache-dir) or redis://HOST:PORT/DB")
        q.add_argument("--cache-dir", default="~/.cache/leanlm/serve-cache", help="where the SQLite store lives")
        if name == "stats":
            q.add_argument("--price-per-million", type=float, help="$ per million generated tokens, to price the savings")
            q.add_argument("--json", action="store_true", help="print JSON")
        else:
            q.add_argument("--tenant", help="only this tenant's entries")
    q = groups.add_parser("calibrate", help="fit the semantic verifier and pick its threshold on labelled pairs",
                          description="Fit the semantic tier's verifier on PAIRS (JSONL: q1, q2, same) and pick the "
                                      "lowest threshold whose false-hit rate on out-of-fold scores is within "
                                      "--max-false-hits; write the config `leanlm serve --semantic-config` reads.")
    q.set_defaults(action=run_calibrate)
    q.add_argument("pairs")
    q.add_argument("--max-false-hits", type=float, default=0.01, help="different pairs served, at most (default: 0.01)")
    q.add_argument("--out", required=True, help="where to write the config (JSON)")
    q = groups.add_parser("eval", help="run the semantic tier as configured over labelled pairs",
                          description="For each pair of PAIRS, store an answer for q1 in an empty cache and ask q2; "
                                      "print the hit rate (same pairs) and false-hit rate (different pairs), per kind "
                                      "too. Nothing is fitted on the file.")
    q.set_defaults(action=run_eval)
    q.add_argument("pairs")
    q.add_argument("--config", help="a config from `leanlm cache calibrate` (default: the shipped one)")
    q.add_argument("--json", action="store_true")


def run(args) -> int:
    return args.action(args)


def _store(args):
    from pathlib import Path

    from leanlm.cache.response_cache import CacheConfig, open_store

    return open_store(args.cache_store, str(Path(args.cache_dir).expanduser()), CacheConfig())


def run_stats(args) -> int:
    store = _store(args)
    counters = store.counters()
    hits = {k[5:]: v for k, v in counters.items() if k.startswith("hits_")}
    misses = counters.get("misses", 0)
    looked = sum(hits.values()) + misses
    out = {"store": store.kind, "entries": store.count(), "hits": hits, "misses": misses,
           "hit_rate": sum(hits.values()) / looked if looked else None,
           "tokens_saved": counters.get("tokens_saved", 0), "seconds_saved": counters.get("seconds_saved", 0)}
    if args.price_per_million is not None:
        out["dollars_saved"] = out["tokens_saved"] / 1e6 * args.price_per_million
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"store: {out['store']}")
    for tier, e in out["entries"].items():
        print(f"  {tier}: {e['entries']} entries" + (f", {e['bytes'] / 1e6:.1f} MB" if e.get("bytes") else ""))
    print(f"lookups: {looked:.0f}; hits " + (", ".join(f"{t} {n:.0f}" for t, n in hits.items()) or "none")
          + f"; misses {misses:.0f}" + (f"; hit rate {out['hit_rate']:.1%}" if looked else ""))
    print(f"saved: {out['tokens_saved']:.0f} generated tokens, {out['seconds_saved']:.1f} s of generation"
          + (f", ${out['dollars_saved']:.4f}" if "dollars_saved" in out else ""))
    return 0


def run_clear(args) -> int:
    removed = _store(args).clear(args.tenant)
    print(f"removed {removed} cached answers" + (f" of tenant {args.tenant!r}" if args.tenant else ""))
    return 0


def run_calibrate(args) -> int:
    from leanlm.cache.calibrate import calibrate

    data = calibrate(args.pairs, args.max_false_hits, out=args.out)
    c = data["calibration"]
    print(f"threshold {data['threshold']:.4f} (verifier probability, after the guards): on unseen pairs "
          f"{c['held_out_hit_rate']:.1%} of same pairs hit, {c['held_out_false_hit_rate']:.2%} of different pairs "
          f"were served; wrote {args.out}")
    return 0


def run_eval(args) -> int:
    from leanlm.cache.calibrate import evaluate

    out = evaluate(args.pairs, args.config)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0

    def pct(v):
        return "-" if v is None else f"{v:.1%}"
    print(f"{out['pairs']} pairs, threshold {out['threshold']:.4f}: hit_rate {pct(out['hit_rate'])} "
          f"({out['same_pairs']} same), false_hit_rate {pct(out['false_hit_rate'])} ({out['different_pairs']} different)")
    for kind, r in out["by_kind"].items():
        print(f"  {kind:12} hit_rate {pct(r['hit_rate']):>6} of {r['same_pairs']:<4} false_hit_rate "
              f"{pct(r['false_hit_rate']):>6} of {r['different_pairs']}")
    return 0
