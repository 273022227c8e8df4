import pytest
import yaml

from leanlm.errors import ConfigError
from leanlm.measure.bench import BenchConfig
from leanlm.pipeline.recipe import (
    dump_recipe,
    load_recipe,
    parse_recipe,
    shipped_recipes,
)
from leanlm.pipeline.scan import ScanConfig
from leanlm.prune.depth import DepthConfig
from leanlm.prune.magnitude import MagnitudeConfig
from leanlm.prune.sparsegpt import SparseGPTConfig
from leanlm.prune.wanda import WandaConfig
from leanlm.prune.width import WidthConfig
from leanlm.quantize.gptq import GPTQConfig


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.steps and recipe.description


def test_default_recipe_is_what_bare_optimize_runs():
    assert load_recipe(None).name == "default"


def test_unknown_step_type_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"steps\[0\]: unknown step type 'gptqq' \(did you mean 'gptq'\?\); step types: act_sparsity, awq, cast, depth, distill, federated, finetune, gptq, heads, lowrank, magnitude, mixed, moefy, rtn, smoothquant, sparse24, sparsegpt, wanda, width"):
        parse_recipe({"steps": [{"type": "gptqq"}]})


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'group' \(did you mean 'group_size'\?\); valid keys: batch_size, bits, calibration_dtype, group_size, scale_search, search_max, .*, targets"):
        parse_recipe({"steps": [{"type": "rtn", "group": 64}]})


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' \(did you mean 'steps'\?\); valid keys: bench, calibration, description, eval, name, steps"):
        parse_recipe({"stepz": []})


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match=r"bits: 3 is not one of 8, 4"):
        parse_recipe({"steps": [{"type": "rtn", "bits": 3}]})
    with pytest.raises(ConfigError, match=r"calibration.samples: expected int, got 'many'"):
        parse_recipe({"calibration": {"samples": "many"}})
    with pytest.raises(ConfigError, match=r"symmetric: expected bool"):
        parse_recipe({"steps": [{"type": "rtn", "symmetric": "yes"}]})
    with pytest.raises(ConfigError, match=r"calibration needs samples >= 1"):
        parse_recipe({"calibration": {"samples": 0}})


def test_a_recipe_given_as_a_mapping_is_checked_like_yaml():
    assert load_recipe({"steps": [{"type": "rtn", "bits": 8}]}).steps[0].bits == 8
    with pytest.raises(ConfigError, match=r"recipe: unknown key 'stepz' \(did you mean 'steps'\?\)"):
        load_recipe({"stepz": []})
    with pytest.raises(ConfigError, match="a recipe is a YAML path, a shipped recipe's name or a mapping, got int"):
        load_recipe(8)


def test_overrides_change_what_the_file_says_before_it_is_checked(tmp_path):
    recipe = load_recipe("sparsegpt-50", ["steps.0.sparsity=null", "steps.0.pattern=4:8", "calibration.samples=16"])
    assert recipe.steps[0].pattern == "4:8" and recipe.steps[0].sparsity == 0.5 and recipe.calibration.samples == 16
    assert recipe.name == "sparsegpt-50 (steps.0.sparsity=null, steps.0.pattern=4:8, calibration.samples=16)"
    assert load_recipe({"steps": [{"type": "rtn"}]}, ["name=mine"]).name == "mine"
    for override, message in [
        ("steps.0.sparsity", r"write KEY=VALUE"),
        ("steps.1.sparsity=0.5", r"steps has 1 entries, numbered 0 to 0; got '1'"),
        ("steps.0.sparsity=[0.5", r"the value is not valid YAML"),
        ("name.first=x", r"name is a value, not a section"),
        ("steps.0.pattern=1:4", r"pattern 1:4 fixes the sparsity at 0.75, but sparsity is 0.5; .*sparsity: null.*"
                                r"\(with the overrides steps.0.pattern=1:4\)"),
        ("calibraton.samples=8", r"unknown key 'calibraton' \(did you mean 'calibration'\?\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe("sparsegpt-50", [override])


def test_an_n_m_pattern_in_a_recipe_file_is_not_read_as_a_base_60_number(tmp_path):
    path = tmp_path / "nm.yaml"
    path.write_text("steps:\n  - type: sparsegpt\n    pattern: 2:4\n    damp: 1.5e-2\n")
    step = load_recipe(path).steps[0]
    assert step.pattern == "2:4" and step.sparsity == 0.5 and step.damp == 0.015


def test_unknown_recipe_name_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"neither a file nor a shipped recipe; shipped: .*default.*int8-rtn"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - type: rtn\n   bits: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:4: invalid YAML"):
        load_recipe(bad)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe("int8-rtn")
    dump_recipe(recipe, tmp_path / "r.yaml")
    data = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert data["versions"]["torch"] and data["steps"][0]["group_size"] is None
    assert load_recipe(tmp_path / "r.yaml").to_dict() == recipe.to_dict()


def test_other_text_benchmark_checks_its_recipe_overrides_before_loading():
    """`benchmarks/bench_other_text.py RECIPE:key=value`: bad specs fail in seconds, with the valid keys."""
    import subprocess
    import sys

    def run(spec: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "benchmarks/bench_other_text.py", "--recipes", "wanda-50", spec,
                               "--out", "/dev/null"], capture_output=True, text=True, timeout=120)

    done = run("wanda-50:refitt=true")
    assert done.returncode == 1 and "unknown key 'refitt' (did you mean 'refit'?); valid keys: batch_size" in done.stderr
    assert "Traceback" not in done.stderr
    assert "sparsity must be in [0, 1), got 1.5" in run("sparsegpt-50:sparsity=1.5").stderr
    assert "write overrides as key=value" in run("wanda-50:refit").stderr


@pytest.mark.parametrize("cls, options, message", [
    (MagnitudeConfig, {"sparsity": 1.5}, r"sparsity must be in \[0, 1\)"),
    (WandaConfig, {"pattern": "2:4", "sparsity": 0.7}, "pattern 2:4 fixes the sparsity at 0.5, but sparsity is 0.7"),
    (GPTQConfig, {"batch_size": 0}, "batch_size must be at least 1"),
    (WidthConfig, {"damp": 0.0}, "damp .* must be > 0"),
    (BenchConfig, {"repeats": 0}, "at least 1 .*repeats=0"),
    (MagnitudeConfig, {"sparsity": "0.5"}, r"MagnitudeConfig.sparsity: '0.5' is not a valid float or null"),
    (DepthConfig, {"blocks": 1.5}, r"DepthConfig.blocks: expected int, got 1.5"),
    (GPTQConfig, {"skip": "lm_head"}, r"GPTQConfig.skip: expected a list, got 'lm_head'"),
    (ScanConfig, {"skip": [3]}, r"ScanConfig.skip\[0\]: expected str, got 3"),
    (GPTQConfig, {"batch_size": "8"}, r"GPTQConfig.batch_size: expected int, got '8'"),
    (GPTQConfig, {"damp": "x"}, r"GPTQConfig.damp: expected float, got 'x'"),
])
def test_configs_built_in_python_are_checked_like_yaml(cls, options, message):
    with pytest.raises(ConfigError, match=message):
        cls(**options)


def test_python_configs_take_what_yaml_takes_and_python_numbers_and_paths():
    from pathlib import Path

    import numpy as np

    from leanlm.distill import DistillConfig

    assert MagnitudeConfig(sparsity=0).sparsity == 0.0 and isinstance(MagnitudeConfig(sparsity=0).sparsity, float)
    assert ScanConfig(skip=["lm_head"]).skip == ("lm_head",)
    gptq = GPTQConfig(group_size=np.int64(64), damp=np.float32(0.02), skip=("lm_head",))
    assert type(gptq.group_size) is int and type(gptq.damp) is float and gptq.skip == ["lm_head"]
    assert type(GPTQConfig(bits=np.int64(8)).bits) is int  # a Literal keeps its own plain value
    assert DistillConfig(teacher=Path("/models/teacher")).teacher == "/models/teacher"
    with pytest.raises(ConfigError, match="GPTQConfig.group_size: True is not a valid int or null"):
        GPTQConfig(group_size=True)


def test_a_pattern_sets_the_sparsity_it_implies_and_round_trips():
    assert SparseGPTConfig().sparsity == 0.5 and SparseGPTConfig(pattern="1:4").sparsity == 0.75
    step = parse_recipe({"steps": [{"type": "sparsegpt", "pattern": "1:4"}]}).steps[0]
    again = parse_recipe({"steps": [step.to_dict()]}).steps[0]  # the resolved recipe loads back
    assert again.sparsity == 0.75 and again.pattern == "1:4"
