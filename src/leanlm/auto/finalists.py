"""The end of a search: the baseline, the finalists and the reference recipes measured in the same run
(all eval windows; speed in fresh processes on the chosen runtime), the choice, and the output directory:
report.md, report.html, trials.jsonl, search.json and best/ (what `leanlm optimize` writes for the
chosen recipe)."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from leanlm.auto.budget import OBJECTIVES, better, objective_value
from leanlm.auto.report import write_auto_report
from leanlm.auto.space import SearchSpace, family_of
from leanlm.auto.trial import SearchJob, worst_violation
from leanlm.core.paths import atomic_dir, dir_size
from leanlm.errors import LeanLMError
from leanlm.measure.bench import BenchConfig
from leanlm.measure.evaluate import score_windows
from leanlm.models.load import load_model
from leanlm.pipeline.bench_worker import bench_in_subprocess
from leanlm.pipeline.optimize import build_report, measure_baseline, measure_result
from leanlm.pipeline.recipe import dump_recipe, parse_recipe
from leanlm.pipeline.report import write_report

log = logging.getLogger(__name__)

_SHOWN = ("decode_tps", "prefill_tps", "decode_tps_batch", "peak_mem_bytes")


def baseline_for(job: SearchJob, settings: dict, measured: int) -> dict:
    """The original measured on the eval split and benchmarked in a fresh process (for llama.cpp, as a float
    GGUF), with what measuring `measured` more models will take."""
    start = time.perf_counter()
    loaded = load_model(job.model, job.device)
    recipe = parse_recipe({"name": "baseline", "bench": job.bench}, "bench")
    loaded_s = time.perf_counter() - start
    base = measure_baseline(loaded, recipe, job.data, tasks=job.tasks, bench=False, device=job.device)
    eval_s = time.perf_counter() - start - loaded_s
    if job.runtime == "llama.cpp":
        from leanlm.export import export

        path = Path(job.work_dir) / "baseline-f16.gguf"
        if not path.exists():
            export(loaded.path, path, "gguf", weight_type="f16", embeddings="f16")
    else:
        path = loaded.path
    if job.objective == "size":
        # a size needs no benchmark: a fresh-process run per model would only spend the search's time
        base.speed = {"disk_bytes": dir_size(path)}
    else:
        base.speed = bench_in_subprocess(path, recipe.bench, "cpu" if job.runtime == "llama.cpp" else job.device,
                                         "auto", runtime=job.runtime)
    bench_s = time.perf_counter() - start - loaded_s - eval_s
    base.loaded = None
    # a finalist is reloaded and scored on every eval window; then it and the original are benchmarked
    # job.speed_rounds times each
    reserve = measured * (loaded_s + eval_s) + job.speed_rounds * (measured + 1) * bench_s
    windows = max(1, base.windows.shape[0])
    return {"baseline": base, "recipe": recipe, "seconds": time.perf_counter() - start, "path": path,
            "reserve_s": reserve,
            "trial_estimate_s": loaded_s + eval_s * (job.low_windows + 2) / windows + 0.2 * bench_s}


def measure_finalist(result: dict, job: SearchJob, base, recipe) -> dict:
    """A finalist's quality measured as `leanlm optimize` measures its result: reloaded, every eval window.
    Its speed comes from `measure_speeds`, in the same rounds as the original and the other finalists."""
    artifact = Path(result["artifact"])
    if job.runtime == "leanlm":
        measured = measure_result(artifact, base, recipe, job.device, bench=False)
        measured["quality"].pop("generations", None)
    else:
        from leanlm.runtime.llamacpp import LlamaCppLM

        quality = score_windows(LlamaCppLM(artifact, n_ctx=base.windows.shape[1] + 8), base.windows, base.reference,
                                desc=f"finalist {result['number']}")
        measured = {"quality": quality}
    measured["violation"] = worst_violation(job.budget, measured["quality"], base.quality)
    return measured


def measure_speeds(artifacts: dict, baseline_path: Path, job: SearchJob, recipe) -> tuple:
    """Every finalist and the original benchmarked in fresh processes, in `rounds` rounds; each round runs
    them all (`job.speed_rounds` rounds), in an order rotated from the last. A finalist's number is the median of its per-round ratios to
    the original times the original's median: on a shared machine, speed drifts by 20% within a run, and a
    ratio taken minutes apart (one model after another) picks the luckier model, not the faster one.
    Returns (the original's speed, {number: speed}); each speed carries its `rounds` and `vs_original`."""
    if job.objective == "size":
        # what `leanlm bench` reports as the size: the bytes of every file of the model
        return {"disk_bytes": dir_size(baseline_path)}, {k: {"disk_bytes": dir_size(a)} for k, a in artifacts.items()}
    runtime = "llama.cpp" if job.runtime == "llama.cpp" else "leanlm"
    device = "cpu" if runtime == "llama.cpp" else job.device
    order, rounds = [None, *artifacts], job.speed_rounds
    runs: dict = {key: [] for key in order}
    for r in range(rounds):
        shift = r % len(order)
        for key in order[shift:] + order[:shift]:
            path = baseline_path if key is None else Path(artifacts[key])
            log.info("speed round %d/%d: %s", r + 1, rounds, "the original" if key is None else f"finalist {key}")
            runs[key].append(bench_in_subprocess(path, recipe.bench, device, "auto", runtime=runtime))
    base_speed = _median_run(runs[None])
    speeds = {}
    for key in artifacts:
        speed = dict(runs[key][-1])
        ratios = {}
        for metric, value in base_speed.items():
            if _numeric(value) and value and all(_numeric(run.get(metric)) for run in runs[key]):
                ratios[metric] = statistics.median(own[metric] / base[metric]
                                                   for own, base in zip(runs[key], runs[None]) if base[metric])
                speed[metric] = ratios[metric] * value
        speed["vs_original"] = ratios
        speed["rounds"] = [{m: run.get(m) for m in _SHOWN} for run in runs[key]]
        speeds[key] = speed
    base_speed["rounds"] = [{m: run.get(m) for m in _SHOWN} for run in runs[None]]
    return base_speed, speeds


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _median_run(runs: list[dict]) -> dict:
    """Each numeric metric's median over the rounds; the rest from the last round."""
    speed = dict(runs[-1])
    for metric, value in speed.items():
        if _numeric(value) and all(_numeric(run.get(metric)) for run in runs):
            speed[metric] = statistics.median(run[metric] for run in runs)
    return speed


def pick_finalists(results: list[dict], objective: str, count: int) -> list[dict]:
    """The best `count` searched trials within the budget on all search windows, plus every reference recipe
    that met it."""
    kept = [r for r in results if r.get("status") == "ok" and r.get("artifact") and r["violation"] <= 0]
    searched = [r for r in kept if r["number"] >= 0]
    reverse = OBJECTIVES[objective][0] == "maximize"
    searched.sort(key=lambda r: r["objective"], reverse=reverse)
    return searched[:count] + [r for r in kept if r["number"] < 0]


def finish(state, job: SearchJob, baseline: dict, settings: dict, space: SearchSpace, out: Path, overwrite: bool,
           count: int) -> dict:
    base, recipe = baseline["baseline"], baseline["recipe"]
    measured, finalists = {}, pick_finalists(state.results, job.objective, count)
    for result in finalists:
        log.info("measuring finalist %s (%s)", result["number"], result["name"])
        measured[result["number"]] = measure_finalist(result, job, base, recipe)
    if finalists:
        base.speed, speeds = measure_speeds({r["number"]: r["artifact"] for r in finalists}, baseline["path"], job,
                                            recipe)
        for number, speed in speeds.items():
            measured[number]["speed"] = speed
            measured[number]["objective"] = objective_value(job.objective, speed, job.price_per_hour)
    base_row = {"quality": {k: v for k, v in base.quality.items() if k != "generations"}, "speed": base.speed,
                "objective": objective_value(job.objective, base.speed, job.price_per_hour), "violation": 0.0}
    chosen = None
    for number, m in measured.items():
        if m["violation"] <= 0 and (chosen is None or _preferred(job.objective, m, measured[chosen])):
            chosen = number
    report = {"settings": settings, "space": space.describe(), "baseline": base_row,
              "eval_data": base.eval_name, "results": [_row(r, measured.get(r["number"])) for r in state.results],
              "chosen": chosen, "families": family_verdicts(state.results, measured, job.objective, chosen),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_dir(out, overwrite) as tmp:
        write_auto_report(report, tmp)
        if chosen is not None:
            _write_best(next(r for r in state.results if r["number"] == chosen), measured[chosen], job, base,
                        tmp / "best")
    if chosen is None:
        raise LeanLMError(f"no candidate met the budget {', '.join(settings['budget'])} on the eval windows; closest: "
                          + closest(report["results"]) + f". The trials and report are in {out}; no best/ was "
                          "written. Loosen the budget, widen the search (--families, --time-limit) or add --data")
    shutil.rmtree(job.work_dir, ignore_errors=True)
    return report


def _preferred(objective: str, a: dict, b: dict) -> bool:
    """a over b: the better objective; on a tie (sizes are often equal to the byte), the better quality."""
    if a["objective"] == b["objective"]:
        return a["violation"] < b["violation"]
    return better(objective, a["objective"], b["objective"])


def _row(result: dict, measured: dict | None) -> dict:
    row = {k: v for k, v in result.items() if k not in ("traceback",)}
    row["families"] = families_of(result)
    if row.get("quality"):
        row["quality"] = {k: v for k, v in row["quality"].items() if k != "generations"}
    if measured:
        row["final"] = measured
    return row


def families_of(result: dict) -> str:
    return "+".join(sorted({family_of(s["type"]) for s in result.get("steps", [])})) or "none"


def family_verdicts(results: list[dict], measured: dict, objective: str, chosen: int | None) -> list[dict]:
    """For each family (or mix of families) tried: its best point within the budget, and why it won or lost."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(families_of(r), []).append(r)
    unit = OBJECTIVES[objective][2]
    winner = measured.get(chosen, {}).get("objective") if chosen is not None else None
    out = []
    for family, rows in sorted(groups.items()):
        ok = [r for r in rows if r.get("status") == "ok"]
        if not ok:
            continue  # refused before any work (see the trials table for why)
        within = [r for r in ok if (measured.get(r["number"]) or r)["violation"] <= 0]
        entry = {"family": family, "trials": len(rows), "within_budget": len(within)}
        if not within:
            near = min(ok, key=lambda r: r["violation"], default=None)
            entry["verdict"] = "no trial within the budget" + (f"; the closest {_missed(near['violation'])}"
                                                                if near else "; every trial failed or was refused")
        else:
            pick = max(within, key=lambda r: _score(measured.get(r["number"]) or r, objective))
            value = (measured.get(pick["number"]) or pick)["objective"]
            entry.update(best=pick["number"], name=pick["name"], objective=value)
            if pick["number"] == chosen:
                entry["verdict"] = f"won: {value:.4g} {unit}"
            elif pick["number"] in measured:
                entry["verdict"] = f"lost: {value:.4g} {unit} against the chosen {winner:.4g} (both measured in full)"
            else:
                entry["verdict"] = (f"lost: its best quick estimate, {value:.4g} {unit} on {pick.get('fidelity')} search "
                                    "windows, did not make it a finalist (within budget on every search window and "
                                    "among the best estimates)")
        out.append(entry)
    return out


def _score(row: dict, objective: str) -> float:
    value = row.get("objective")
    if value is None:
        return float("-inf")
    return value if OBJECTIVES[objective][0] == "maximize" else -value


def closest(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    ok.sort(key=lambda r: (r.get("final") or r)["violation"])
    if not ok:
        return "none: every trial failed or was refused (see trials.jsonl for why)"
    return "; ".join(f"#{r['number']} {r['name']} {_missed((r.get('final') or r)['violation'])}" for r in ok[:3])


def _missed(violation: float) -> str:
    return "was not measured on every budget" if violation == float("inf") else f"missed by {violation:.0%}"


def _write_best(result: dict, measured: dict, job: SearchJob, base, best: Path) -> None:
    """best/: the chosen recipe's model, recipe.yaml that re-runs it, and its optimize report."""
    best.mkdir()
    data = {"name": f"auto: {result['name']}", "calibration": job.calibration, "steps": result["steps"]}
    recipe = parse_recipe(data, "chosen recipe")
    shutil.copytree(result["model_dir"], best / "model")
    if job.runtime == "llama.cpp":
        shutil.copy2(result["artifact"], best / "model.gguf")
        (best / "export.json").write_text(json.dumps({"format": "gguf", **result.get("export", {})}, indent=2))
    dump_recipe(recipe, best / "recipe.yaml")
    report = build_report(job.model, recipe, base, result.get("step_stats", []),
                          {"quality": measured["quality"], "speed": measured["speed"]})
    report["runtime"] = job.runtime
    write_report(report, best)


__all__ = ["baseline_for", "finish", "BenchConfig"]
