"""Two `leanlm auto` searches compared at several budgets: for each budget, the best objective each search
found among its trials within that budget. Used for the issue's quantization-only comparison: a search
over every family against the same search restricted to `--families quantize` (what ModelOpt, INC and
auto-round can reach), same model, objective and time limit.

Both searches' trials are read at the same fidelity: each trial's quality on the search windows (held-out
training text), so no search is favoured by having had its points measured in full. The reference recipes
(--compare) are left out unless --references names the ones to count (give only recipes both searches ran:
a search that was handed more references would be favoured).

    python benchmarks/auto_fronts.py --all DIR_A --quantize-only DIR_B --budgets 0.02,0.05,0.15 --metric kld
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from leanlm.auto.budget import OBJECTIVES, better


def trials(directory: Path, references: set[str]) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (directory / "trials.jsonl").read_text().splitlines() if line.strip()]
    settings = json.loads((directory / "search.json").read_text())["settings"]
    full = settings["search_windows"]
    counted = [r for r in rows if r.get("number", -1) >= 0 or r.get("name", "").removeprefix("recipe ") in references]
    kept = [r for r in counted if r.get("status") == "ok" and r.get("fidelity") == full and r.get("objective") is not None]
    return kept, settings


def best_within(rows: list[dict], metric: str, limit: float, objective: str) -> dict | None:
    best = None
    for r in rows:
        value = (r.get("quality") or {}).get(metric)
        if value is None or value > limit:
            continue
        if best is None or better(objective, r["objective"], best["objective"]):
            best = r
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", required=True, help="output directory of the search over every family")
    ap.add_argument("--quantize-only", required=True, help="output directory of the --families quantize search")
    ap.add_argument("--budgets", default="0.02,0.05,0.15")
    ap.add_argument("--metric", default="kld", help="a quality key where lower is better (kld)")
    ap.add_argument("--references", default="", help="comma-separated reference recipes both searches ran, counted "
                                                      "in both fronts (default: none)")
    ap.add_argument("--json", default="benchmarks/results/auto-fronts.json")
    args = ap.parse_args()
    references = {r for r in args.references.split(",") if r}
    every, settings = trials(Path(args.all), references)
    quant, quant_settings = trials(Path(args.quantize_only), references)
    objective = settings["objective"]
    if quant_settings["objective"] != objective:
        raise SystemExit(f"the searches optimized different objectives ({objective}, {quant_settings['objective']})")
    unit = OBJECTIVES[objective][2]
    rows = []
    print(f"\nobjective {objective} ({unit}); {len(every)} trials over every family, {len(quant)} quantize-only\n")
    print(f"{args.metric + ' <=':>8} {'every family':>14} {'quantize only':>14}  verdict   best of every family")
    for limit in (float(x) for x in args.budgets.split(",")):
        a, q = (best_within(every, args.metric, limit, objective), best_within(quant, args.metric, limit, objective))
        av, qv = (a or {}).get("objective"), (q or {}).get("objective")
        if av is None:
            verdict = "none" if qv is None else "lost"
        elif qv is None or better(objective, av, qv) or av == qv:
            verdict = "dominates" if qv is None or av != qv else "equal"
        else:
            verdict = "lost"
        rows.append({"budget": limit, "every_family": av, "every_family_trial": (a or {}).get("name"),
                     "quantize_only": qv, "quantize_only_trial": (q or {}).get("name"), "verdict": verdict})
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print(f"{limit:8.3g} {fmt(av):>14} {fmt(qv):>14}  {verdict:9} {(a or {}).get('name', '-')[:90]}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"objective": objective, "metric": args.metric, "rows": rows,
                                           "references": sorted(references),
                                           "settings": {"every_family": settings, "quantize_only": quant_settings},
                                           "date": time.strftime("%Y-%m-%d")}, indent=2, default=str))


if __name__ == "__main__":
    main()
