"""report.json and report.md of a cleaning run: each stage's count and a few examples of what it removed."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    lines = ["# leanlm data clean", "",
             f"{report['records']} records read, {report['kept']} kept (PII-redacted ones included), "
             f"{report['seconds']:.1f} s.", "", "| reason | records |", "|---|---:|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(report["counts"].items())]
    if report["pii"]:
        lines += ["", "PII replaced: " + ", ".join(f"{k} {n}" for k, n in sorted(report["pii"].items()))]
    if report["flagged_conflict_groups"]:
        lines += ["", f"{report['flagged_conflict_groups']} conflicting groups flagged and kept (conflicts.jsonl)."]
    for reason, rows in report["examples"].items():
        lines += ["", f"## {reason}", ""]
        for row in rows:
            text = json.dumps(row["record"], ensure_ascii=False)
            of = "" if row["of"] is None else f" (of record {row['of']})"
            lines.append(f"- {Path(row['source']).name} record {row['index']}{of}: `{text[:160].replace('`', '')}`")
    lines += ["", "Every removed or changed record is in removed.jsonl with its original content."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
