"""`leanlm auto`: search every step type's declared space for the recipe that does best on an objective
(speed, size, cost) within a quality budget, measured on the runtime the model will be deployed on.

1. The baseline is measured as `leanlm optimize` measures it (quality on the eval split, speed in a fresh
   process); the search itself scores on a held-out tail of the training text, so the eval split is
   seen only when the finalists are measured.
2. Optuna (multi-objective TPE: the budget's first metric against the objective, the budget as a
   constraint) proposes candidates; each is scored on a few windows and only the ones that could be on
   the front on all of them (trial.TrialRunner).
3. The finalists, the reference recipes and the baseline are measured again in the same run: all eval
   windows, speed in fresh processes. The best within the budget becomes `best/`.

State lives in a work directory beside the output (Optuna's SQLite study plus every result), so a search
stopped by SIGTERM or Ctrl-C continues with `resume=True`, losing only the trials that were running.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, wait
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from leanlm.auto.budget import OBJECTIVES, Constraint, better, check_objective, parse_budget
from leanlm.auto.executors import make_executor
from leanlm.auto.finalists import finish
from leanlm.auto.planner import Planner
from leanlm.auto.space import NONE, SearchSpace, build_space, canonical, describe_candidate
from leanlm.auto.trial import Candidate, SearchJob
from leanlm.core.paths import check_output
from leanlm.errors import ConfigError, LeanLMError
from leanlm.models.builtin import DEFAULT_MODEL

log = logging.getLogger(__name__)
MIN_SECONDS = 60


class Interrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C: stop now; the study on disk is where a resumed search picks up."""


class SearchInterrupted(LeanLMError):
    """Raised to the caller once an interrupted search's state is on disk."""


def parse_duration(text: str | float | int) -> float:
    """Seconds from `90`, `90s`, `45m`, `1.5h`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    if not match:
        raise ConfigError(f"time limit {text!r}: write a number with s, m or h (90s, 45m, 1.5h)")
    unit = {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * unit


def auto(model: str = DEFAULT_MODEL, budget: list[str] | str = ("kld<=0.05",), objective: str = "decode_tps",
         runtime: str = "leanlm", out: str | Path = "leanlm-auto", data: str | None = None, tasks: str | None = None,
         time_limit: str | float = "60m", families: list[str] | None = None, fix: list[str] | tuple[str, ...] = (),
         space: str | Path | None = None, compare: list[str] | tuple[str, ...] = ("default",), jobs: int = 1,
         ray: str | None = None, resume: bool = False, overwrite: bool = False, price_per_hour: float | None = None,
         finalists: int = 3, max_trials: int | None = None, seed: int = 0, calibration_samples: int = 64,
         low_windows: int = 4, search_windows: int = 16, device: str = "cpu", bench: dict | None = None,
         speed_rounds: int = 3) -> dict:
    """Search for the recipe with the best `objective` within `budget`; write DIR/report.md, report.html,
    trials.jsonl and best/ (the chosen recipe's full optimize output). Returns the report's data."""
    constraints = parse_budget(budget)
    check_objective(objective, price_per_hour)
    seconds = parse_duration(time_limit)
    if seconds < MIN_SECONDS:
        raise ConfigError(f"--time-limit {time_limit!r} is too short: a search needs at least {MIN_SECONDS}s "
                          "(the baseline, one trial and its measurement)")
    if speed_rounds < 1:
        raise ConfigError(f"--speed-rounds {speed_rounds}: give at least 1")
    if any(c.metric == "task_acc" for c in constraints) and not tasks:
        raise ConfigError("a task_acc budget needs the tasks it is measured on: --tasks T.jsonl")
    search_space = build_space(runtime, families, fix, space)
    from leanlm.core.config import parse_config
    from leanlm.measure.bench import BenchConfig

    parse_config(BenchConfig, bench or {}, "--bench")  # a typo fails now, not after the search
    if runtime == "llama.cpp":
        from leanlm.runtime.llamacpp import require_llama_cpp

        try:
            require_llama_cpp()
        except LeanLMError as err:
            raise ConfigError(f"--runtime llama.cpp: {err}") from err
    settings = {"model": str(model), "budget": [c.text for c in constraints], "objective": objective,
                "runtime": runtime, "data": data, "tasks": tasks, "families": families, "fix": list(fix),
                "space": str(space) if space else None, "compare": list(compare), "seed": seed,
                "calibration_samples": calibration_samples, "low_windows": low_windows,
                "search_windows": search_windows, "price_per_hour": price_per_hour, "bench": bench or {}, "speed_rounds": speed_rounds}
    out = Path(out).expanduser()
    work = out.parent / f".{out.name}.auto"
    if not resume:
        out = check_output(out, overwrite)
    state = SearchState.open(work, settings, resume, overwrite)
    job = SearchJob(str(model), runtime, objective, constraints,
                    {"samples": calibration_samples, "length": 512, "seed": seed}, str(work), data, tasks, device,
                    low_windows, search_windows, price_per_hour=price_per_hour, bench=bench or {},
                    speed_rounds=speed_rounds)
    try:
        with stopping_on_signals():
            return _search(job, search_space, state, settings, seconds, out, overwrite or resume, compare, jobs, ray,
                           finalists, max_trials, seed)
    except Interrupted as signal_name:
        raise SearchInterrupted(f"interrupted by {signal_name} after {state.trial_count()} finished trials; they are "
                                f"kept in {work}: run the same command with --resume to continue (only the trials "
                                "that were running are run again)") from None


def _search(job, search_space, state, settings, seconds, out, overwrite, compare, jobs, ray, finalists, max_trials,
            seed) -> dict:
    from leanlm.auto.finalists import baseline_for

    # --time-limit bounds the search and its finalists; the --compare recipes are the evidence it is judged
    # against, run and measured on top of it (each about as long as `leanlm optimize` of that recipe)
    baseline = baseline_for(job, settings, finalists)
    needed = baseline["seconds"] + baseline["reserve_s"] + baseline["trial_estimate_s"]
    if seconds - state.elapsed() < needed:
        raise ConfigError(f"--time-limit {seconds / 60:.1f} min is too short for even one trial here: measuring the "
                          f"baseline took {baseline['seconds']:.0f}s, one trial takes about "
                          f"{baseline['trial_estimate_s']:.0f}s and measuring the finalists about "
                          f"{baseline['reserve_s']:.0f}s; give at least {needed / 60:.1f} min")
    if job.runtime == "leanlm":  # quick estimates are scaled to the original's fresh-process speed
        job.anchor = {k: v for k, v in baseline["baseline"].speed.items() if k.endswith("_tps") or k == "decode_tps_batch"}
    executor = make_executor(job, jobs, ray)
    try:
        references = [c for c in reference_candidates(compare, job.runtime) if c.name not in state.done_names()]
        run_references(executor, state, job, references)
        run_trials(executor, state, search_space, job, seconds, max_trials, seed, baseline["reserve_s"])
    finally:
        executor.shutdown()
    return finish(state, job, baseline, settings, search_space, out, overwrite, finalists)


def reference_candidates(compare, runtime: str) -> list[Candidate]:
    """Recipes measured beside the search (shipped ones by name, or YAML paths); for llama.cpp also its own
    quantization types of the original model."""
    from leanlm.pipeline.recipe import load_recipe

    out = []
    for i, name in enumerate(compare):
        recipe = load_recipe(name)
        out.append(Candidate(-(i + 1), [s.to_dict() for s in recipe.steps], {}, f"recipe {name}", full=True,
                             origin="reference recipe (--compare)"))
    if runtime == "llama.cpp":
        for j, kind in enumerate(("q8_0", "q4_0", "q4_k")):
            out.append(Candidate(-(len(out) + 1), [], {"weight_type": kind}, f"llama.cpp {kind.upper()}", full=True,
                             origin="llama.cpp's own type (reference)"))
    return out


def run_references(executor, state: SearchState, job: SearchJob, references: list[Candidate]) -> None:
    """The --compare recipes (and for llama.cpp its own types), run like trials but outside the time limit."""
    if not references:
        return
    queue, pending = list(references), {}
    with tqdm(total=len(queue), desc="reference recipes (not counted in --time-limit)", unit="recipe") as bar:
        while queue or pending:
            while queue and len(pending) < executor.slots:  # one slot at a time, so each is recorded as it ends
                cand = queue.pop(0)
                pending[executor.submit(cand)] = cand
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                pending.pop(future)
                state.record(future.result(), None, None, job)
                bar.update(1)


def run_trials(executor, state: SearchState, space: SearchSpace, job: SearchJob, seconds: float,
               max_trials: int | None, seed: int, reserve: float) -> None:
    """Ask Optuna for candidates and run them until the time (less what the finalists need) is spent."""
    import optuna

    study = state.study(job, seed, space)
    planner = Planner(space, job.objective, job.budget)
    deadline = time.monotonic() + seconds - state.elapsed() - reserve
    started = time.monotonic()
    pending: dict = {}
    searched = sum(1 for r in state.results if r["number"] >= 0)
    bar = tqdm(total=max_trials, desc="auto search", unit="trial", initial=searched)
    try:
        while True:
            left = deadline - time.monotonic()
            room = len(pending) < executor.slots
            more = max_trials is None or searched + len(pending) < max_trials
            if room and more and left > state.typical_trial_seconds():
                cand, trial = next_candidate(study, space, state, left, planner)
                if cand is not None:
                    pending[executor.submit(cand)] = (cand, trial)
                    continue
            if not pending:
                break
            done, _ = wait(list(pending), timeout=max(1.0, left), return_when=FIRST_COMPLETED)
            for future in done:
                cand, trial = pending.pop(future)
                result = future.result()
                state.record(result, study, trial, job)
                searched += 1
                bar.update(1)
                bar.set_postfix_str(state.progress(job, deadline))
            state.add_elapsed(time.monotonic() - started)
            started = time.monotonic()
    except optuna.exceptions.OptunaError as err:
        raise LeanLMError(f"the search's study failed: {err}") from err
    finally:
        state.add_elapsed(time.monotonic() - started)
        bar.close()


def next_candidate(study, space: SearchSpace, state: SearchState, left: float, planner: Planner):
    import optuna

    for _ in range(20):  # a candidate seen before is answered from its result, not run again
        # trials that were running when a search stopped are waiting in the study: asked first, as they were
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        plan = None if waiting else planner.next(state.results, state.by_key)
        if plan is not None:
            study.enqueue_trial(plan[0], skip_if_exists=False)
        trial = study.ask()
        origin = plan[1] if plan else ("resumed" if waiting else "sampler (TPE)")
        steps, export = space.suggest(trial)
        if state.typical_trial_seconds() + training_seconds(steps) > left:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # its training alone would overrun the limit
            continue
        seen = state.by_key.get(candidate_key(steps, export))
        if seen is None:
            cand = Candidate(trial.number, steps, export, describe_candidate(steps, export), state.front(),
                             origin=origin)
            return cand, trial
        state.tell(study, trial, seen)
    return None, None


def training_seconds(steps: list[dict]) -> float:
    """What a candidate's training steps may take (their `train.max_minutes`), beyond a typical trial."""
    return sum(60 * float((s.get("train") or {}).get("max_minutes") or 0) for s in steps)


def candidate_key(steps: list[dict], export: dict) -> str:
    """Steps with every default filled in, so the same recipe written two ways is run once."""
    return canonical(steps, export)


@contextmanager
def stopping_on_signals():
    """SIGTERM and SIGINT raise Interrupted in the main thread, so the state is flushed and the run says how
    to resume."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class SearchState:
    """The search on disk: settings.json, Optuna's study.db and results.jsonl (one line per finished trial)."""

    def __init__(self, work: Path, settings: dict):
        self.work, self.settings = work, settings
        self.results: list[dict] = []
        self.by_key: dict[str, dict] = {}
        path = work / "results.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self._index(json.loads(line))

    @classmethod
    def open(cls, work: Path, settings: dict, resume: bool, overwrite: bool) -> SearchState:
        saved = work / "settings.json"
        if resume:
            if not saved.exists():
                raise ConfigError(f"--resume: no interrupted search at {work} (it is kept beside the output "
                                  "directory until the search completes)")
            old = json.loads(saved.read_text())
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                raise ConfigError(f"--resume: the search at {work} ran with other settings ("
                                  + "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
                                  + "); resume with the same arguments, or start again with --overwrite")
        elif work.exists():
            if not overwrite:
                raise ConfigError(f"an interrupted search is kept at {work}: continue it with --resume, or start "
                                  "again with --overwrite")
            import shutil

            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(settings, indent=2))
        return cls(work, settings)

    def study(self, job: SearchJob, seed: int, space: SearchSpace):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        primary = job.budget[0]
        directions = ["minimize" if primary.upper else "maximize", OBJECTIVES[job.objective][0]]
        with warnings.catch_warnings():  # `group` (conditional spaces sampled jointly) is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
        study = optuna.create_study(study_name="leanlm-auto", storage=f"sqlite:///{self.work / 'study.db'}",
                                    directions=directions, sampler=sampler, load_if_exists=True)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # in flight when the last run stopped: asked again first, so only its time is lost
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
        return study

    def _index(self, result: dict) -> None:
        self.results.append(result)
        self.by_key[candidate_key(result["steps"], result.get("export", {}))] = result

    def record(self, result: dict, study, trial, job: SearchJob) -> None:
        with (self.work / "results.jsonl").open("a") as f:
            f.write(json.dumps(result, default=str) + "\n")
        self._index(result)
        if trial is not None:
            self.tell(study, trial, result)

    def tell(self, study, trial, result: dict) -> None:
        import optuna

        primary = self.settings_budget()[0]
        value = primary.read(result.get("quality") or {}, {"perplexity": result.get("reference_perplexity")})
        if result.get("status") != "ok" or result.get("objective") is None or value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        trial.set_constraint("budget", float(result["violation"]))  # > 0: over budget
        trial.set_user_attr("violation", float(result["violation"]))
        trial.set_user_attr("fidelity", int(result["fidelity"]))
        study.tell(trial, [float(value), float(result["objective"])])

    def settings_budget(self) -> list[Constraint]:
        return parse_budget(self.settings["budget"])

    def done_names(self) -> set[str]:
        return {r["name"] for r in self.results if r.get("number", 0) < 0}

    def trial_count(self) -> int:
        return len(self.results)

    def ok(self) -> list[dict]:
        return [r for r in self.results if r.get("status") == "ok"]

    def front(self) -> list[tuple[float, float]]:
        """(violation, objective) of the trials scored on all search windows."""
        full = max((r["fidelity"] for r in self.ok()), default=0)
        return [(r["violation"], r["objective"]) for r in self.ok() if r["fidelity"] == full]

    def typical_trial_seconds(self) -> float:
        searched = [r for r in self.results if r.get("seconds") and r["number"] >= 0]
        times = sorted(r["seconds"] for r in searched or [r for r in self.results if r.get("seconds")])
        return times[len(times) // 2] if times else 0.0

    def best(self, objective: str) -> dict | None:
        within = [r for r in self.ok() if r["violation"] <= 0 and r["objective"] is not None]
        best = None
        for r in within:
            if best is None or better(objective, r["objective"], best["objective"]):
                best = r
        return best

    def progress(self, job: SearchJob, deadline: float) -> str:
        best = self.best(job.objective)
        unit = OBJECTIVES[job.objective][2]
        eta = max(0, deadline - time.monotonic())
        head = f"best {best['objective']:.3g} {unit} (#{best['number']})" if best else "none within budget yet"
        return f"{head}; search ends in {eta / 60:.0f} min"

    def elapsed(self) -> float:
        path = self.work / "elapsed.json"
        return json.loads(path.read_text())["seconds"] if path.exists() else 0.0

    def add_elapsed(self, seconds: float) -> None:
        total = self.elapsed() + max(0.0, seconds)
        (self.work / "elapsed.json").write_text(json.dumps({"seconds": total}))


__all__ = ["auto", "Interrupted", "parse_duration", "NONE"]
