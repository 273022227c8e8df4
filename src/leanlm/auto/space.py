"""The search space, read off the step types (core.search): each stage of a searched recipe is `none` or
one step type of that stage, with that type's searchable fields. Nothing here names a step type, so one
added later joins the search by declaring `stage` and `search` on its config.

Narrowing: `families` keeps the step types of some technique packages; `--fix` pins a stage's type
(`steps.structure=none`, `steps.quantize=rtn`) or a field (`steps.rtn.bits=4`, or `steps.quantize.bits=4`
for every quantize-stage type that has `bits`); a YAML file does both, and can narrow ranges.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leanlm.core import catalog
from leanlm.core.config import check_type
from leanlm.core.registry import step_type
from leanlm.core.search import REPAIRS, STAGES, Choice, Range, Span, field_type, search_fields, set_dotted
from leanlm.errors import ConfigError

NONE = "none"
RUNTIMES = ("leanlm", "llama.cpp")
# llama.cpp's own weight formats, tried as the export stage of a llama.cpp search (leanlm's int8/int4
# codes are written as Q8_0/Q4_0/Q4_1 whatever is chosen here; `auto` keeps them)
GGUF_TYPES = Choice("auto", "q8_0", "q6_k", "q4_k", "q4_0")


def family_of(name: str) -> str:
    """The technique package a step type lives in (leanlm.quantize.gptq -> quantize)."""
    return catalog.STEPS[name].split(".")[1]


@dataclass
class Option:
    """One step type a stage may use: its searchable fields (narrowed) and its fixed values."""
    type: str
    fields: dict[str, Range]
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchSpace:
    runtime: str
    stages: dict[str, list[Option]]  # stage -> its options, in catalog order
    forced: dict[str, str] = field(default_factory=dict)  # stage -> the one type (or none) it must use
    export: Range | None = None  # llama.cpp: the GGUF type of layers leanlm left in float

    def choices(self, stage: str) -> list[str]:
        if stage in self.forced:
            return [self.forced[stage]]
        return [NONE, *(o.type for o in self.stages.get(stage, []))]

    def option(self, stage: str, name: str) -> Option:
        return next(o for o in self.stages[stage] if o.type == name)

    def suggest(self, trial) -> tuple[list[dict], dict]:
        """A candidate from an Optuna trial: its steps (in stage order) and its export settings."""
        steps = []
        chosen: dict[str, str] = {}
        for stage in STAGES:
            needs = REPAIRS.get(stage)
            if needs and chosen.get(needs, NONE) == NONE:
                continue  # nothing to repair
            names = self.choices(stage)
            if names == [NONE]:
                continue
            name = trial.suggest_categorical(f"stage.{stage}", names) if len(names) > 1 else names[0]
            chosen[stage] = name
            if name == NONE:
                continue
            option = self.option(stage, name)
            step = {"type": name}
            for key, value in option.fixed.items():
                set_dotted(step, key, copy.deepcopy(value))
            for key, rng in option.fields.items():
                set_dotted(step, key, suggest_value(trial, f"{name}.{key}", rng))
            steps.append(step)
        export = {}
        if self.export is not None:
            export["weight_type"] = suggest_value(trial, "export.weight_type", self.export)
        return steps, export

    def seeds(self) -> list[dict]:
        """Optuna parameters for each step type alone at its defaults: one family at a time first, so the
        sampler starts from points the shipped recipes are made of, then mixes them."""
        out = []
        for stage, options in self.stages.items():
            if stage in REPAIRS or (self.forced and stage not in self.forced):
                continue
            for option in options:
                if self.forced.get(stage, option.type) != option.type:
                    continue
                params = {f"stage.{s}": NONE for s in self.stages if s != stage and len(self.choices(s)) > 1}
                if len(self.choices(stage)) > 1:
                    params[f"stage.{stage}"] = option.type
                defaults = step_type(option.type).config.__dataclass_fields__
                for key, rng in option.fields.items():
                    top = key.split(".")[0]
                    default = _default(defaults[top]) if "." not in key else None
                    params[f"{option.type}.{key}"] = _seed_value(rng, default)
                cost = seed_cost(step_type(option.type).config)
                out.append((cost, {k: v for k, v in params.items() if v is not None}))
        # cheapest first (a stable sort: catalog order among equals)
        return [params for _, params in sorted(out, key=lambda item: item[0])]

    def describe(self) -> dict:
        out = {}
        for stage in STAGES:
            opts = self.stages.get(stage, [])
            if not opts and stage != "export":
                continue
            out[stage] = {"choices": self.choices(stage),
                          "types": {o.type: {**{k: r.describe() for k, r in o.fields.items()},
                                             **{k: f"fixed at {v!r}" for k, v in o.fixed.items()}} for o in opts}}
        if self.export is not None:
            out["export"] = {"gguf weight_type": self.export.describe()}
        return out


def seed_cost(config) -> int:
    """The step type's declared search cost; undeclared, 1 if it calibrates (0 if not)."""
    if config.search_cost is not None:
        return config.search_cost
    flag = config.needs_calibration
    return int(flag) if isinstance(flag, bool) else 1  # decided per instance: assume it calibrates


def _default(f) -> Any:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _seed_value(rng: Range, default: Any) -> Any:
    """The parameter value that stands for `default` (or the range's first / middle value)."""
    if isinstance(rng, Choice):
        if len(rng.values) == 1:
            return None  # not an Optuna parameter
        return json.dumps(default if default in rng.values else rng.values[0])
    if rng.contains(default):
        return default
    mid = (rng.low + rng.high) / 2
    if rng.step:
        mid = rng.low + round((mid - rng.low) / rng.step) * rng.step
    return int(round(mid)) if rng.integer else round(mid, 6)


def canonical(steps: list[dict], export: dict) -> str:
    """Steps with every default filled in, so the same recipe written two ways is one candidate."""
    from leanlm.core.step import parse_step
    from leanlm.errors import LeanLMError

    full = []
    for i, step in enumerate(steps):
        try:
            full.append(parse_step(step, f"steps[{i}]").to_dict())
        except LeanLMError:
            full.append(step)
    return json.dumps([full, export], sort_keys=True, default=str)


def suggest_value(trial, name: str, rng: Range) -> Any:
    if isinstance(rng, Choice):
        if len(rng.values) == 1:
            return copy.deepcopy(rng.values[0])
        labels = [json.dumps(v) for v in rng.values]  # Optuna's categories are scalars; lists and None become text
        return json.loads(trial.suggest_categorical(name, labels))
    if rng.integer:
        return trial.suggest_int(name, rng.low, rng.high, step=int(rng.step or 1), log=rng.log)
    value = trial.suggest_float(name, rng.low, rng.high, step=rng.step, log=rng.log)
    return round(value, 6)  # a grid of 0.05 gives 0.35000000000000003 otherwise


def build_space(runtime: str = "leanlm", families: list[str] | None = None, fixes: list[str] | tuple[str, ...] = (),
                space_file: str | Path | None = None) -> SearchSpace:
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RUNTIMES)}")
    spec = read_space_file(space_file) if space_file else {}
    families = families or spec.get("families")
    known = sorted({family_of(n) for n in catalog.STEPS if step_type(n).config.stage})
    if families:
        unknown = [f for f in families if f not in known]
        if unknown:
            raise ConfigError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}; "
                              f"families that can be searched: {', '.join(known)}")
    stages: dict[str, list[Option]] = {}
    for name in catalog.STEPS:
        cfg = step_type(name).config
        if not cfg.stage or runtime not in cfg.runtimes or (families and family_of(name) not in families):
            continue
        stages.setdefault(cfg.stage, []).append(Option(name, search_fields(cfg)))
    space = SearchSpace(runtime, stages, export=GGUF_TYPES if runtime == "llama.cpp" else None)
    for name, ranges in (spec.get("steps") or {}).items():
        _narrow(space, name, ranges)
    for stage, name in (spec.get("stages") or {}).items():
        _force(space, stage, str(name), f"{space_file}: stages.{stage}")
    for text in [*(spec.get("fix") or []), *fixes]:
        apply_fix(space, text)
    if not any(o for o in space.stages.values()):
        raise ConfigError("the search space is empty: no step type of the chosen families runs on "
                          f"runtime {runtime}")
    return space


def apply_fix(space: SearchSpace, text: str) -> None:
    """`steps.STAGE=TYPE|none` or `steps.STAGE_OR_TYPE.FIELD=VALUE` (VALUE read as YAML)."""
    key, eq, raw = str(text).partition("=")
    parts = key.strip().split(".")
    if parts and parts[0] == "steps":
        parts = parts[1:]
    if not eq or not parts or not parts[0]:
        raise ConfigError(f"--fix {text!r}: write steps.STAGE=TYPE (e.g. steps.quantize=rtn, steps.structure=none) "
                          "or steps.TYPE.FIELD=VALUE (e.g. steps.rtn.bits=4)")
    value = yaml.safe_load(raw)
    if len(parts) == 1:
        if parts[0] in STAGES:
            return _force(space, parts[0], str(value), f"--fix {text!r}")
        raise ConfigError(f"--fix {text!r}: {parts[0]!r} is not a stage; stages: {', '.join(STAGES)} "
                          "(to fix a field, write steps.TYPE.FIELD=VALUE)")
    target, dotted = parts[0], ".".join(parts[1:])
    options = _options_named(space, target, text)
    hits = [o for o in options if dotted in o.fields or _has_field(o.type, dotted)]
    if not hits:
        raise ConfigError(f"--fix {text!r}: no {target} step has a field {dotted!r}")
    for option in hits:
        if dotted not in option.fields:
            raise ConfigError(f"--fix {text!r}: {option.type}.{dotted} is not searchable; searchable fields of "
                              f"{option.type}: {', '.join(option.fields) or 'none'}")
        hint = field_type(step_type(option.type).config, dotted)
        option.fixed[dotted] = check_type(value, hint, f"--fix {text}")
        del option.fields[dotted]
    if target in space.stages or target in STAGES:
        return
    _force(space, step_type(target).config.stage, target, f"--fix {text!r}")


def _options_named(space: SearchSpace, target: str, text: str) -> list[Option]:
    if target in STAGES:
        return space.stages.get(target, [])
    for opts in space.stages.values():
        for o in opts:
            if o.type == target:
                return [o]
    searched = sorted(o.type for opts in space.stages.values() for o in opts)
    raise ConfigError(f"--fix {text!r}: {target!r} is neither a stage ({', '.join(STAGES)}) nor a searched step "
                      f"type ({', '.join(searched)})")


def _has_field(name: str, dotted: str) -> bool:
    try:
        field_type(step_type(name).config, dotted)
        return True
    except ConfigError:
        return False


def _force(space: SearchSpace, stage: str, name: str, where: str) -> None:
    if stage not in STAGES:
        raise ConfigError(f"{where}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    allowed = [o.type for o in space.stages.get(stage, [])]
    if name != NONE and name not in allowed:
        raise ConfigError(f"{where}: stage {stage} can use {', '.join([NONE, *allowed])} here, not {name!r}")
    space.forced[stage] = name


def _narrow(space: SearchSpace, name: str, ranges: Any) -> None:
    where = f"search space steps.{name}"
    stage = next((s for s, opts in space.stages.items() if any(o.type == name for o in opts)), None)
    if stage is None:
        raise ConfigError(f"{where}: {name!r} is not a searched step type here")
    if ranges is False:  # leave this type out
        space.stages[stage] = [o for o in space.stages[stage] if o.type != name]
        return
    if not isinstance(ranges, dict):
        raise ConfigError(f"{where}: expected a mapping of field -> list of values, {{low, high[, step]}} or a value, "
                          "or false to leave the type out")
    option = space.option(stage, name)
    for key, rng in ranges.items():
        if key not in option.fields:
            raise ConfigError(f"{where}: {key!r} is not searchable; searchable: {', '.join(option.fields)}")
        hint = field_type(step_type(name).config, key)
        if isinstance(rng, list):
            option.fields[key] = Choice(*(check_type(v, hint, f"{where}.{key}") for v in rng))
        elif isinstance(rng, dict):
            extra = set(rng) - {"low", "high", "step", "log"}
            if extra or not {"low", "high"} <= set(rng):
                raise ConfigError(f"{where}.{key}: a range is {{low, high, step (optional), log (optional)}}")
            try:
                option.fields[key] = Span(rng["low"], rng["high"], rng.get("step"), bool(rng.get("log", False)))
            except ValueError as err:
                raise ConfigError(f"{where}.{key}: {err}") from err
        else:
            option.fixed[key] = check_type(rng, hint, f"{where}.{key}")
            del option.fields[key]


def read_space_file(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from err
    valid = ("families", "steps", "stages", "fix")
    if not isinstance(data, dict) or set(data) - set(valid):
        unknown = sorted(set(data) - set(valid)) if isinstance(data, dict) else []
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}"
                          if unknown else f"{path}: a search space is a mapping with keys {', '.join(valid)}")
    return data


def describe_candidate(steps: list[dict], export: dict) -> str:
    parts = []
    for step in steps:
        fields = ", ".join(f"{k}={v}" for k, v in step.items() if k != "type")
        parts.append(f"{step['type']}({fields})")
    if export:
        parts.append(f"gguf {export.get('weight_type')}")
    return " -> ".join(parts) or ("original" if not export else "")
