"""`leanlm optimize`: measure the baseline, apply a recipe, measure the result, write it all down.

The output directory is assembled in a temporary sibling and renamed into place only when
complete, so an interrupted run leaves nothing half-written. The result is measured from the
saved artifact (reloaded, and benchmarked in a fresh process), i.e. what the user will ship.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leanlm.core.bench import BenchConfig
from leanlm.core.data import calibration_samples, load_corpus, read_text
from leanlm.core.evaluate import eval_windows, evaluate, load_tasks, prepare_reference, score_tasks
from leanlm.core.models import load_model, save_model
from leanlm.core.paths import atomic_dir, check_output
from leanlm.errors import ConfigError, LeanLMError
from leanlm.pipeline.recipe import Recipe, dump_recipe, library_versions, load_recipe
from leanlm.pipeline.report import machine_info, write_report
from leanlm.pipeline.steps import StepContext, apply_step, check_steps, naming_step

log = logging.getLogger(__name__)
DEFAULT_OUT = "leanlm-out"


def optimize(model: str = "smollm2-135m", recipe: str | Path | Recipe | dict | None = None, data: str | None = None,
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
    corpus = load_corpus(data, loaded.tokenizer)
    eval_text = read_text(eval_data, loaded.tokenizer) if eval_data else corpus.eval
    task_list = load_tasks(tasks or recipe.eval.tasks) if (tasks or recipe.eval.tasks) else None
    windows = eval_windows(loaded.tokenizer, eval_text, recipe.eval.window)

    log.info("measuring the baseline (%s)", model)
    reference = prepare_reference(loaded, windows, recipe.eval.prompts, recipe.eval.max_new_tokens)
    baseline = {"perplexity": reference.perplexity, "tokens": windows.numel() - windows.shape[0], "kld": 0.0,
                "top1": 1.0, "generations": reference.generations}
    if task_list:
        baseline.update(score_tasks(loaded.model, loaded.tokenizer, task_list))
    baseline_speed = run_bench(loaded.path, recipe.bench, device, dtype) if bench else {}

    with atomic_dir(out, overwrite) as tmp:
        work = out.parent / f".{out.name}.work"
        ctx = StepContext(loaded.tokenizer, _calibration(recipe, corpus.train, loaded.tokenizer), loaded.device,
                          train_text=corpus.train, source=str(loaded.path), work_dir=work, resume=resume)
        steps = apply_recipe(loaded.model, recipe, ctx)
        save_model(loaded.model, loaded.tokenizer, tmp / "model")
        del loaded
        gc.collect()
        result = measure_saved(tmp / "model", windows, reference, task_list, recipe, device)
        result_speed = run_bench(tmp / "model", recipe.bench, device, "auto") if bench else {}
        dump_recipe(recipe, tmp / "recipe.yaml")
        report = {
            "model": str(model), "data": corpus.name, "eval_data": eval_data or f"{corpus.name} (eval split)",
            "recipe": recipe.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
            "versions": library_versions(), "steps": steps,
            "baseline": {"quality": baseline, "speed": baseline_speed},
            "result": {"quality": result, "speed": result_speed},
        }
        write_report(report, tmp)
    shutil.rmtree(work, ignore_errors=True)
    return json.loads((out / "report.json").read_text())


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


def measure_saved(path: Path, windows: torch.Tensor, reference, tasks, recipe: Recipe, device: str) -> dict:
    """Quality of the saved artifact: reload it (a round trip) and compare with the reference."""
    return evaluate(load_model(path, device), windows, reference, tasks, recipe.eval.prompts,
                    recipe.eval.max_new_tokens, desc="evaluating result")


def run_bench(path: Path, cfg: BenchConfig, device: str, dtype: str) -> dict:
    """Benchmark in a fresh process so peak memory is the model's own, not this process's history."""
    cmd = [sys.executable, "-m", "leanlm", "bench", str(path), "--json", "--device", device, "--dtype", dtype,
           "--prompt-tokens", str(cfg.prompt_tokens), "--decode-prompt-tokens", str(cfg.decode_prompt_tokens),
           "--new-tokens", str(cfg.new_tokens), "--batch", str(cfg.batch), "--repeats", str(cfg.repeats),
           "--warmup", str(cfg.warmup)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise LeanLMError(f"benchmarking {path} failed (exit {proc.returncode}); run `{' '.join(cmd[2:])}` to see why")
    return json.loads(proc.stdout.strip().splitlines()[-1])
