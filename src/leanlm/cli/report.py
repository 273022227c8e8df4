"""`leanlm report`: print (and re-render) the reports `leanlm optimize` wrote."""

from __future__ import annotations

import json

from leanlm.cli.options import command


def add_parser(sub) -> None:
    p = command(sub, "report", "show (and re-render) reports written by optimize",
                "Print the metrics of one or more `leanlm optimize` outputs; with --render, rewrite report.md and "
                "chart.png from report.json.", run)
    p.add_argument("dirs", nargs="+", help="output directories of `leanlm optimize`")
    p.add_argument("--render", action="store_true", help="re-render report.md and chart.png")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def print_report(report: dict, where) -> None:
    from leanlm.pipeline.report import metric_rows

    print(f"\n{report['recipe']} on {report['model']}  ->  {where}")
    print(f"{'metric':28s} {'baseline':>12s} {'result':>12s} {'ratio':>9s}")
    for label, base, res, ratio in metric_rows(report):
        print(f"{label:28s} {base:>12s} {res:>12s} {ratio:>9s}")


def run(args) -> int:
    from pathlib import Path

    from leanlm.pipeline.report import read_report, write_report

    reports = [(d, read_report(d)) for d in args.dirs]
    if args.json:
        print(json.dumps({d: r for d, r in reports}))
        return 0
    for d, r in reports:
        if args.render:
            write_report(r, Path(d))
        print_report(r, d)
    return 0
