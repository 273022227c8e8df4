"""leanlm auto against the shipped recipes, on the default model and data, in one run.

The shipped recipes that train (LoRA, healing: 15-20 CPU minutes each) are left out of the comparison;
the others are passed to `auto --compare`, so they are measured by the same code, on the same eval windows,
with the same fresh-process benchmarks, in the same run as the search's finalists. Prints a table and
writes JSON.

    python benchmarks/bench_auto.py --budget kld<=0.05 --objective decode_tps --time-limit 60m --out /tmp/auto-bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from leanlm.auto import auto
from leanlm.pipeline.recipe import load_recipe, shipped_recipes


def untrained_recipes(runtime: str) -> list[str]:
    names = []
    for name in sorted(shipped_recipes()):
        steps = load_recipe(name).steps
        kinds = {s.type for s in steps}
        if not steps or kinds & {"finetune", "distill"}:
            continue
        if runtime == "llama.cpp" and kinds & {"act_sparsity", "moefy", "sparse24"}:
            continue  # no GGUF equivalent
        names.append(name)
    return names


def finished_run(directory: Path) -> dict:
    """A finished search's report, read back from the files `leanlm auto` wrote in `directory`."""
    search = directory / "search.json"
    if not search.is_file():
        raise SystemExit(f"{directory} holds no search.json: not the output directory of a finished leanlm auto run")
    report = json.loads(search.read_text())
    lines = (directory / "trials.jsonl").read_text().splitlines()
    report["results"] = [json.loads(line) for line in lines if line.strip()]
    report["minutes"] = None  # the run's wall time is not in its files
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", action="append", default=None)
    ap.add_argument("--objective", default="decode_tps")
    ap.add_argument("--runtime", default="leanlm")
    ap.add_argument("--time-limit", default="60m")
    ap.add_argument("--families", default=None)
    ap.add_argument("--compare", nargs="*", default=None, help="recipes to compare (default: every untrained one)")
    ap.add_argument("--out", help="the search's output directory (must not exist)")
    ap.add_argument("--from", dest="done", metavar="DIR",
                    help="tabulate a finished `leanlm auto` run's DIR instead of running a search")
    ap.add_argument("--json", default="benchmarks/results/auto.json")
    args = ap.parse_args()
    if bool(args.out) == bool(args.done):
        ap.error("give --out (run a search) or --from DIR (tabulate a finished one)")
    start = time.time()
    if args.done:
        report = finished_run(Path(args.done))
        args.budget, args.objective = report["settings"]["budget"], report["settings"]["objective"]
        args.runtime = report["settings"]["runtime"]
    else:
        compare = untrained_recipes(args.runtime) if args.compare is None else args.compare
        report = auto(budget=args.budget or ["kld<=0.05"], objective=args.objective, runtime=args.runtime,
                      time_limit=args.time_limit, out=args.out, compare=compare,
                      families=args.families.split(",") if args.families else None)
    rows = []
    for r in report["results"]:
        final = r.get("final")
        if final:
            q = final["quality"]
            rows.append({"number": r["number"], "name": r["name"], "kld": q.get("kld"), "top1": q.get("top1"),
                         "perplexity": q.get("perplexity"), "objective": final["objective"],
                         "within_budget": final["violation"] <= 0, "chosen": r["number"] == report["chosen"]})
    base = report["baseline"]["objective"]
    print(f"\nbudget {args.budget}, objective {args.objective}, runtime {args.runtime}, "
          f"{len(report['results'])} trials; original {base:.4g}\n")
    print(f"{'candidate':70} {'kld':>9} {'top1':>7} {args.objective:>11} {'x orig':>7}  budget")
    for row in sorted(rows, key=lambda x: -x["objective"] if args.objective.endswith("tps") else x["objective"]):
        mark = " (chosen)" if row["chosen"] else ""
        print(f"{row['name'][:70]:70} {row['kld']:9.5f} {row['top1']:7.4f} {row['objective']:11.4g} "
              f"{row['objective'] / base:7.3f}  {'ok' if row['within_budget'] else 'over'}{mark}")
    shipped_ok = [r for r in rows if r["within_budget"] and r["name"].startswith("recipe ")]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": report["settings"], "baseline_objective": base, "rows": rows,
                                           "chosen": report["chosen"], "shipped_within_budget": len(shipped_ok),
                                           "minutes": report.get("minutes", (time.time() - start) / 60),
                                           "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
