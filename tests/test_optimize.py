import json
import os
import subprocess
import sys

import pytest

from leanlm.errors import ConfigError, OutputExistsError
from leanlm.models.load import load_model
from leanlm.pipeline import optimize as optimize_mod
from leanlm.pipeline.recipe import parse_recipe

FAST = {"eval": {"window": 64, "prompts": ["def f"], "max_new_tokens": 4},
        "bench": {"prompt_tokens": 16, "decode_prompt_tokens": 4, "new_tokens": 3, "batch": 2, "repeats": 1, "warmup": 0}}


def _recipe(*steps):
    return parse_recipe({"name": "test", **FAST, "steps": list(steps)})


@pytest.fixture
def eval_text(tmp_path):
    from leanlm.data.corpus import default_corpus

    f = tmp_path / "heldout.txt"
    f.write_text(default_corpus().eval[:6_000])
    return f


def test_optimize_writes_model_report_and_chart(tmp_path, tiny_dir, eval_text):
    out = tmp_path / "out"
    report = optimize_mod.optimize(str(tiny_dir), _recipe({"type": "rtn"}), out=out, device="cpu", eval_data=str(eval_text))
    for name in ("model/leanlm.json", "recipe.yaml", "report.json", "report.md", "chart.png"):
        assert (out / name).is_file(), name
    base, res = report["baseline"], report["result"]
    assert base["quality"]["kld"] == 0 and 0 <= res["quality"]["kld"] < 0.05 and res["quality"]["top1"] > 0.8
    assert res["speed"]["disk_bytes"] < base["speed"]["disk_bytes"]
    assert report["steps"][0]["stats"]["layers_quantized"] == 14
    assert "| perplexity |" in (out / "report.md").read_text()
    load_model(out / "model", device="cpu")  # the artifact loads back


def test_cast_result_is_plain_hf(tmp_path, tiny_dir, eval_text):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    optimize_mod.optimize(str(tiny_dir), _recipe({"type": "cast", "dtype": "bfloat16"}), out=out, device="cpu",
                          eval_data=str(eval_text), bench=False)
    assert AutoModelForCausalLM.from_pretrained(out / "model").dtype == torch.bfloat16


def test_existing_output_is_refused_before_any_work(tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(optimize_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        optimize_mod.optimize(str(tiny_dir), _recipe(), out=out)
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_optimize_leaves_nothing(tmp_path, tiny_dir, eval_text, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(optimize_mod, "save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        optimize_mod.optimize(str(tiny_dir), _recipe({"type": "rtn"}), out=tmp_path / "out", device="cpu",
                              eval_data=str(eval_text), bench=False)
    assert list(tmp_path.iterdir()) == [eval_text]


def test_overwrite_replaces(tmp_path, tiny_dir, eval_text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    optimize_mod.optimize(str(tiny_dir), _recipe({"type": "cast"}), out=out, overwrite=True, device="cpu",
                          eval_data=str(eval_text), bench=False)
    assert not (out / "old.txt").exists() and json.loads((out / "report.json").read_text())["recipe"] == "test"


def test_sigterm_mid_run_leaves_no_partial_output(tmp_path, tiny_dir, eval_text):
    import signal
    import time

    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({"name": "t", **FAST, "steps": [{"type": "rtn"}]}))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "leanlm", "optimize", str(tiny_dir), "--recipe", str(recipe),
                             "--eval-data", str(eval_text), "--out", str(work / "out"), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(work.glob(".out.partial-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "optimize finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "no partial output" in err
    assert list(work.iterdir()) == []


def test_calibrated_steps_chain_and_their_tables_reach_the_report(tmp_path, tiny_dir, eval_text):
    """Prune with SparseGPT, then quantize with AWQ, in one recipe; both steps' details are reported."""
    recipe = parse_recipe({"name": "chain", **FAST, "calibration": {"samples": 4, "length": 64},
                           "steps": [{"type": "sparsegpt", "sparsity": 0.3, "batch_size": 2},
                                     {"type": "awq", "group_size": 32, "search_samples": 2, "batch_size": 2,
                                      "grid": 4}]})
    out = tmp_path / "out"
    report = optimize_mod.optimize(str(tiny_dir), recipe, out=out, device="cpu", eval_data=str(eval_text), bench=False)
    prune, awq = report["steps"]
    assert prune["stats"]["achieved_sparsity"] >= 0.295 and awq["stats"]["scale_pairs"] == 6
    md = (out / "report.md").read_text()
    assert "## awq: scale pairs" in md and "post_attention_layernorm" in md
    assert "achieved_sparsity" in md


def test_finetune_prune_distill_quantize_chain(tmp_path, tiny_dir, eval_text):
    """The issue's chain in one recipe: every stage's numbers land in the report."""
    train = {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "seq_len": 64, "lr": 1e-3, "warmup_steps": 1,
             "eval_every": 2, "patience": 0}
    recipe = parse_recipe({"name": "chain", **FAST, "calibration": {"samples": 4, "length": 64}, "steps": [
        {"type": "finetune", "method": "lora", "rank": 4, "train": train},
        {"type": "depth", "blocks": 1, "keep_last": False, "tokens": 128},
        {"type": "distill", "loss": "jsd", "train": train},
        {"type": "rtn", "bits": 8}]})
    out = tmp_path / "out"
    report = optimize_mod.optimize(str(tiny_dir), recipe, out=out, device="cpu", eval_data=str(eval_text), bench=False)
    stats = [s["stats"] for s in report["steps"]]
    assert stats[0]["method"] == "lora" and stats[0]["steps"] == 4
    assert stats[1]["blocks_after"] == 1 and stats[2]["teacher"] == str(tiny_dir)
    assert stats[3]["layers_quantized"] == 7
    assert load_model(out / "model", device="cpu").model.config.num_hidden_layers == 1
    assert not (tmp_path / ".out.work").exists()  # checkpoints are cleared once the run completes


def test_activation_sparsity_through_optimize(tmp_path, tiny_dir, eval_text):
    recipe = parse_recipe({"name": "act", **FAST, "calibration": {"samples": 4, "length": 64},
                           "steps": [{"type": "act_sparsity", "sparsity": 0.3, "rows": 128}]})
    report = optimize_mod.optimize(str(tiny_dir), recipe, out=tmp_path / "out", device="cpu", eval_data=str(eval_text))
    assert report["steps"][0]["stats"]["layers_sparsified"] == 14
    assert 0 < report["result"]["quality"]["kld"] and "act_sparsity" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("step", [{"type": "width", "ffn_keep": 0.5, "multiple_of": 16},
                                  {"type": "moefy", "experts": 4, "shared": 1, "top_k": 2, "rows": 128},
                                  {"type": "wanda", "sparsity": 0.5, "owl_lambda": 0.05}])
def test_structured_and_conditional_steps_report(tmp_path, tiny_dir, eval_text, step):
    recipe = parse_recipe({"name": "s", **FAST, "calibration": {"samples": 4, "length": 64}, "steps": [step]})
    report = optimize_mod.optimize(str(tiny_dir), recipe, out=tmp_path / "out", device="cpu",
                                   eval_data=str(eval_text), bench=False)
    assert report["result"]["quality"]["kld"] > 0
    assert f"| {step['type']} |" in (tmp_path / "out" / "report.md").read_text()
    load_model(tmp_path / "out" / "model", device="cpu")


def test_partial_outputs_of_dead_processes_are_removed(tmp_path, caplog):
    from leanlm.core.paths import atomic_dir

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.partial-{done.stdout.strip()}-abc"
    alive = tmp_path / f".out.partial-{os.getpid()}-def"  # another run still writing
    unknown = tmp_path / ".out.partial-xyz"
    for d in (dead, alive, unknown):
        (d / "model").mkdir(parents=True)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not dead.exists() and alive.exists() and unknown.exists() and (tmp_path / "out" / "f").exists()
    assert "left by process" in caplog.text


@pytest.mark.parametrize("steps, message", [
    ([{"type": "depth", "blocks": 2}], r"steps\[0\] \(depth\): cannot remove 2 of the model's 2 blocks"),
    ([{"type": "wanda", "pattern": "2:7"}], r"steps\[0\] \(wanda\): pattern 2:7 needs input dimensions divisible by 7"),
    ([{"type": "cast"}, {"type": "rtn", "group_size": 48}], r"steps\[1\] \(rtn\): group size 48 does not divide"),
    ([{"type": "moefy", "experts": 6, "shared": 0, "top_k": 2}], r"does not split into 6 equal experts; expert counts that do: 2, 4"),
    ([{"type": "heads", "kv_groups": 3}], r"steps\[0\] \(heads\): the model has 2 KV groups"),
    ([{"type": "depth", "blocks": 1, "keep_last": False}, {"type": "distill", "teacher": "/no/such/teacher"}],
     r"steps\[1\] \(distill\): model '/no/such/teacher' not found"),
    ([{"type": "finetune", "data": "/no/such/data.jsonl"}], r"steps\[0\] \(finetune\): data path /no/such/data.jsonl"),
    ([{"type": "moefy", "experts": 8, "shared": 2, "top_k": 2}, {"type": "rtn", "bits": 8}],
     r"steps\[1\] \(rtn\): cannot quantize the weights inside 2 MoEFFN module\(s\) \(model.layers.0.mlp, ...\)"),
    ([{"type": "moefy", "experts": 8, "shared": 2, "top_k": 2}, {"type": "wanda"}],
     r"steps\[1\] \(wanda\): cannot prune the weights inside .*add '\*\.mlp' to 'skip'"),
    ([{"type": "moefy", "experts": 8, "shared": 2, "top_k": 2}, {"type": "finetune"}],
     r"steps\[1\] \(finetune\): cannot train LoRA on the weights inside 2 MoEFFN .*or use method: full"),
])
def test_steps_are_checked_against_the_model_before_the_baseline(tmp_path, tiny_dir, eval_text, monkeypatch, steps,
                                                                 message):
    from leanlm.errors import LeanLMError

    monkeypatch.setattr(optimize_mod, "prepare_reference", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(LeanLMError, match=message):
        optimize_mod.optimize(str(tiny_dir), _recipe(*steps), out=tmp_path / "out", device="cpu",
                              eval_data=str(eval_text), bench=False)
    assert not (tmp_path / "out").exists()


def test_steps_after_a_reshaping_step_are_checked_when_they_run(tmp_path, tiny_dir, eval_text):
    from leanlm.core.step import check_steps

    model = load_model(tiny_dir, device="cpu").model
    second = {"type": "depth", "blocks": 1}
    with pytest.raises(ConfigError, match="cannot remove 1 of the model's 2 blocks"):
        check_steps(model, _recipe(second).steps)
    # after the first step removes a block, the second sees another model than the one loaded: checked as it runs
    recipe = _recipe({"type": "depth", "blocks": 1, "keep_last": False}, second)
    check_steps(model, recipe.steps)
    with pytest.raises(ConfigError, match=r"steps\[1\] \(depth\): cannot remove 1 of the model's 1 blocks"):
        optimize_mod.optimize(str(tiny_dir), recipe, out=tmp_path / "out", device="cpu", eval_data=str(eval_text),
                              bench=False)
    assert not (tmp_path / "out").exists()


def test_per_linear_steps_after_moefy_pass_the_check_when_they_leave_out_the_experts(tiny_dir):
    from leanlm.core.step import check_steps

    model = load_model(tiny_dir, device="cpu").model
    moefy = {"type": "moefy", "experts": 8, "shared": 2, "top_k": 2}
    check_steps(model, _recipe(moefy, {"type": "rtn", "bits": 8, "skip": ["lm_head", "*.mlp"]}).steps)
    check_steps(model, _recipe(moefy, {"type": "rtn", "bits": 8, "targets": ["*proj"]}).steps)
    check_steps(model, _recipe(moefy, {"type": "finetune", "targets": ["*.self_attn.*"]}).steps)
    check_steps(model, _recipe(moefy, {"type": "finetune", "method": "full"}).steps)


def test_a_recipe_without_steps_is_refused_before_any_work(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(optimize_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(ConfigError, match="has no steps, so there is nothing to optimize"):
        optimize_mod.optimize(str(tiny_dir), _recipe(), out=tmp_path / "out")
