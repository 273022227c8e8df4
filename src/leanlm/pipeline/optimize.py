"""`leanlm optimize`: measure the baseline, apply a recipe, measure the result, write it all down.

The output directory is assembled in a temporary sibling and renamed into place only when
complete, so an interrupted run leaves nothing half-written. The result is measured from the
saved artifact (reloaded, and benchmarked in a fresh process), i.e. what the user will ship.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leanlm.core.paths import atomic_dir, check_output
from leanlm.core.step import StepContext, apply_step, check_steps, naming_step
from leanlm.data.corpus import Corpus, calibration_samples, load_corpus, read_text
from leanlm.errors import ConfigError
from leanlm.measure.bench import BenchConfig
from leanlm.measure.evaluate import (
    Reference,
    Task,
    eval_windows,
    evaluate,
    load_tasks,
    prepare_reference,
    score_tasks,
)
from leanlm.models.builtin import DEFAULT_MODEL
from leanlm.models.load import LoadedModel, load_model
from leanlm.models.save import save_model
from leanlm.pipeline.bench_worker import bench_in_subprocess
from leanlm.pipeline.recipe import Recipe, dump_recipe, library_versions, load_recipe
from leanlm.pipeline.report import machine_info, write_report

log = logging.getLogger(__name__)
DEFAULT_OUT = "leanlm-out"


@dataclass
class Baseline:
    """The original model measured once: what every candidate (one recipe, or a search's many) is compared with."""
    loaded: LoadedModel | None  # None once a recipe has changed it in place
    corpus: Corpus
    windows: torch.Tensor
    reference: Reference
    tasks: list[Task] | None
    quality: dict
    speed: dict
    eval_name: str


def measure_baseline(loaded: LoadedModel, recipe: Recipe, data: str | None = None, eval_data: str | None = None,
                     tasks: str | None = None, bench: bool = True, device: str = "auto", dtype: str = "auto") -> Baseline:
    """Perplexity, reference logits, generations, task accuracy and (in a fresh process) speed of `loaded`."""
    corpus = load_corpus(data, loaded.tokenizer)
    eval_text = read_text(eval_data, loaded.tokenizer) if eval_data else corpus.eval
    task_list = load_tasks(tasks or recipe.eval.tasks) if (tasks or recipe.eval.tasks) else None
    windows = eval_windows(loaded.tokenizer, eval_text, recipe.eval.window)
    log.info("measuring the baseline (%s)", loaded.source)
    reference = prepare_reference(loaded, windows, recipe.eval.prompts, recipe.eval.max_new_tokens)
    quality = {"perplexity": reference.perplexity, "tokens": windows.numel() - windows.shape[0], "kld": 0.0,
               "top1": 1.0, "generations": reference.generations}
    if task_list:
        quality.update(score_tasks(loaded.model, loaded.tokenizer, task_list))
    speed = run_bench(loaded.path, recipe.bench, device, dtype) if bench else {}
    return Baseline(loaded, corpus, windows, reference, task_list, quality, speed,
                    eval_data or f"{corpus.name} (eval split)")


def measure_result(path: Path, baseline: Baseline, recipe: Recipe, device: str = "auto", bench: bool = True) -> dict:
    """The saved artifact at `path` measured against the baseline: reloaded (a round trip) and benchmarked."""
    quality = evaluate(load_model(path, device), baseline.windows, baseline.reference, baseline.tasks,
                       recipe.eval.prompts, recipe.eval.max_new_tokens, desc="evaluating result")
    return {"quality": quality, "speed": run_bench(path, recipe.bench, device, "auto") if bench else {}}


def optimize(model: str = DEFAULT_MODEL, recipe: str | Path | Recipe | dict | None = None, data: str | None = None,
             out: str | Path = DEFAULT_OUT, overwrite: bool = False, device: str = "auto", dtype: str = "auto",
             eval_data: str | None = None, tasks: str | None = None, bench: bool = True, resume: bool = False,
             overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Run a recipe on a model and write model/, recipe.yaml, report.json, report.md and chart.png to `out`.

    `overrides`: `KEY=VALUE` changes to the recipe (`steps.0.sparsity=0.6`), checked like the recipe.
    Training steps checkpoint into a work directory beside `out` (kept if the run fails, removed when it
    completes); `resume` continues them from there."""
    if isinstance(recipe, Recipe) and overrides:
        raise ConfigError("overrides apply to a recipe name, path or mapping; change a Recipe object directly")
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    out = check_output(out, overwrite)
    if not recipe.steps:
        raise ConfigError(f"recipe {recipe.name!r} has no steps, so there is nothing to optimize; to measure a model "
                          "as it is, use `leanlm eval` and `leanlm bench`")
    loaded = load_model(model, device, dtype)
    check_steps(loaded.model, recipe.steps)
    baseline = measure_baseline(loaded, recipe, data, eval_data, tasks, bench, device, dtype)
    with atomic_dir(out, overwrite) as tmp:
        work = out.parent / f".{out.name}.work"
        train = baseline.corpus.train
        ctx = StepContext(loaded.tokenizer, _calibration(recipe, train, loaded.tokenizer), loaded.device,
                          train_text=train, source=str(loaded.path), work_dir=work, resume=resume)
        steps = apply_recipe(loaded.model, recipe, ctx)
        save_model(loaded.model, loaded.tokenizer, tmp / "model")
        del loaded
        baseline.loaded = None  # the model was changed in place: free it before the result loads
        gc.collect()
        result = measure_result(tmp / "model", baseline, recipe, device, bench)
        dump_recipe(recipe, tmp / "recipe.yaml")
        write_report(build_report(str(model), recipe, baseline, steps, result), tmp)
    shutil.rmtree(work, ignore_errors=True)
    return json.loads((out / "report.json").read_text())


def build_report(model: str, recipe: Recipe, baseline: Baseline, steps: list[dict], result: dict) -> dict:
    return {
        "model": model, "data": baseline.corpus.name, "eval_data": baseline.eval_name,
        "recipe": recipe.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
        "versions": library_versions(), "steps": steps,
        "baseline": {"quality": baseline.quality, "speed": baseline.speed},
        "result": result,
    }


def _calibration(recipe: Recipe, text: str, tokenizer: Any):
    if not recipe.needs_calibration:
        return None
    cache: dict[str, torch.Tensor] = {}

    def build() -> torch.Tensor:
        if "data" not in cache:
            c = recipe.calibration
            cache["data"] = calibration_samples(tokenizer, text, c.samples, c.length, c.seed)
        return cache["data"]
    return build


def apply_recipe(model, recipe: Recipe, ctx: StepContext) -> list[dict]:
    done = []
    for i, step in enumerate(recipe.steps):
        log.info("step %d/%d: %s", i + 1, len(recipe.steps), step.type)
        start = time.perf_counter()
        step_ctx = dataclasses.replace(ctx, work_dir=ctx.work_dir / f"step-{i + 1}") if ctx.work_dir else ctx
        with naming_step(i, step):
            stats = apply_step(model, step, step_ctx)
        done.append({"type": step.type, "config": step.to_dict(), "seconds": time.perf_counter() - start, "stats": stats})
    return done


def run_bench(path: Path, cfg: BenchConfig, device: str, dtype: str) -> dict:
    """Benchmark in a fresh process so peak memory is the model's own, not this process's history."""
    return bench_in_subprocess(path, cfg, device, dtype)
