"""`leanlm scan`: prune one block or layer at a time and chart the KLD each costs."""

from __future__ import annotations

from leanlm.cli.options import (
    command,
    config_options,
    config_values,
    model_argument,
    model_options,
    output_options,
    set_threads,
)
from leanlm.errors import LeanLMError

FLAGS = {"unit": "what to prune at a time", "sparsity": "sparsity of a pruned layer, --unit layer"}


def add_parser(sub) -> None:
    from leanlm.pipeline.scan import ScanConfig

    p = command(sub, "scan", "prune one block or layer at a time and chart what each costs",
                "Sensitivity scan: skip one decoder block (--unit block, what depth pruning does) or magnitude-prune "
                "one linear layer (--unit layer) at a time, and measure the mean KLD, top-1 and perplexity against "
                "the intact model. Writes OUT/scan.json, OUT/scan.md (most sensitive first) and OUT/scan.png.", run)
    model_argument(p, "model to scan")
    config_options(p, ScanConfig(), FLAGS)
    p.add_argument("--data", help="held-out text (default: the eval split of the built-in corpus)")
    p.add_argument("--windows", type=int, default=4, help="512-token windows per measurement (default: 4)")
    output_options(p, "leanlm-scan")
    model_options(p)


def run(args) -> int:
    from leanlm.core.config import parse_config
    from leanlm.core.paths import atomic_dir, check_output
    from leanlm.data.corpus import default_corpus, read_text
    from leanlm.measure.evaluate import eval_windows, prepare_reference
    from leanlm.models.load import load_model
    from leanlm.pipeline.scan import ScanConfig, render_scan, scan

    set_threads(args)
    config = parse_config(ScanConfig, config_values(args, FLAGS), "options")
    if args.windows < 1:
        raise LeanLMError(f"--windows must be at least 1, got {args.windows}")
    check_output(args.out, args.overwrite)
    loaded = load_model(args.model, args.device, args.dtype)
    text = read_text(args.data, loaded.tokenizer) if args.data else default_corpus().eval
    windows = eval_windows(loaded.tokenizer, text, 512)[: args.windows]
    reference = prepare_reference(loaded, windows)
    rows = scan(loaded.model, windows, reference, config)
    with atomic_dir(args.out, args.overwrite) as tmp:
        render_scan(rows, config, reference.perplexity, tmp)
    print(f"baseline perplexity {reference.perplexity:.3f}; most sensitive {config.unit}s first ({args.out}/scan.md):")
    for r in sorted(rows, key=lambda r: -r["kld"])[:10]:
        print(f"  {r['name']:40s} KLD {r['kld']:.5f}   top-1 {r['top1']:.2%}   perplexity {r['perplexity']:.3f}")
    return 0
