"""Calibrated on one text, used on another: each recipe is calibrated on the default corpus' train split
(Python's documentation) and scored on its eval split and on two texts of other kinds that ship with
this machine: package READMEs (the long descriptions in site-packages' METADATA files, markdown and
reStructuredText) and the GPL-3 licence (legal English). Activation-sparse models also report the
sparsity each text reaches through their fixed thresholds.

Run alone on an idle machine (about 6 minutes per recipe on 2 cores):
    python benchmarks/bench_other_text.py [--recipes wanda-50 wanda-50:refit=false act-sparse-50]
        [--windows 16] [--out benchmarks/results/other_text.json]
`RECIPE:key=value,...` overrides options of the recipe's one step.
"""

from __future__ import annotations

import argparse
import copy
import email
import json
import sys
import time
from pathlib import Path

import torch

from leanlm.core.step import StepContext
from leanlm.data.corpus import calibration_samples, default_corpus
from leanlm.errors import ConfigError
from leanlm.measure.evaluate import eval_windows, evaluate, prepare_reference
from leanlm.models.load import load_model
from leanlm.pipeline.optimize import apply_recipe
from leanlm.pipeline.recipe import load_recipe

DEFAULT = ["magnitude-50", "wanda-50:refit=false", "wanda-50", "sparsegpt-50:refit=false", "sparsegpt-50",
           "sparsegpt-2of4", "act-sparse-40", "act-sparse-50"]
GPL = Path("/usr/share/common-licenses/GPL-3")


def package_readmes(limit: int = 70_000) -> str:
    """The first 4,000 characters of every long package description, in sorted order."""
    site = Path(json.__file__).parent.parent / "site-packages"
    parts = []
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        body = email.message_from_string(meta.read_text(errors="ignore")).get_payload()
        if isinstance(body, str) and len(body) > 2000:
            parts.append(body[:4000])
    return "\n\n".join(parts)[:limit]


def texts() -> dict[str, str]:
    found = {"pydoc eval split": default_corpus().eval, "package READMEs": package_readmes()}
    if GPL.exists():
        found["GPL-3"] = GPL.read_text()
    return found


def recipe_with(spec: str):
    """`name` or `name:key=value,...` (overrides on the recipe's one step, checked like a recipe's keys)."""
    name, _, overrides = spec.partition(":")
    recipe = load_recipe(name)
    if overrides:
        if len(recipe.steps) != 1:
            raise ConfigError(f"{name} has {len(recipe.steps)} steps; overrides need exactly one")
        pairs = overrides.split(",")
        if not all("=" in pair for pair in pairs):
            raise ConfigError(f"{spec!r}: write overrides as key=value,key=value")
        recipe = load_recipe(name, [f"steps.0.{pair}" for pair in pairs])
    return recipe


def measure(spec: str, base, windows: dict, references: dict) -> dict:
    recipe = recipe_with(spec)
    c = recipe.calibration
    calibration = calibration_samples(base.tokenizer, default_corpus().train, c.samples, c.length, c.seed)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    apply_recipe(model.model, recipe, StepContext(base.tokenizer, lambda: calibration, base.device))
    row = {"recipe": spec, "step_seconds": time.perf_counter() - start}
    for name, w in windows.items():
        q = evaluate(model, w, references[name], desc=f"{spec} on {name}")
        row[name] = {k: q[k] for k in ("perplexity", "kld", "top1", "measured_act_sparsity") if k in q}
    return row


def print_table(rows: list[dict], names: list[str]) -> None:
    print("| recipe | " + " | ".join(f"{n}: KLD / top-1 / act. sparsity" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for r in rows:
        cells = [f"{r[n]['kld']:.3f} / {r[n]['top1']:.1%} / "
                 + (f"{r[n]['measured_act_sparsity']:.1%}" if "measured_act_sparsity" in r[n] else "-") for n in names]
        print(f"| {r['recipe']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT)
    parser.add_argument("--windows", type=int, default=16, help="512-token windows per text")
    parser.add_argument("--out", default="benchmarks/results/other_text.json")
    args = parser.parse_args()
    try:
        [recipe_with(spec) for spec in args.recipes]  # every spec checked before minutes of loading
    except ConfigError as err:
        raise SystemExit(f"error: {err}")
    torch.manual_seed(0)
    base = load_model("smollm2-135m", device="cpu")
    windows = {n: eval_windows(base.tokenizer, t)[: args.windows] for n, t in texts().items()}
    references = {n: prepare_reference(base, w) for n, w in windows.items()}
    dense = {n: references[n].perplexity for n in windows}
    rows = []
    for spec in args.recipes:
        rows.append(measure(spec, base, windows, references))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"dense_perplexity": dense, "windows": args.windows, "rows": rows}, indent=1))
    print_table(rows, list(windows))


if __name__ == "__main__":
    main()
