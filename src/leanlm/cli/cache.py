"""`leanlm cache`: inspect, clear, evaluate and calibrate leanlm serve's response cache."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from leanlm.cli.options import command

    p = command(sub, "cache", "inspect, clear, evaluate and calibrate the response cache",
                "Work on the response cache `leanlm serve --cache ...` uses: `stats` (entries, hits and misses per "
                "tier, tokens and seconds saved), `clear` (everything, or one tenant's entries).", run)
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
