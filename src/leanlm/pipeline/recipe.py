"""Recipes: YAML files (or Python objects) listing the steps `leanlm optimize` applies.

A recipe is a function's arguments written down: every key is typed and checked, defaults are
filled in, and the resolved recipe (with library versions) is saved beside every output.
"""

from __future__ import annotations

import copy
import os
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from leanlm.core.config import Validated, parse_config, to_dict
from leanlm.core.paths import leanlm_version
from leanlm.core.step import StepConfig, parse_step
from leanlm.errors import ConfigError
from leanlm.measure.bench import BenchConfig
from leanlm.measure.evaluate import DEFAULT_PROMPTS

DEFAULT_RECIPE = "default"


@dataclass
class CalibrationConfig(Validated):
    samples: int = 128
    length: int = 512
    seed: int = 0

    def validate(self) -> None:
        if self.samples < 1 or self.length < 2:
            raise ConfigError(f"calibration needs samples >= 1 and length >= 2, got {self.samples} x {self.length}")


@dataclass
class EvalConfig(Validated):
    window: int = 512
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 32
    tasks: str | None = None

    def validate(self) -> None:
        if self.window < 2:
            raise ConfigError(f"window must be at least 2 tokens, got {self.window}")


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    steps: list[StepConfig] = field(default_factory=list)

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)

    def to_dict(self) -> dict:
        out = {k: to_dict(getattr(self, k)) for k in ("name", "description", "calibration", "eval", "bench")}
        out["steps"] = [s.to_dict() for s in self.steps]
        return out


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a recipe is a mapping with keys like 'name' and 'steps'")
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise ConfigError(f"{where}.steps: expected a list of steps")
    # "versions" is what dump_recipe records; a saved recipe loads back as it was run.
    recipe = parse_config(Recipe, {k: v for k, v in data.items() if k != "steps"}, where, ignore=("versions",))
    recipe.steps = [parse_step(s, f"{where}.steps[{i}]") for i, s in enumerate(steps)]
    return recipe


def shipped_recipes() -> dict[str, Path]:
    root = resources.files("leanlm") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_recipe(source: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe from a YAML path, a shipped recipe by name (`int8-rtn`) or a mapping as the YAML would
    hold; None gives the default. `overrides` are `KEY=VALUE` assignments (`steps.0.sparsity=0.6`,
    `calibration.samples=32`) applied to what the file says before it is checked."""
    source = DEFAULT_RECIPE if source is None else source
    if isinstance(source, dict):
        data, where = copy.deepcopy(source), "recipe"
    elif isinstance(source, (str, os.PathLike)):
        data, where = read_recipe(source)
    else:
        raise ConfigError(f"a recipe is a YAML path, a shipped recipe's name or a mapping, got {type(source).__name__}")
    if not overrides:
        return parse_recipe(data, where)
    data = apply_overrides(data, overrides)
    if not any(o.partition("=")[0].strip() == "name" for o in overrides):
        data["name"] = f"{data.get('name', 'custom')} ({', '.join(overrides)})"  # reports say what ran
    try:
        return parse_recipe(data, where)
    except ConfigError as err:
        raise ConfigError(f"{err} (with the overrides {', '.join(overrides)})") from err


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `2:4` as the base-60 integer 124; in a recipe it is an N:M pattern, so a number
    written with colons stays the text it was."""

    def construct_yaml_int(self, node):
        return node.value if ":" in node.value else super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        return node.value if ":" in node.value else super().construct_yaml_float(node)


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", RecipeLoader.construct_yaml_float)


def read_recipe(source: str | os.PathLike) -> tuple[Any, str]:
    """The YAML data of a recipe file or shipped recipe, and the path it came from."""
    path = Path(source).expanduser()
    if not path.is_file():
        shipped = shipped_recipes()
        if str(source) not in shipped:
            raise ConfigError(f"recipe {str(source)!r} is neither a file nor a shipped recipe; shipped: {', '.join(sorted(shipped))}")
        path = shipped[str(source)]
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from err
    return data, str(path)


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...]) -> dict:
    """`data` with each `KEY=VALUE` set: KEY a dotted path (a step by its index: steps.1.bits), VALUE read as YAML."""
    if not isinstance(data, dict):
        raise ConfigError("a recipe is a mapping with keys like 'name' and 'steps'")
    for text in overrides:
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {text!r}: write KEY=VALUE, e.g. steps.0.sparsity=0.6 or calibration.samples=32")
        try:
            parsed = yaml.load(value, RecipeLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from err
        _set_path(data, key.strip().split("."), parsed, text)
    return data


def _set_path(node: Any, keys: list[str], value: Any, text: str) -> None:
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth]) or "the recipe"
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {text!r}: {where} has {len(node)} entries, numbered 0 to {len(node) - 1}; "
                                  f"got {key!r}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {where} is a value, not a section with keys")
        if depth == len(keys) - 1:
            node[key] = value  # an unknown key is reported, with the valid ones, when the recipe is checked
            return
        if isinstance(node, dict) and key not in node:
            node[key] = {} if key != "steps" else []
        node = node[key]


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"leanlm": leanlm_version(), "torch": str(torch.__version__), "transformers": transformers.__version__,
            "python": platform.python_version()}


def dump_recipe(recipe: Recipe, path: Path) -> None:
    data = {**recipe.to_dict(), "versions": library_versions()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
