"""The optimize report: report.json (every number), report.md (for people) and chart.png."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

QUALITY = [("perplexity", "perplexity", "{:.3f}"), ("kld", "mean KLD vs baseline", "{:.5f}"),
           ("top1", "top-1 agreement", "{:.2%}"), ("task_accuracy", "task accuracy", "{:.2%}"),
           ("measured_act_sparsity", "activation sparsity on the eval text", "{:.1%}")]
SPEED = [("prefill_tps", "prefill tokens/s", "{:.1f}"), ("decode_tps", "decode tokens/s (batch 1)", "{:.2f}"),
         ("decode_tps_batch", "decode tokens/s (batch)", "{:.2f}"), ("ttft_s", "time to first token (s)", "{:.3f}"),
         ("peak_mem_bytes", "peak memory (MiB)", "mib"), ("disk_bytes", "size on disk (MiB)", "mib"),
         ("params", "parameters (M)", "mparams")]


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mib":
        return f"{value / 2**20:.1f}"
    if fmt == "mparams":
        return f"{value / 1e6:.1f}"
    return fmt.format(value)


def ratio(result, baseline):
    if result is None or baseline in (None, 0):
        return None
    return result / baseline


def metric_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(label, baseline, result, result/baseline) for every metric both sides have."""
    rows = []
    for section, table in (("quality", QUALITY), ("speed", SPEED)):
        base, res = report["baseline"][section], report["result"][section]
        for key, label, fmt in table:
            if key in base or key in res:
                r = ratio(res.get(key), base.get(key))
                rows.append((label, _fmt(base.get(key), fmt), _fmt(res.get(key), fmt), "-" if r is None else f"{r:.3f}x"))
    return rows


def _inline(value) -> bool:
    """Scalars, and short lists of ints (e.g. the removed blocks), go in the steps table."""
    if isinstance(value, list):
        return len(value) <= 12 and all(isinstance(v, int) for v in value)
    return not isinstance(value, dict)


def _training_table(kind: str, history: list[dict] | None) -> list[str]:
    if not history:
        return []
    lines = ["", f"## Training ({kind}): held-out loss", "", "| step | train loss | held-out loss |", "|---:|---:|---:|"]
    for h in history:
        train = f"{h['train_loss']:.4f}" if "train_loss" in h else "-"
        lines.append(f"| {h['step']} | {train} | {h['validation_loss']:.4f} |")
    return lines


def render_markdown(report: dict) -> str:
    lines = [f"# leanlm report: {report['recipe']} on {report['model']}", "",
             f"Created {report['created']} on {report['machine']['cpu']} ({report['machine']['torch_threads']} threads). "
             f"Evaluated on {report['eval_data']}; quality of the result is measured on the saved model, reloaded.", "",
             "| metric | baseline | result | result / baseline |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in metric_rows(report)]
    lines += ["", "## Steps", "", "| step | seconds | details |", "|---|---:|---|"]
    for step in report["steps"]:
        details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in step["stats"].items() if _inline(v))
        lines.append(f"| {step['type']} | {step['seconds']:.1f} | {details} |")
    for step in report["steps"]:
        lines += _layer_plan(step["stats"].get("layers"))
        lines += _scale_table(step["type"], step["stats"].get("scales"))
        lines += _training_table(step["type"], step["stats"].get("history"))
    gens_b = report["baseline"]["quality"].get("generations", {})
    gens_r = report["result"]["quality"].get("generations", {})
    if gens_b or gens_r:
        lines += ["", "## Greedy generations", "", "| prompt | baseline | result |", "|---|---|---|"]
        for prompt in gens_b or gens_r:
            cells = [prompt, gens_b.get(prompt, ""), gens_r.get(prompt, "")]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def _layer_plan(rows: list[dict] | None) -> list[str]:
    """Mixed precision: each layer's format and the estimated KLD of every format it could have had."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "estimated_kld" in r for r in rows):
        return []
    formats = sorted({f for r in rows for f in r["estimated_kld"]})
    lines = ["", "## Per-layer precision", "",
             "Chosen to minimise the summed estimated KLD (Fisher-weighted rounding error) within the bit budget.", "",
             "| layer | format | bits/weight | " + " | ".join(f"est. KLD {f}" for f in formats) + " |",
             "|---|---|---:|" + "---:|" * len(formats)]
    for r in rows:
        cells = [f"{r['estimated_kld'][f]:.2e}" if f in r["estimated_kld"] else "-" for f in formats]
        lines.append(f"| {r['layer']} | {r['format']} | {r['bits_per_weight']:.3f} | " + " | ".join(cells) + " |")
    return lines


def _scale_table(step: str, rows: list[dict] | None) -> list[str]:
    """AWQ/SmoothQuant: the scale pairs found from the module graph and the exponent each search chose."""
    if not rows:
        return []
    lines = ["", f"## {step}: scale pairs", "", "alpha -1 means no scaling beat every candidate.", "",
             "| block | from | to | alpha | loss |", "|---:|---|---|---:|---:|"]
    lines += [f"| {r['block']} | {r['prev']} | {', '.join(r['nexts'])} | {r['alpha']} | {r['loss']:.3g} |" for r in rows]
    return lines


def render_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {"baseline": report["baseline"], "result": report["result"]}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, [("decode_tps", "decode tokens/s (batch 1)"), ("disk_bytes", "size on disk (MiB)")]):
        for (name, side), color in zip(points.items(), ("tab:blue", "tab:orange")):
            x = side["speed"].get(key)
            y = side["quality"].get("perplexity")
            if x is None or y is None:
                continue
            x = x / 2**20 if key == "disk_bytes" else x
            ax.scatter([x], [y], s=80, color=color, label=name)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))
        _pad_ylim(ax, report["baseline"]["quality"].get("perplexity"))
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs speed")
    axes[1].set_title("quality vs size")
    fig.suptitle(f"{report['recipe']} on {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pad_ylim(ax, baseline: float | None) -> None:
    """Show at least +/-2% of the baseline, so a negligible change does not fill the axis."""
    if not baseline:
        return
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, baseline * 0.98), max(hi, baseline * 1.02))


def write_report(report: dict, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "report.md").write_text(render_markdown(report))
    render_chart(report, directory / "chart.png")


def read_report(directory: str | Path) -> dict:
    from leanlm.errors import LeanLMError

    path = Path(directory).expanduser()
    path = path if path.is_file() else path / "report.json"
    if not path.is_file():
        raise LeanLMError(f"no report at {path}; pass a directory written by `leanlm optimize`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LeanLMError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
