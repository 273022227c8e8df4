"""One search trial, run by a worker that holds the original model once: apply a candidate's steps to a copy,
score it on a few search windows, and only if it could be on the front score it on all of them (the
multi-fidelity part), with a quick speed estimate on the chosen runtime. Finalists are saved so the
driver can measure them again in fresh processes.

What trials share stays in the worker: the original model, the reference distributions (on disk, see
measure.refcache), the calibration samples, the training text, and the models after a common prefix of
costly steps (a depth-pruned model is pruned once for every quantizer tried on it).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leanlm.auto.budget import OBJECTIVES, Constraint, better, objective_value
from leanlm.core import memo
from leanlm.core.packed import module_bytes
from leanlm.core.paths import dir_size
from leanlm.core.step import StepContext, check_steps
from leanlm.data.corpus import calibration_samples, load_corpus
from leanlm.errors import LeanLMError
from leanlm.measure.bench import BenchConfig, bench_decoder, time_decode, time_prefill
from leanlm.measure.evaluate import eval_windows, load_tasks, prepare_reference, score_tasks, score_windows
from leanlm.models.load import LoadedModel, load_model
from leanlm.models.save import save_model
from leanlm.pipeline.optimize import apply_recipe
from leanlm.pipeline.recipe import parse_recipe

QUICK_BENCH = BenchConfig(prompt_tokens=128, decode_prompt_tokens=32, new_tokens=16, batch=4, repeats=3, warmup=1)
# candidate and original in turns (see TrialRunner._speed): a short run each, three rounds
PAIRED_BENCH = BenchConfig(prompt_tokens=128, decode_prompt_tokens=32, new_tokens=24, batch=4, repeats=1, warmup=1)
PAIRED_ROUNDS = 3
PREFIX_MODELS = 2  # models kept after a shared prefix of steps (each as large as the original)
MEMO_ENTRIES = 1  # a sensitivity measurement is as large as the original in float32


@dataclass
class SearchJob:
    """What every worker needs, as plain data (it travels to worker processes and Ray tasks)."""
    model: str
    runtime: str
    objective: str
    budget: list[Constraint]
    calibration: dict
    work_dir: str
    data: str | None = None
    tasks: str | None = None
    device: str = "cpu"
    low_windows: int = 4
    search_windows: int = 16
    window: int = 512
    price_per_hour: float | None = None
    threads: int | None = None
    bench: dict = field(default_factory=dict)  # BenchConfig fields for the baseline's and finalists' benchmarks
    slack: float = 0.25  # a cheap estimate this far outside the budget may still be within it on more text
    # the original's speed from its fresh-process benchmark: a quick estimate is the candidate's speed as a
    # ratio to the original's, measured right after it in the same worker, times this (see TrialRunner._speed)
    anchor: dict | None = None
    speed_rounds: int = 3  # rounds of fresh-process benchmarks of the finalists beside the original


@dataclass
class Candidate:
    number: int
    steps: list[dict]
    export: dict = field(default_factory=dict)
    name: str = ""
    front: list[tuple[float, float]] = field(default_factory=list)  # (violation, objective) of full trials
    full: bool = False  # a reference recipe: always measured in full
    origin: str = ""  # how the search came to it: a seed, a move from an incumbent, the sampler


def search_split(text: str, share: float = 0.1) -> tuple[str, str]:
    """The training text split into what steps may train and calibrate on and the tail the search scores
    on, so the eval split stays unseen until the finalists are measured on it."""
    cut = int(len(text) * (1 - share))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    return text[:cut], text[cut:]


class TrialRunner:
    def __init__(self, job: SearchJob):
        if job.threads:
            torch.set_num_threads(job.threads)
        self.job = job
        self.base = load_model(job.model, job.device)
        corpus = load_corpus(job.data, self.base.tokenizer)
        self.train, held = search_split(corpus.train)
        windows = eval_windows(self.base.tokenizer, held, job.window)
        if windows.shape[0] < 1:
            raise LeanLMError(f"the training text's last 10% holds no {job.window}-token window to search on; "
                              "give more text (--data) or a shorter --window")
        self.windows = windows[: job.search_windows]
        self.reference = prepare_reference(self.base, self.windows)
        self.tasks = load_tasks(job.tasks) if job.tasks else None
        self._calibration: torch.Tensor | None = None
        self._prefix: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._memo = memo.Store(MEMO_ENTRIES)  # costly intermediate results steps share between trials

    def calibration(self) -> torch.Tensor:
        if self._calibration is None:
            c = self.job.calibration
            self._calibration = calibration_samples(self.base.tokenizer, self.train, c["samples"], c["length"], c["seed"])
        return self._calibration

    def run(self, cand: Candidate) -> dict:
        start = time.perf_counter()
        try:
            with memo.using(self._memo):
                out = self._run(cand)
        except LeanLMError as err:  # a candidate the step types refuse: infeasible, and says why
            out = {"status": "invalid", "error": str(err)}
        except Exception as err:  # noqa: BLE001 - one broken trial must not end a search; its error is kept
            out = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc(limit=6)}
        out.update(number=cand.number, steps=cand.steps, export=cand.export, name=cand.name, origin=cand.origin,
                   seconds=time.perf_counter() - start, reference_perplexity=self.reference.perplexity,
                   worker=f"{socket.gethostname()}:{os.getpid()}")
        gc.collect()
        return out

    def recipe(self, cand: Candidate):
        data = {"name": cand.name or f"auto-trial-{cand.number}", "calibration": self.job.calibration,
                "steps": copy.deepcopy(cand.steps)}
        return parse_recipe(data, f"trial {cand.number}")

    def _run(self, cand: Candidate) -> dict:
        recipe = self.recipe(cand)
        check_steps(self.base.model, recipe.steps)
        model, steps = self._apply(recipe)
        loaded = LoadedModel(model, self.base.tokenizer, "trial", self.base.path, 0)
        trial_dir = Path(self.job.work_dir) / "trials" / str(cand.number)
        with tempfile.TemporaryDirectory(dir=self.job.work_dir) as scratch:
            target = self._artifact(loaded, cand, Path(scratch))
            scorer = self._scorer(loaded, target)
            low = self.job.low_windows if not cand.full else self.windows.shape[0]
            quality = score_windows(scorer, self.windows[:low], self.reference, desc=f"trial {cand.number}")
            speed = self._speed(loaded, target)
            out = {"status": "ok", "fidelity": low, "quality": quality, "speed": speed, "step_stats": steps}
            out["violation"] = self.violation(quality, partial=True)  # tasks are scored at full fidelity only
            out["objective"] = objective_value(self.job.objective, speed, self.job.price_per_hour)
            if low < self.windows.shape[0] and self.promising(out, cand.front):
                quality = score_windows(scorer, self.windows, self.reference, desc=f"trial {cand.number} (all)")
                out.update(fidelity=int(self.windows.shape[0]), quality=quality, violation=self.violation(quality, True))
            if self.tasks and out["fidelity"] == self.windows.shape[0]:
                if self.job.runtime != "leanlm":
                    raise LeanLMError("--tasks is scored in leanlm's runtime; use --runtime leanlm with task budgets")
                quality.update(score_tasks(model, self.base.tokenizer, self.tasks))
                out["violation"] = self.violation(quality)
            if out["fidelity"] == self.windows.shape[0] and out["violation"] <= 0:
                # a finalist: kept, to be measured again in fresh processes
                if not target.exists():
                    save_model(model, self.base.tokenizer, target)
                shutil.rmtree(trial_dir, ignore_errors=True)
                trial_dir.mkdir(parents=True)
                for part in Path(scratch).iterdir():
                    shutil.move(str(part), trial_dir / part.name)
                out["artifact"] = str(trial_dir / target.name)
                out["model_dir"] = str(trial_dir / "model")
        return out

    def _apply(self, recipe) -> tuple[torch.nn.Module, list[dict]]:
        """A copy of the original with the recipe's steps applied, starting from the longest cached prefix."""
        dicts = [s.to_dict() for s in recipe.steps]
        start, model, done = 0, None, []
        for k in range(len(dicts), 0, -1):
            key = json.dumps(dicts[:k], sort_keys=True)
            if key in self._prefix:
                model, start = copy.deepcopy(self._prefix[key][0]), k
                done = copy.deepcopy(self._prefix[key][1])
                self._prefix.move_to_end(key)
                break
        model = model if model is not None else copy.deepcopy(self.base.model)
        ctx = StepContext(self.base.tokenizer, self.calibration, self.base.device, train_text=self.train,
                          source=str(self.base.path))
        for i, step in enumerate(recipe.steps[start:], start):
            done += apply_recipe(model, dataclasses.replace(recipe, steps=[step]), ctx)
            costly = done[-1]["seconds"] > 5 and i < len(dicts) - 1  # worth keeping for the next trial
            if costly:
                self._prefix[json.dumps(dicts[: i + 1], sort_keys=True)] = (copy.deepcopy(model), copy.deepcopy(done))
                while len(self._prefix) > PREFIX_MODELS:
                    self._prefix.popitem(last=False)
        return model, done

    def _artifact(self, loaded: LoadedModel, cand: Candidate, scratch: Path) -> Path:
        """The saved model (leanlm) or its GGUF export (llama.cpp): what the runtime will load. In leanlm's
        runtime the model is scored in memory, so it is saved now only when its size is the objective."""
        if self.job.runtime == "leanlm":
            if self.job.objective in ("size", "peak_mem"):
                save_model(loaded.model, loaded.tokenizer, scratch / "model")
            return scratch / "model"
        save_model(loaded.model, loaded.tokenizer, scratch / "model")
        from leanlm.export import export

        export(scratch / "model", scratch / "model.gguf", "gguf", **cand.export)
        return scratch / "model.gguf"

    def _scorer(self, loaded: LoadedModel, target: Path):
        if self.job.runtime == "leanlm":
            return loaded.model
        from leanlm.runtime.llamacpp import LlamaCppLM

        return LlamaCppLM(target, n_ctx=self.job.window + 8)

    def _speed(self, loaded: LoadedModel, target: Path) -> dict:
        """A quick estimate (the finalists are measured properly later, in fresh processes)."""
        cfg = QUICK_BENCH
        if self.job.runtime == "llama.cpp":
            from leanlm.runtime.llamacpp import bench_llamacpp

            speed = bench_llamacpp(target, cfg.prompt_tokens, cfg.decode_prompt_tokens, cfg.new_tokens, cfg.repeats,
                                   cfg.warmup)
            return {**speed, "peak_mem_bytes": speed["disk_bytes"], "decode_tps_batch": speed["decode_tps"]}
        model = loaded.model
        size = dir_size(target) if target.exists() else module_bytes(model)
        # resident weights estimate the peak; the finalists' peak is measured in a fresh process
        sizes = {"disk_bytes": size, "peak_mem_bytes": size}
        if self.job.objective in ("size", "peak_mem"):
            return sizes
        if not self.job.anchor:
            return {**self._quick_speed(model, loaded.device, QUICK_BENCH), **sizes}
        # the machine is shared: its speed drifts over a search far more than within a few seconds. So the
        # candidate and the original take turns, a short run each, and the estimate is the median of the
        # rounds' ratios times the original's fresh-process speed: comparable with every other trial's
        rounds = []
        for _ in range(PAIRED_ROUNDS):
            own = self._quick_speed(model, loaded.device, PAIRED_BENCH)
            base = self._quick_speed(self.base.model, loaded.device, PAIRED_BENCH)
            rounds.append({k: own[k] / base[k] for k in own if base.get(k)})
        speed = {}
        for key in rounds[0]:
            speed[f"{key}_ratio"] = statistics.median(r[key] for r in rounds)
            if self.job.anchor.get(key):
                speed[key] = speed[f"{key}_ratio"] * self.job.anchor[key]
        return {**speed, **sizes}

    def _quick_speed(self, model, device, cfg: BenchConfig) -> dict:
        vocab = model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=gen).to(device)
        short = torch.randint(0, vocab, (cfg.batch, cfg.decode_prompt_tokens), generator=gen).to(device)
        decoder = bench_decoder(model, cfg)
        speed = {"prefill_tps": cfg.prompt_tokens / time_prefill(model, prompt, cfg, device),
                 "decode_tps": cfg.new_tokens / time_decode(decoder, short[:1], cfg, device)}
        if self.job.objective == "cost":
            speed["decode_tps_batch"] = cfg.batch * cfg.new_tokens / time_decode(decoder, short, cfg, device)
        return speed

    def violation(self, quality: dict, partial: bool = False) -> float:
        """The worst budget miss, relative to each bound (<= 0: every budget met); `partial` leaves out what
        was not measured yet."""
        budget = [c for c in self.job.budget if not partial or c.read(quality, {"perplexity": 1.0}) is not None]
        return worst_violation(budget, quality, {"perplexity": self.reference.perplexity})

    def promising(self, out: dict, front: list[tuple[float, float]]) -> bool:
        """Worth scoring on all windows: within the budget's slack, and not clearly beaten by a full trial
        that met the budget with a better objective."""
        if out["violation"] > self.job.slack or out["objective"] is None:
            return False
        # speed estimates of one process vary this much between trials
        margin = 1.03 if OBJECTIVES[self.job.objective][0] == "maximize" else 0.97
        for violation, objective in front:
            beaten = objective is not None and better(self.job.objective, objective, out["objective"] * margin)
            if violation <= 0 and beaten and violation <= out["violation"]:
                return False
        return True


_RUNNER: TrialRunner | None = None


def init_worker(job: SearchJob) -> None:
    """Process-pool initializer: load the original once per worker process."""
    global _RUNNER
    _RUNNER = TrialRunner(job)


def run_in_worker(cand: Candidate) -> dict:
    assert _RUNNER is not None, "init_worker was not called"
    return _RUNNER.run(cand)


def worst_violation(budget: list[Constraint], quality: dict, baseline: dict) -> float:
    """The worst budget miss, relative to each bound (<= 0: every budget met)."""
    if not budget:
        return -1.0
    return max(c.violation(quality, baseline) / max(abs(c.value), 1e-9) for c in budget)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
