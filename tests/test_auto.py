"""leanlm auto: budgets, the search space read off the step types, a real search on a tiny model (in this
process, in worker processes, on a local Ray cluster with two workers), resuming after SIGTERM, bad input,
and the HTML report in headless Chromium."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leanlm.auto import auto
from leanlm.auto.budget import objective_value, parse_budget
from leanlm.auto.space import build_space
from leanlm.cli import main
from leanlm.core import catalog, registry
from leanlm.core.registry import step_type
from leanlm.core.paths import dir_size
from leanlm.core.search import STAGES, Choice, Span, search_fields
from leanlm.errors import ConfigError, LeanLMError
from leanlm.models.load import load_model
from leanlm.pipeline.recipe import load_recipe

FAST = {"time_limit": "10m", "calibration_samples": 4, "finalists": 1, "compare": (), "search_windows": 4,
        "low_windows": 2, "speed_rounds": 1, "bench": {"prompt_tokens": 64, "decode_prompt_tokens": 16, "new_tokens": 8, "batch": 2,
                                    "repeats": 1}}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A 4-block Llama wide enough for width and head pruning to remove something."""
    from tests.conftest import build_tokenizer, tiny_llama

    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("auto-tiny")
    tiny_llama(len(tok), layers=4, hidden=128).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_budgets_parse_and_explain_their_grammar():
    kld, top1, ppl = parse_budget(["kld<=0.05", "top1 >= 0.9, ppl_increase<=5%"])
    assert (kld.metric, kld.op, kld.value) == ("kld", "<=", 0.05)
    assert top1.violation({"top1": 0.95}, {}) < 0 < top1.violation({"top1": 0.8}, {})
    assert ppl.value == pytest.approx(0.05)
    assert ppl.violation({"perplexity": 10.4}, {"perplexity": 10.0}) == pytest.approx(-0.01)
    assert kld.violation({}, {}) == float("inf")  # not measured counts as missed
    for bad, says in [("kld=<<1", "METRIC OP NUMBER"), ("accuracy>=0.5", "unknown metric"),
                      ("kld>=0.05", "at most"), ("top1<=0.9", "at least"), ("kld<=5%", "takes no %"),
                      ("kld<=0.1,kld<=0.2", "at most once")]:
        with pytest.raises(ConfigError, match=says):
            parse_budget(bad)


def test_cost_is_dollars_per_million_tokens_from_batched_throughput():
    assert objective_value("cost", {"decode_tps_batch": 100.0}, 0.36) == pytest.approx(1.0)
    assert objective_value("size", {"disk_bytes": 2**21}) == 2.0


def test_the_space_is_read_off_the_step_types():
    from leanlm.auto.space import seed_cost

    space = build_space()
    searched = {o.type for opts in space.stages.values() for o in opts}
    declared = {n for n in catalog.STEPS if step_type(n).config.stage}
    assert searched == declared
    for name in declared:
        cfg = step_type(name).config
        assert cfg.stage in STAGES and search_fields(cfg)  # search_fields checks each field exists
        assert all(isinstance(rng, (Choice, Span)) for rng in search_fields(cfg).values())
    # the llama.cpp runtime leaves out what a GGUF export cannot keep, and searches the GGUF type
    gguf = build_space(runtime="llama.cpp")
    assert "act_sparsity" not in {o.type for opts in gguf.stages.values() for o in opts}
    assert gguf.export is not None
    # seeds go cheapest first: no calibration, then forward passes, then per-layer solves, then AWQ's search
    order = [next(v for k, v in seed.items() if k.startswith("stage.") and v != "none") for seed in space.seeds()]
    assert order.index("cast") < order.index("wanda") < order.index("gptq") < order.index("awq")
    costs = [seed_cost(step_type(name).config) for name in order]
    assert costs == sorted(costs) and costs[order.index("awq")] == 3 and costs[order.index("magnitude")] == 0


def test_a_new_step_type_joins_the_search_with_no_change_to_auto(monkeypatch, request, wide_dir, tmp_path):
    monkeypatch.setitem(catalog.STEPS, "toy_mantissa", "tests.auto_toy_step")
    # unregistered afterwards, so the layering test still sees only leanlm's own step types
    request.addfinalizer(lambda: (registry._STEPS.pop("toy_mantissa", None),
                                  sys.modules.pop("tests.auto_toy_step", None)))
    space = build_space(families=["auto_toy_step"])
    assert [o.type for o in space.stages["quantize"]] == ["toy_mantissa"]
    # forced, because the toy step buys no speed: left free, the untouched model may rightly win on noise
    report = auto(str(wide_dir), ["kld<=0.5"], "decode_tps", out=tmp_path / "out", families=["auto_toy_step"],
                  fix=["steps.quantize=toy_mantissa"], max_trials=3, **FAST)
    searched = {r["steps"][0]["bits"] for r in report["results"] if r.get("steps")}
    assert len(searched) > 1, "the toy step's declared range was not searched"
    chosen = next(r for r in report["results"] if r["number"] == report["chosen"])
    assert chosen["steps"][0]["type"] == "toy_mantissa"
    assert load_recipe(tmp_path / "out" / "best" / "recipe.yaml").steps[0].type == "toy_mantissa"


def test_a_recipe_maps_onto_the_space_and_its_neighbours_are_one_move_away():
    from leanlm.auto.moves import neighbors, params_of, resolve
    from leanlm.auto.space import canonical

    space = build_space()
    steps = [s.to_dict() for s in load_recipe("default").steps]
    params = params_of(space, steps)
    used, back, export = resolve(space, params)
    assert used == params and canonical(back, export) == canonical(steps, {})
    # two quantize steps (int4 body, int8 head) is not one candidate of this space: no parameters, no guess
    assert params_of(space, [s.to_dict() for s in load_recipe("w4-g64-gptq-head8").steps]) is None
    assert params_of(space, [{"type": "rtn", "bits": 8, "search_steps": 7}]) is None  # a field the space fixes otherwise
    moves = neighbors(space, params)
    words = [w for _, _, w in moves]
    assert "rtn.skip: ['lm_head'] -> []" in words and "quantize: rtn -> gptq" in words
    assert words.index("rtn.skip: ['lm_head'] -> []") < words.index("quantize: rtn -> gptq")  # fields first
    assert words.index("quantize: rtn -> mixed") < words.index("structure: none -> depth")  # then the same stage
    for moved, key, _ in moves:
        changed = {k for k in set(moved) | set(params) if moved.get(k) != params.get(k)}
        stages = [k for k in changed if k.startswith("stage.") and k != "stage.heal"]  # heal follows structure
        # a field move changes that field alone; a stage move changes the stage and its types' own fields
        assert len(changed) == 1 or (len(stages) == 1 and all(
            k.startswith("stage.") or k.split(".")[0] in (params[stages[0]], moved[stages[0]]) for k in changed))
        assert key != canonical(steps, {})
    assert len({key for _, key, _ in moves}) == len(moves)
    # a range moves a grid step, or halfway to an end: mixed precision from 4.5 bits gets to 6 in one move
    mixed = params_of(space, [{"type": "mixed", "skip": []}])
    words = [w for _, _, w in neighbors(space, mixed)]
    assert words[:2] == ["mixed.bits_per_weight: 4.5 -> 5.0", "mixed.bits_per_weight: 4.5 -> 6.0"]


def test_the_planner_alternates_moves_from_the_best_with_seeds():
    from leanlm.auto.moves import neighbors, params_of
    from leanlm.auto.planner import Planner
    from leanlm.auto.space import canonical

    space = build_space(families=["quantize"])
    planner = Planner(space, "decode_tps")
    default = [s.to_dict() for s in load_recipe("default").steps]
    results = [{"number": -1, "name": "recipe default", "status": "ok", "steps": default, "export": {},
                "fidelity": 16, "violation": -0.9, "objective": 20.0},
               {"number": 0, "name": "over budget", "status": "ok", "steps": [{"type": "rtn", "bits": 4}],
                "export": {}, "fidelity": 16, "violation": 0.5, "objective": 30.0}]
    seen = {canonical(default, {}): results[0]}
    first, origin = planner.next(results, seen)
    assert origin.startswith("move from #-1 (recipe default): rtn.bits")
    # time is shared evenly: after a 10 s move, seeds until they have taken as long; after a slow seed, moves
    ran = [*results, {"number": 1, "status": "invalid", "seconds": 10.0, "origin": origin}]
    assert planner.next(ran, seen)[1].startswith("seed")
    ran.append({"number": 2, "status": "invalid", "seconds": 600.0, "origin": "seed"})
    origins = [planner.next(ran, seen)[1] for _ in range(12)]
    # the best within budget and the near miss (over budget, but faster) take turns
    assert all(o.startswith("move from #-1") for o in origins[1::2])
    assert all(o.startswith("move from #0 (over budget) (over budget)") for o in origins[::2])
    assert "rtn.skip: ['lm_head'] -> []" in " ".join(origins)
    far = {**results[1], "number": 3, "violation": 50.0}  # KLD 51 times its bound: no starting point
    assert planner.near_miss([results[0], far], results[0]) is None
    assert planner.near_miss([results[0], far, results[1]], results[0])["number"] == 0
    # a type move carries the fields the new type shares: int4 rtn becomes int4 gptq, not gptq's defaults
    moved = next(m for m, _, w in neighbors(space, params_of(space, results[1]["steps"])) if w == "quantize: rtn -> gptq")
    assert json.loads(moved["gptq.bits"]) == 4
    origins = [planner.next(results, seen) for _ in range(80)]
    assert origins[-1] is None  # moves and seeds spent: the sampler proposes
    # a better result within the budget becomes the incumbent whose neighbours come first
    better = {**results[0], "number": 7, "name": "head too", "objective": 25.0,
              "steps": [{**default[0], "skip": []}]}
    assert planner.next([*results, better], seen)[1].startswith("move from #7")
    # within the estimates' resolution of the best, the cheapest incumbent is refined first
    costly = {**better, "number": 8, "name": "costly", "objective": 25.5, "seconds": 200.0,
              "steps": [{"type": "gptq", "bits": 8, "group_size": None, "symmetric": True}]}
    ranked = planner.incumbents([*results, {**better, "seconds": 20.0}, costly])
    assert [r["number"] for r in ranked] == [7, 8, -1]


def test_a_near_miss_moves_to_where_its_trend_meets_the_budget():
    from leanlm.auto.planner import Planner, crossing

    # the fifth session's size search: mixed precision with its head at 4.5 and 5.0 bits, KLD 0.219 and 0.128;
    # the log-KLD line crosses 0.9 x 0.05 near 5.97 bits, so the next move is 6.0, not the 5.5 grid neighbour
    grid = Span(4.5, 7.5, 0.5)
    assert crossing(4.5, 0.219, 5.0, 0.128, 0.045, grid) == 6.0
    assert crossing(5.0, 0.128, 4.5, 0.219, 0.045, grid) == 6.0  # the order of the points does not matter
    # a loss that rises with the field (parameters removed) is met by going down, rounded down on the grid
    assert crossing(0.2, 0.03, 0.35, 0.09, 0.045, Span(0.1, 0.4, 0.05)) == 0.25
    assert crossing(4.5, 0.2, 5.0, 0.2, 0.045, grid) is None  # flat: no direction
    assert crossing(4.5, 0.219, 5.0, 0.128, 1e-9, grid) == 7.5  # beyond the range: its end
    space = build_space(families=["quantize"])
    planner = Planner(space, "size", parse_budget("kld<=0.05"))
    head = [s.to_dict() for s in load_recipe("int8-rtn-head").steps]

    def mixed(number, bits, kld, size):
        return {"number": number, "name": f"mixed {bits}", "status": "ok", "fidelity": 16, "objective": size,
                "steps": [{"type": "mixed", "bits_per_weight": bits, "skip": []}], "export": {},
                "quality": {"kld": kld}, "violation": kld / 0.05 - 1}

    results = [{"number": -1, "name": "recipe int8-rtn-head", "status": "ok", "steps": head, "export": {},
                "fidelity": 16, "violation": -0.9, "objective": 132.6, "quality": {"kld": 0.0044}},
               mixed(0, 4.5, 0.219, 75.7), mixed(1, 5.0, 0.128, 83.7),
               {**mixed(2, 5.0, 0.3, 80.0), "steps": [{"type": "mixed", "bits_per_weight": 5.0}]}]  # differs in a choice
    # the trend's move comes first, ahead of the incumbents' turns and of the seeds
    assert planner.next(results, {})[1] == ("move from #1 (mixed 5.0) (over budget): mixed.bits_per_weight: 5.0 -> "
                                            "6.0 (where kld is extrapolated to meet the budget, from #0 at 4.5)")
    assert "extrapolated" not in planner.next(results, {})[1]  # issued once
    # with one point measured there is no trend: the near miss's grid neighbours come first, as before
    planner = Planner(space, "size", parse_budget("kld<=0.05"))
    origins = [planner.next(results[:2], {})[1] for _ in range(2)]
    assert any(o.startswith("move from #0") and o.endswith("4.5 -> 5.0") for o in origins), origins


def test_narrowing_the_space_and_its_errors(tmp_path):
    space = build_space(families=["quantize"], fixes=["steps.quantize=rtn", "steps.rtn.bits=4"])
    assert space.forced["quantize"] == "rtn"
    assert space.option("quantize", "rtn").fixed == {"bits": 4}
    yaml_space = tmp_path / "space.yaml"
    yaml_space.write_text("families: [prune]\nsteps:\n  width: {ffn_keep: [0.5, 0.75]}\n  depth: false\n"
                          "stages: {weight_sparsity: none}\n")
    narrowed = build_space(space_file=yaml_space)
    assert narrowed.option("structure", "width").fields["ffn_keep"] == Choice(0.5, 0.75)
    assert "depth" not in [o.type for o in narrowed.stages["structure"]]
    for kwargs, says in [({"families": ["quantise"]}, "unknown family 'quantise'.*quantize"),
                         ({"fixes": ["steps.rtn.targets=['*']"]}, "not searchable; searchable fields of rtn"),
                         ({"fixes": ["steps.rtm.bits=4"]}, "neither a stage"),
                         ({"fixes": ["steps.quantize=lowrank"]}, "can use none, rtn"),
                         ({"fixes": ["bits"]}, "write steps.STAGE=TYPE"),
                         ({"runtime": "vllm"}, "unknown runtime")]:
        with pytest.raises(ConfigError, match=says):
            build_space(**kwargs)
    yaml_space.write_text("famlies: [prune]\n")
    with pytest.raises(ConfigError, match="unknown key.*'famlies'.*valid keys"):
        build_space(space_file=yaml_space)


def test_auto_finds_a_model_within_budget_and_writes_its_evidence(wide_dir, tmp_path):
    out = tmp_path / "out"
    report = auto(str(wide_dir), ["kld<=0.05"], "decode_tps", out=out, families=["quantize", "prune"],
                  max_trials=8, **{**FAST, "compare": ("default",), "speed_rounds": 3})
    assert {"report.md", "report.html", "trials.jsonl", "search.json", "best"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == len(report["results"]) >= 8 and any(r["name"] == "recipe default" for r in rows)
    # the search refines the reference recipe it is judged against, one move at a time
    assert any(r.get("origin", "").startswith("move from #-1 (recipe default)") for r in rows)
    chosen = next(r for r in rows if r["number"] == report["chosen"])
    assert chosen["final"]["violation"] <= 0 and chosen["final"]["quality"]["kld"] <= 0.05
    # finalists' speed: rounds beside the original, the median per-round ratio times the original's median
    speed, base = chosen["final"]["speed"], report["baseline"]["speed"]
    assert len(speed["rounds"]) == len(base["rounds"]) == 3
    ratios = sorted(own["decode_tps"] / ref["decode_tps"] for own, ref in zip(speed["rounds"], base["rounds"]))
    assert speed["vs_original"]["decode_tps"] == pytest.approx(ratios[1])
    assert speed["decode_tps"] == pytest.approx(ratios[1] * sorted(r["decode_tps"] for r in base["rounds"])[1])
    # best/ is what `leanlm optimize` writes, and its model loads back with the quality it was chosen for
    best = out / "best"
    assert {"model", "recipe.yaml", "report.json", "report.md", "chart.png"} <= {p.name for p in best.iterdir()}
    load_model(best / "model", device="cpu")
    saved = json.loads((best / "report.json").read_text())
    assert saved["result"]["quality"]["kld"] == pytest.approx(chosen["final"]["quality"]["kld"])
    assert "## Families" in (out / "report.md").read_text() and "<svg" in (out / "report.html").read_text()
    assert not (tmp_path / ".out.auto").exists()  # the work directory goes once the search completes
    with pytest.raises(LeanLMError, match="already exists"):
        auto(str(wide_dir), ["kld<=0.05"], out=out, **FAST)


def test_a_budget_nothing_meets_says_so_and_writes_no_best(wide_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LeanLMError, match="no candidate met the budget.*closest"):
        auto(str(wide_dir), ["kld<=1e-12"], out=out, families=["prune"], max_trials=3, **FAST)
    assert (out / "report.md").exists() and not (out / "best").exists()


def test_task_budget_is_held_when_remeasured_and_size_needs_no_benchmark(wide_dir, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"question": f"The keyword that defines a function in Python is {i}",
                                           "choices": [" def", " class", " lambda"], "answer": 0})
                               for i in range(4)))
    report = auto(str(wide_dir), ["task_acc>=0.0", "kld<=0.5"], "size", out=tmp_path / "out", tasks=str(tasks),
                  families=["quantize"], max_trials=2, **FAST)
    chosen = next(r for r in report["results"] if r["number"] == report["chosen"])
    assert "task_accuracy" in chosen["final"]["quality"]
    # a size is read off the files, with no fresh-process benchmark of anyone
    assert set(chosen["final"]["speed"]) == {"disk_bytes"} and set(report["baseline"]["speed"]) == {"disk_bytes"}
    assert chosen["final"]["objective"] == pytest.approx(dir_size(tmp_path / "out" / "best" / "model") / 2**20)
    assert chosen["final"]["objective"] < report["baseline"]["objective"]
    with pytest.raises(ConfigError, match="--tasks"):
        auto(str(wide_dir), ["task_acc>=0.5"], out=tmp_path / "o2", **FAST)


def test_trials_run_in_worker_processes(wide_dir, tmp_path):
    report = auto(str(wide_dir), ["kld<=0.5"], out=tmp_path / "out", families=["quantize"], jobs=2, max_trials=4,
                  **FAST)
    workers = {r["worker"] for r in report["results"] if r.get("status") == "ok"}
    assert len(workers) == 2 and all(str(os.getpid()) not in w for w in workers)


def test_trials_run_as_ray_tasks_on_a_local_cluster_with_two_workers(wide_dir, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is in the test extra")
    try:
        report = auto(str(wide_dir), ["kld<=0.5"], out=tmp_path / "out", families=["quantize"], ray="local", jobs=2,
                      max_trials=4, **FAST)
    finally:
        ray.shutdown()
    workers = {r["worker"] for r in report["results"] if r.get("status") == "ok"}
    assert len(workers) == 2


def test_bad_input_is_refused_before_any_work(wide_dir, tmp_path, capsys):
    cases = [(["--objective", "latency"], "unknown objective 'latency'"),
             (["--objective", "cost"], "--price-per-hour"),
             (["--time-limit", "30s"], "too short.*at least 60s"),
             (["--time-limit", "soon"], "90s, 45m, 1.5h"),
             (["--budget", "kld<0.05x"], "METRIC OP NUMBER"),
             (["--families", "quantize,healing"], "unknown family 'healing'"),
             (["--fix", "steps.gptq.block_size=64"], "not searchable"),
             (["--bench", "repeat=3"], "unknown key 'repeat'.*repeats")]
    for extra, says in cases:
        args = ["auto", str(wide_dir), "--budget", "kld<=0.05", "--out", str(tmp_path / "x"), *extra]
        assert main(args) != 0
        assert __import__("re").search(says, capsys.readouterr().err), (extra, says)
    assert not (tmp_path / "x").exists()


def test_llama_cpp_runtime_that_is_not_installed_names_the_extra(wide_dir, tmp_path, monkeypatch):
    import leanlm.runtime.llamacpp as lc

    def missing():
        raise LeanLMError("running GGUF files in llama.cpp needs llama-cpp-python: pip install 'leanlm[llamacpp]'")
    monkeypatch.setattr(lc, "require_llama_cpp", missing)
    with pytest.raises(ConfigError, match=r"leanlm\[llamacpp\]"):
        auto(str(wide_dir), ["kld<=0.15"], runtime="llama.cpp", out=tmp_path / "out", **FAST)


def test_llama_cpp_search_measures_gguf_exports_against_its_own_types(wide_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from leanlm.runtime.llamacpp import check_llama_cpp_runs

    try:
        check_llama_cpp_runs()
    except LeanLMError as err:
        pytest.skip(str(err))
    report = auto(str(wide_dir), ["kld<=0.15"], runtime="llama.cpp", out=tmp_path / "out",
                  families=["quantize"], max_trials=2, **FAST)
    names = {r["name"] for r in report["results"]}
    assert {"llama.cpp Q8_0", "llama.cpp Q4_0", "llama.cpp Q4_K"} <= names
    assert (tmp_path / "out" / "best" / "model.gguf").is_file()


def _search_process(wide_dir, out, *extra):
    cmd = [sys.executable, "-c", "from leanlm.cli import main; raise SystemExit(main())", "auto", str(wide_dir), "--budget", "kld<=0.5", "--out", str(out),
           "--families", "quantize,prune", "--calibration-samples", "4", "--finalists", "1", "--time-limit", "10m",
           "--max-trials", "6", "--search-windows", "4", "--low-windows", "2", "--bench", "repeats=1",
           "--bench", "prompt_tokens=64", "--bench", "new_tokens=8", "--bench", "batch=2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_search_stopped_by_sigterm_resumes_where_it_stopped(wide_dir, tmp_path):
    out = tmp_path / "out"
    results = tmp_path / ".out.auto" / "results.jsonl"
    proc = _search_process(wide_dir, out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "--resume" in err, err[-2000:]
    done_before = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(done_before) >= 3 and not out.exists()
    # other settings are refused, naming what changed
    changed = _search_process(wide_dir, out, "--resume", "--seed", "3")
    assert changed.wait(120) != 0 and "seed" in changed.communicate()[1]
    resumed = _search_process(wide_dir, out, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    before = {json.dumps(r["steps"], sort_keys=True) for r in done_before}
    assert before <= {json.dumps(r["steps"], sort_keys=True) for r in rows}  # nothing finished was lost
    assert len(rows) >= len(done_before)


def test_the_html_report_renders_in_headless_chromium(wide_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    out = tmp_path / "out"
    auto(str(wide_dir), ["kld<=0.05"], out=out, families=["quantize"], max_trials=4, **FAST)
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1600",
                    f"--screenshot={shot}", (out / "report.html").as_uri()],
                   check=True, timeout=120, capture_output=True)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert image.size == (1400, 1600) and len(colours) > 20  # drawn points, text and lines, not a blank page
    # the plotted points are there: one SVG mark per measured trial
    page = (out / "report.html").read_text()
    assert page.count("<title>#") >= 2
    Path(os.environ.get("LEANLM_SCREENSHOT_DIR", tmp_path)).joinpath("auto-report.png").write_bytes(shot.read_bytes())


def test_a_tie_on_the_objective_goes_to_the_better_quality():
    from leanlm.auto.finalists import _preferred

    same_size_better = {"objective": 213.4, "violation": -0.98}
    same_size_worse = {"objective": 213.4, "violation": -0.85}
    assert _preferred("size", same_size_better, same_size_worse) and not _preferred("size", same_size_worse, same_size_better)
    assert _preferred("size", {"objective": 200.0, "violation": -0.1}, same_size_better)  # the objective comes first
    assert _preferred("decode_tps", {"objective": 40.0, "violation": 0.0}, {"objective": 39.0, "violation": -0.9})
