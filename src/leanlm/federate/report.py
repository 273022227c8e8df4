"""OUT/report.json, report.md and chart.png of a federated run: per-round central loss and perplexity,
clients' training and local held-out losses, bytes each way, who dropped out or was rejected."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_federate_report(report: dict, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "report.md").write_text(render(report))
    chart(report, directory / "chart.png")


def render(report: dict) -> str:
    s = report["settings"]
    after = report["perplexity_after"]
    gain = report["perplexity_before"] - (after if after is not None else report["perplexity_adapter"])
    merged = f"{after:.3f}" if after is not None else ("not scored: deployed, the server holds no client text "
                                                         "(give it --eval-data)")
    lines = [f"# Federated LoRA: {report['model']}", "",
             f"{len(report['clients'])} clients ("
             + ("deployed, each on its own data" if report.get("deployed") else f"{s['split']} split") + "), "
             f"{s['rounds']} rounds of {s['local_steps']} local "
             f"steps, {s['strategy']}, LoRA rank {s['rank']}, updates sent as {s['compress']}"
             + (f" (top {s['topk']:.0%})" if s["compress"] == "topk" else "") + f"; {report['seconds'] / 60:.1f} min.", "",
             f"| | perplexity on {report.get('evaluated_on', 'the pooled held-out text')} |", "|---|---:|",
             f"| base model | {report['perplexity_before']:.3f} |",
             f"| global adapter | {report['perplexity_adapter']:.3f} |",
             f"| merged{' and requantized' if report['quantized_base'] else ''} | {merged} |",
             "", f"Gain: {gain:.3f} perplexity. Bytes per client per round: {report['bytes_up_per_client_round'] / 1024:.0f} "
             f"KiB up, {report['bytes_down_per_client_round'] / 1024:.0f} KiB down.", "",
             "| round | updates | dropped | rejected | client train loss | client held-out loss (start of round) | "
             "central perplexity | KiB up (all clients) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in report["history"]:
        c = h.get("clients", [])
        mean = (lambda key: sum(x[key] for x in c) / len(c)) if c else (lambda key: float("nan"))
        lines.append(f"| {h['round']} | {len(c)} | {len(h.get('dropped', []))} | {len(h.get('rejected', []))} | "
                     f"{mean('train_loss'):.4f} | {mean('holdout_loss'):.4f} | {math.exp(h['central_loss']):.3f} | "
                     f"{sum(x['bytes_up'] for x in c) / 1024:.0f} |")
    for d in report["dropped"]:
        lines.append(f"\n- Round {d['round']}: {d.get('name', 'node ' + str(d['node']))} dropped out ({d['why']}); "
                     "the round went on without it.")
    for r in report["rejected"]:
        lines.append(f"\n- Round {r['round']}: the update of {r['name']} was rejected: {r['why']}.")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in report["history"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(rounds, [math.exp(h["central_loss"]) for h in report["history"]], marker="o", label="global adapter (union of held-out text)")
    later = [h for h in report["history"] if h.get("clients")]
    axes[0].plot([h["round"] for h in later],
                 [math.exp(sum(c["holdout_loss"] for c in h["clients"]) / len(h["clients"])) for h in later],
                 marker="s", label="clients' own held-out (start of round)")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("perplexity")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    axes[1].bar([h["round"] for h in later], [sum(c["bytes_up"] for c in h["clients"]) / 2**20 for h in later])
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("MiB sent by clients")
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"federated LoRA on {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
