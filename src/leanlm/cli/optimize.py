"""`leanlm optimize`: measure the baseline, apply a recipe, measure the result, write model + report."""

from __future__ import annotations

from leanlm.cli.options import (
    command,
    model_argument,
    model_options,
    output_options,
    set_option,
    set_threads,
)
from leanlm.cli.report import print_report


def add_parser(sub) -> None:
    p = command(sub, "optimize", "measure, apply a recipe, measure again, write model + report",
                "Evaluate and benchmark the baseline, apply the recipe's steps, then evaluate the saved result against "
                "the baseline and benchmark it. Writes OUT/model, OUT/recipe.yaml, OUT/report.json, OUT/report.md "
                "and OUT/chart.png; nothing is written to OUT until the run completes.", run)
    model_argument(p, "model to optimize")
    p.add_argument("--recipe", help="recipe YAML path or shipped recipe name (default: 'default'; see `leanlm recipes`)")
    set_option(p)
    p.add_argument("--data", help="your data: first 90%% of characters for calibration/training, last 10%% for eval")
    p.add_argument("--eval-data", help="separate held-out text for evaluation (evaluated whole)")
    p.add_argument("--tasks", help="JSONL of multiple-choice tasks to score before and after")
    output_options(p, "leanlm-out")
    p.add_argument("--no-bench", action="store_true", help="skip the speed benchmarks")
    p.add_argument("--resume", action="store_true",
                   help="continue the recipe's training steps from the checkpoints an interrupted run left beside OUT")
    model_options(p)


def run(args) -> int:
    from leanlm.pipeline.optimize import optimize

    set_threads(args)
    report = optimize(args.model, args.recipe, args.data, args.out, args.overwrite, args.device, args.dtype,
                      args.eval_data, args.tasks, bench=not args.no_bench, resume=args.resume,
                      overrides=args.overrides)
    print_report(report, args.out)
    return 0
