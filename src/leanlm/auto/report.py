"""The search's evidence: trials.jsonl (every trial), search.json (settings and space), report.md and
report.html (a self-contained page: the front of quality against the objective and against size, every
trial a point, the budget drawn in; tables of the finalists and of each family's best)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from leanlm.auto.budget import OBJECTIVES, parse_budget

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def write_auto_report(report: dict, directory: Path) -> None:
    with (directory / "trials.jsonl").open("w") as f:
        for row in report["results"]:
            f.write(json.dumps(row, default=str) + "\n")
    (directory / "search.json").write_text(json.dumps({k: report[k] for k in ("settings", "space", "baseline",
                                                                               "chosen", "families", "created")},
                                                      indent=2, default=str))
    (directory / "report.md").write_text(render_markdown(report))
    (directory / "report.html").write_text(render_html(report))


def _primary(report: dict):
    return parse_budget(report["settings"]["budget"])[0]


def point(row: dict, report: dict) -> tuple[float | None, float | None, float | None]:
    """(quality on the budget's first metric, objective, size MiB) of a row, final measurement first."""
    src = row.get("final") or row
    primary = _primary(report)
    quality = src.get("quality") or {}
    base = report["baseline"]["quality"] if row.get("final") else {"perplexity": row.get("reference_perplexity")}
    value = primary.read(quality, base)
    size = (src.get("speed") or {}).get("disk_bytes")
    return value, src.get("objective"), size / 2**20 if size else None


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        value, objective, size = point(r, report)
        final = "all eval windows" if r.get("final") else f"{r.get('fidelity', '-')} search windows"
        status = r.get("status", "?")
        if status != "ok":
            status = f"{status}: {r.get('error', '')[:120]}"
        elif (r.get("final") or r)["violation"] > 0:
            status = "over budget"
        else:
            status = "within budget" + (" (chosen)" if r["number"] == report["chosen"] else "")
        rows.append([str(r["number"]), r["name"] or "-", r["families"], _fmt(value), _fmt(objective), _fmt(size),
                     final, status, r.get("origin") or "-"])
    return rows


HEAD = ["#", "candidate", "families", "quality", "objective", "size MiB", "measured on", "status", "found as"]


def render_markdown(report: dict) -> str:
    s = report["settings"]
    unit = OBJECTIVES[s["objective"]][2]
    chosen = next((r for r in report["results"] if r["number"] == report["chosen"]), None)
    lines = [f"# leanlm auto: {s['model']}", "",
             f"Budget {', '.join(s['budget'])}; objective {s['objective']} ({unit}); runtime {s['runtime']}; "
             f"{len(report['results'])} trials; evaluated on {report['eval_data']}.", ""]
    base = report["baseline"]
    lines.append(f"Original: objective {_fmt(base['objective'])} {unit}, perplexity "
                 f"{_fmt(base['quality'].get('perplexity'))}.")
    if chosen:
        final = chosen["final"]
        lines += ["", f"**Chosen: #{chosen['number']} {chosen['name']}**: {s['objective']} {_fmt(final['objective'])} "
                  f"{unit} ({_ratio(final['objective'], base['objective'])} the original), "
                  + ", ".join(f"{k} {_fmt(final['quality'].get(k))}" for k in ("kld", "top1", "perplexity")
                              if k in final["quality"]) + ". `best/` holds its model, recipe and report."]
        if chosen.get("origin"):
            lines.append(f"It was found as: {chosen['origin']}.")
    else:
        lines += ["", "**No candidate met the budget**; no `best/` was written."]
    if chosen and report["baseline"]["objective"] is not None and not _improves(report, chosen):
        lines += ["", f"**Nothing measured beat the original on {s['objective']}**: on this machine and runtime "
                  "the original model is the better choice; `best/` holds the best candidate all the same."]
    refused = sum(r.get("status") == "invalid" for r in report["results"])
    failed = sum(r.get("status") == "failed" for r in report["results"])
    lines += ["", "## Families", "", f"{refused} candidates were refused by their step types' checks before any "
              f"work (a range that does not fit this model); {failed} failed while running (see the trials table).",
              "", "| family | trials | within budget | best | verdict |", "|---|---:|---:|---|---|"]
    for f in report["families"]:
        lines.append(f"| {f['family']} | {f['trials']} | {f['within_budget']} | {f.get('name', '-')} | {f['verdict']} |")
    lines += ["", "## Trials", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(report)]
    lines += ["", "Quality is the budget's first metric. Search-window numbers are estimates (a quick in-process "
              "speed run); the finalists were measured again on every eval window, and their speed in fresh "
              "processes, in rounds with the original (each number: the median of the per-round ratios to the "
              "original, times the original's median).", ""]
    return "\n".join(lines)


def _improves(report: dict, chosen: dict) -> bool:
    maximize = OBJECTIVES[report["settings"]["objective"]][0] == "maximize"
    a, b = chosen["final"]["objective"], report["baseline"]["objective"]
    return a > b if maximize else a < b


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def scatter_svg(report: dict, axis: str, title: str) -> str:
    """Quality (x) against the objective or size (y); the budget a dashed line; each family a colour."""
    primary = _primary(report)
    pts = []
    families = sorted({r["families"] for r in report["results"]})
    for r in report["results"]:
        q, obj, size = point(r, report)
        y = obj if axis == "objective" else size
        if q is not None and y is not None and math.isfinite(q) and math.isfinite(y):
            pts.append((q, y, r))
    W, H, L, B, T, R = 640, 400, 80, 50, 30, 30
    if not pts:
        return f'<svg width="{W}" height="80"><text x="10" y="40">{html.escape(title)}: no measured trials</text></svg>'
    xs = [p[0] for p in pts] + [primary.value]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 + 1e-9 if x1 == x0 else x1), (y1 + 1e-9 if y1 == y0 else y1)
    px = lambda v: L + (v - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    py = lambda v: H - B - (v - y0) / (y1 - y0) * (H - B - T)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" aria-label="{html.escape(title)}">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{px(xv)}" y="{H - B + 16}" text-anchor="middle" font-size="11">{xv:.3g}</text>')
        out.append(f'<text x="{L - 6}" y="{py(yv) + 4}" text-anchor="end" font-size="11">{yv:.3g}</text>')
    bx = px(primary.value)
    out.append(f'<line x1="{bx}" y1="{T}" x2="{bx}" y2="{H - B}" stroke="#d62728" stroke-dasharray="6 4"/>')
    anchor, dx = ("end", -4) if bx > W / 2 else ("start", 4)  # the label stays inside the plot
    out.append(f'<text x="{bx + dx}" y="{T + 12}" text-anchor="{anchor}" font-size="11" fill="#d62728">'
               f'budget {html.escape(primary.text)}</text>')
    for q, y, r in pts:
        color = COLORS[families.index(r["families"]) % len(COLORS)]
        label = html.escape(f"#{r['number']} {r['name']}: {q:.4g}, {y:.4g}")
        if r["number"] == report["chosen"]:
            out.append(f'<circle cx="{px(q)}" cy="{py(y)}" r="9" fill="none" stroke="black" stroke-width="2"/>')
        shape = "rect" if r.get("final") else "circle"
        if shape == "rect":
            out.append(f'<rect x="{px(q) - 5}" y="{py(y) - 5}" width="10" height="10" fill="{color}"><title>{label}</title></rect>')
        else:
            out.append(f'<circle cx="{px(q)}" cy="{py(y)}" r="4" fill="{color}" opacity="0.75"><title>{label}</title></circle>')
    out.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" font-size="12">{html.escape(primary.metric)}</text>')
    ylabel = report["settings"]["objective"] if axis == "objective" else "size (MiB)"
    out.append(f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle" font-size="12">'
               f'{html.escape(ylabel)}</text>')
    for i, fam in enumerate(families):
        out.append(f'<rect x="{W - R - 150}" y="{T + 24 + i * 16}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
                   f'<text x="{W - R - 135}" y="{T + 33 + i * 16}" font-size="11">{html.escape(fam)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(report: dict) -> str:
    md_rows = table_rows(report)
    fam_rows = "".join(f"<tr><td>{html.escape(f['family'])}</td><td>{f['trials']}</td><td>{f['within_budget']}</td>"
                       f"<td>{html.escape(str(f.get('name', '-')))}</td><td>{html.escape(f['verdict'])}</td></tr>"
                       for f in report["families"])
    trials = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in md_rows)
    summary = render_markdown(report).split("## Families")[0].split("\n", 2)[2]
    summary = html.escape(summary).replace("**", "").replace("\n\n", "</p><p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leanlm auto report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}} th{{background:#f3f3f3}} .plots{{display:flex;flex-wrap:wrap;gap:16px}}</style>
</head><body>
<h1>leanlm auto: {html.escape(report['settings']['model'])}</h1>
<p>{summary}</p>
<div class="plots">{scatter_svg(report, "objective", "quality against " + report['settings']['objective'])}
{scatter_svg(report, "size", "quality against size")}</div>
<p>Circles: scored on the search windows; squares: finalists measured on every eval window; ringed: chosen.</p>
<h2>Families</h2><table><tr><th>family</th><th>trials</th><th>within budget</th><th>best</th><th>verdict</th></tr>{fam_rows}</table>
<h2>Trials</h2><table><tr>{''.join(f'<th>{h}</th>' for h in HEAD)}</tr>{trials}</table>
</body></html>
"""
