"""Sensitivity scan: prune one block (or one linear layer) at a time, leave the rest intact, and
measure what that alone costs in KLD and perplexity, so the user sees where pruning is safe.

`block`: the block is skipped (its output replaced by its input), exactly what depth pruning would
do to it. `layer`: the layer is magnitude-pruned to `sparsity`. The model is restored after each.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.core.config import Validated
from leanlm.core.selection import select_layers
from leanlm.core.structure import find_structure
from leanlm.errors import ConfigError
from leanlm.measure.evaluate import Reference, score_windows
from leanlm.prune.prune_ops import magnitude_mask


@dataclass
class ScanConfig(Validated):
    unit: Literal["block", "layer"] = "block"
    sparsity: float = 0.5
    skip: tuple[str, ...] = ("lm_head",)

    def validate(self) -> None:
        if self.unit not in ("block", "layer"):
            raise ConfigError(f"unit must be 'block' or 'layer', got {self.unit!r}")
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")


@contextmanager
def skipped(block: nn.Module) -> Iterator[None]:
    """Run the model as if `block` were removed: its output is its input."""
    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def sparsified(layer: nn.Module, sparsity: float) -> Iterator[None]:
    original = layer.weight.data
    layer.weight.data = original.masked_fill(magnitude_mask(original, sparsity), 0)
    try:
        yield
    finally:
        layer.weight.data = original


def units(model: nn.Module, config: ScanConfig) -> list[tuple[str, callable]]:
    if config.unit == "block":
        structure = find_structure(model)
        return [(name, lambda b=block: skipped(b)) for name, block in zip(structure.block_names(), structure.blocks)]
    layers = select_layers(model, ["*"], list(config.skip), verb="scan")
    return [(name, lambda m=layer: sparsified(m, config.sparsity)) for name, layer in layers.items()]


def scan(model: nn.Module, windows: torch.Tensor, reference: Reference, config: ScanConfig) -> list[dict]:
    """One row per block or layer: the KLD, top-1 and perplexity of the model with only it pruned."""
    rows = []
    for name, prune in tqdm(units(model, config), desc=f"scanning {config.unit}s", unit=config.unit):
        with prune():
            result = score_windows(model, windows, reference=reference, desc=name)
        rows.append({"name": name, "kld": result["kld"], "top1": result["top1"], "perplexity": result["perplexity"]})
    return rows


def render_scan(rows: list[dict], config: ScanConfig, baseline_ppl: float, out: Path) -> None:
    """scan.json, scan.md (a table, most sensitive first) and scan.png (KLD per unit, in model order)."""
    what = "removed" if config.unit == "block" else f"magnitude-pruned to {config.sparsity:.0%}"
    (out / "scan.json").write_text(json.dumps({"unit": config.unit, "sparsity": config.sparsity,
                                               "baseline_perplexity": baseline_ppl, "rows": rows}, indent=2))
    lines = [f"# Sensitivity scan: one {config.unit} {what} at a time", "",
             f"Baseline perplexity {baseline_ppl:.3f}. Most sensitive first.", "",
             "| rank | unit | mean KLD | top-1 | perplexity |", "|---:|---|---:|---:|---:|"]
    for i, r in enumerate(sorted(rows, key=lambda r: -r["kld"]), 1):
        lines.append(f"| {i} | {r['name']} | {r['kld']:.5f} | {r['top1']:.2%} | {r['perplexity']:.3f} |")
    (out / "scan.md").write_text("\n".join(lines) + "\n")
    _chart(rows, f"one {config.unit} {what}", out / "scan.png")


def _chart(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(rows)), 4))
    ax.bar(range(len(rows)), [max(r["kld"], 1e-6) for r in rows], color="tab:red")
    ax.set_yscale("log")
    ax.set_ylabel("mean KLD vs the unpruned model")
    ax.set_title(f"Sensitivity: {title}")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([".".join(r["name"].split(".")[-3:]) for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
