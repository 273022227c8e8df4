"""Recipes: YAML files (or Python objects) listing the steps `leanlm optimize` applies.

A recipe is a function's arguments written down: every key is typed and checked, defaults are
filled in, and the resolved recipe (with library versions) is saved beside every output.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from leanlm.core.bench import BenchConfig
from leanlm.core.evaluate import DEFAULT_PROMPTS
from leanlm.errors import ConfigError
from leanlm.core.config import Validated, parse_config, to_dict
from leanlm.pipeline.steps import StepConfig, parse_step

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


def load_recipe(source: str | Path | dict | None = None) -> Recipe:
    """A recipe from a YAML path, a shipped recipe by name (`int8-rtn`) or a mapping as the YAML would
    hold; None gives the default."""
    source = DEFAULT_RECIPE if source is None else source
    if isinstance(source, dict):
        return parse_recipe(source, "recipe")
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"a recipe is a YAML path, a shipped recipe's name or a mapping, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.is_file():
        shipped = shipped_recipes()
        if str(source) not in shipped:
            raise ConfigError(f"recipe {str(source)!r} is neither a file nor a shipped recipe; shipped: {', '.join(sorted(shipped))}")
        path = shipped[str(source)]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from err
    return parse_recipe(data, str(path))


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    import leanlm

    return {"leanlm": leanlm.__version__, "torch": str(torch.__version__), "transformers": transformers.__version__,
            "python": platform.python_version()}


def dump_recipe(recipe: Recipe, path: Path) -> None:
    data = {**recipe.to_dict(), "versions": library_versions()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
