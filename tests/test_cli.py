import json
import subprocess
import sys

import pytest
import yaml

from leanlm.cli import COMMANDS, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "leanlm", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_every_command(command):
    proc = run(command, "--help")
    assert proc.returncode == 0 and "usage: leanlm " + command in proc.stdout


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "leanlm eval: error: model 'no-such-model' not found" in err and "Traceback" not in err
    assert main(["optimize", "--recipe", "nope"]) == 2
    assert "shipped:" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert main(["bench", "--compile", "--warmup", "0"]) == 2
    assert "--compile needs at least one warm-up" in capsys.readouterr().err


def test_optimize_set_changes_recipe_options_and_checks_them(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    common = ["optimize", str(tiny_dir), "--recipe", "int8-rtn", "--out", str(out), "--no-bench", "--device", "cpu"]
    assert main([*common, "--set", "steps.0.bits=4", "--set", "steps.0.group_size=32",
                 "--set", "calibration.samples=4"]) == 0
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["steps"][0]["bits"] == 4 and resolved["steps"][0]["group_size"] == 32
    assert resolved["calibration"]["samples"] == 4 and "steps.0.bits=4" in resolved["name"]
    capsys.readouterr()
    assert main([*common, "--overwrite", "--set", "steps.2.bits=4"]) == 2
    assert "override 'steps.2.bits=4': steps has 1 entries, numbered 0 to 0" in capsys.readouterr().err
    assert main([*common, "--overwrite", "--set", "steps.0.bitz=4"]) == 2
    assert "unknown key 'bitz' (did you mean 'bits'?)" in capsys.readouterr().err


def test_recipes_shows_one_recipe_resolved_with_its_overrides(capsys):
    assert main(["recipes", "sparsegpt-2of4", "--set", "calibration.samples=16"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["calibration"]["samples"] == 16 and shown["steps"][0]["pattern"] == "2:4"
    assert shown["steps"][0]["sparsity"] == 0.5 and shown["steps"][0]["refit"] is True
    assert main(["recipes", "--set", "calibration.samples=16"]) == 2
    assert "--set changes a recipe: name it" in capsys.readouterr().err


def test_eval_and_bench_json(tiny_dir, tmp_path, capsys):
    from leanlm.data.corpus import default_corpus

    text = tmp_path / "t.txt"
    text.write_text(default_corpus().eval[:3000])
    assert main(["eval", str(tiny_dir), "--reference", str(tiny_dir), "--data", str(text), "--window", "64",
                 "--no-generate", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kld"] < 1e-5 and out["top1"] == 1.0 and out["tokens"] > 0
    assert main(["bench", str(tiny_dir), "--json", "--prompt-tokens", "8", "--new-tokens", "2", "--batch", "2",
                 "--repeats", "1", "--decode-prompt-tokens", "4"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"prefill_tps", "decode_tps", "decode_tps_batch", "ttft_s",
                                                          "peak_mem_bytes", "disk_bytes", "params"}


def test_report_command(tmp_path, tiny_dir, capsys):
    from leanlm.data.corpus import default_corpus
    from leanlm.pipeline.optimize import optimize
    from tests.test_optimize import _recipe

    text = tmp_path / "t.txt"
    text.write_text(default_corpus().eval[:4000])
    optimize(str(tiny_dir), _recipe({"type": "rtn"}), out=tmp_path / "o", device="cpu", eval_data=str(text), bench=False)
    (tmp_path / "o" / "chart.png").unlink()
    assert main(["report", str(tmp_path / "o"), "--render"]) == 0
    assert "perplexity" in capsys.readouterr().out and (tmp_path / "o" / "chart.png").is_file()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["optimize", "--out", str(blocker / "out"), "--no-bench"]) == 2
    assert f"{blocker} is a file, not a directory" in capsys.readouterr().err
    assert main(["export", "smollm2-135m", "--format", "hf", "--out", "/proc/leanlm-out"]) == 2
    assert "/proc does not accept new files" in capsys.readouterr().err


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--threads", "0"])
    assert "--threads: must be at least 1, got 0" in capsys.readouterr().err
