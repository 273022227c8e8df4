"""`leanlm auto`: search every technique for the best model on an objective within a quality budget."""

from __future__ import annotations

from leanlm.cli.options import command, model_argument, output_options, positive_int, set_threads


def add_parser(sub) -> None:
    p = command(sub, "auto", "search across techniques for the best model within a quality budget",
                "Search the step types' declared spaces (quantization, pruning, sparsity, MoE-fication, healing) "
                "with Optuna for the model with the best OBJECTIVE that stays within every --budget, measured on "
                "--runtime. Cheap estimates first (a few windows of held-out training text), full scores only for "
                "candidates that could win; the finalists, the --compare recipes and the original are measured "
                "again in the same run on the eval split, speed in fresh processes. Writes OUT/report.md, "
                "OUT/report.html, OUT/trials.jsonl and OUT/best/ (the chosen recipe's optimize output).", run)
    model_argument(p, "model to optimize")
    p.add_argument("--budget", action="append", required=True, metavar="EXPR",
                   help="quality to keep (repeatable): kld<=0.05, top1>=0.9, ppl_increase<=5%%, perplexity<=11, "
                        "task_acc>=0.45 (with --tasks)")
    p.add_argument("--objective", default="decode_tps",
                   help="what to make best: decode_tps, prefill_tps, size, peak_mem or cost ($ per 1M generated "
                        "tokens, with --price-per-hour) (default: decode_tps)")
    p.add_argument("--runtime", default="leanlm",
                   help="where the model will run and is measured: leanlm or llama.cpp (GGUF) (default: leanlm)")
    p.add_argument("--data", help="your text: the first 90%% of characters for calibration, training and the search, "
                                  "the last 10%% for the final evaluation")
    p.add_argument("--tasks", help="JSONL of multiple-choice tasks (for task_acc budgets)")
    p.add_argument("--time-limit", default="60m", help="wall time for the search and its finalists (the --compare recipes come on top): 90s, 45m, "
                        "1.5h (default: 60m)")
    p.add_argument("--families", help="search only these technique families, comma-separated (quantize,prune,...)")
    p.add_argument("--fix", action="append", default=[], metavar="KEY=VALUE",
                   help="pin part of the space (repeatable): steps.quantize=rtn, steps.structure=none, steps.rtn.bits=4")
    p.add_argument("--space", help="YAML search space: families, stages, fix, and narrowed steps ranges")
    p.add_argument("--compare", action="append", metavar="RECIPE",
                   help="recipes run and measured beside the search, in the same run, outside --time-limit "
                        "(repeatable; default: default)")
    p.add_argument("--price-per-hour", type=float, help="the machine's price in $/hour, for --objective cost")
    p.add_argument("--finalists", type=positive_int, default=3,
                   help="searched candidates measured again in full (default: 3)")
    p.add_argument("--speed-rounds", type=positive_int, default=3,
                   help="rounds of fresh-process benchmarks of the finalists beside the original; each speed is the "
                        "median of its per-round ratios to the original (default: 3)")
    p.add_argument("--max-trials", type=positive_int, help="stop after this many trials (default: the time limit)")
    p.add_argument("--calibration-samples", type=positive_int, default=64,
                   help="512-token calibration samples for the steps that calibrate (default: 64)")
    p.add_argument("--search-windows", type=positive_int, default=16,
                   help="held-out training-text windows a promising candidate is scored on (default: 16)")
    p.add_argument("--low-windows", type=positive_int, default=4,
                   help="windows every candidate is scored on first, the cheap estimate (default: 4)")
    p.add_argument("--bench", action="append", default=[], metavar="KEY=VALUE",
                   help="benchmark size for the original and the finalists (repeatable): repeats=5, prompt_tokens=512, "
                        "new_tokens=64, batch=8 (default: leanlm bench's)")
    p.add_argument("--jobs", type=positive_int, default=1, help="trials run at once, in local worker processes")
    p.add_argument("--ray", metavar="ADDRESS", help="run trials as Ray tasks on this cluster (`local` starts one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search into the same OUT")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    output_options(p, "leanlm-auto")


def bench_settings(pairs: list[str]) -> dict:
    import yaml

    from leanlm.errors import ConfigError

    out = {}
    for text in pairs:
        key, eq, value = text.partition("=")
        if not eq:
            raise ConfigError(f"--bench {text!r}: write KEY=VALUE, e.g. repeats=3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args) -> int:
    from leanlm.auto import auto
    from leanlm.auto.budget import OBJECTIVES

    set_threads(args)
    report = auto(args.model, args.budget, args.objective, args.runtime, args.out, args.data, args.tasks,
                  args.time_limit, [f.strip() for f in args.families.split(",")] if args.families else None,
                  args.fix, args.space, args.compare or ["default"], args.jobs, args.ray, args.resume, args.overwrite,
                  args.price_per_hour, args.finalists, args.max_trials, args.seed, args.calibration_samples,
                  args.low_windows, args.search_windows, bench=bench_settings(args.bench), speed_rounds=args.speed_rounds)
    chosen = next(r for r in report["results"] if r["number"] == report["chosen"])
    unit = OBJECTIVES[args.objective][2]
    base = report["baseline"]["objective"]
    print(f"chosen: #{chosen['number']} {chosen['name']}\n"
          f"  {args.objective}: {chosen['final']['objective']:.4g} {unit} (original {base:.4g})\n"
          f"  quality: " + ", ".join(f"{k} {chosen['final']['quality'][k]:.4g}" for k in ("kld", "top1", "perplexity")
                                    if k in chosen["final"]["quality"]) +
          f"\n  {len(report['results'])} trials; report: {args.out}/report.html; model: {args.out}/best/")
    return 0
