"""Moving about the search space: a candidate's Optuna parameters resolved to its steps (a missing parameter
at its field's default), a recipe mapped back onto the parameters that stand for it, and the candidates one
move away from it (one field to another value, one stage to another type). The planner's local search is
built on these; Optuna's own sampling does not need them."""

from __future__ import annotations

import json
from typing import Any

from leanlm.auto.space import NONE, SearchSpace, _seed_value, canonical
from leanlm.core.registry import step_type
from leanlm.core.search import STAGES, Choice, Range
from leanlm.errors import ConfigError


def resolve(space: SearchSpace, params: dict) -> tuple[dict, list[dict], dict] | None:
    """The candidate `params` stand for, as (the parameters it really uses, its steps, its export); a missing
    parameter takes its field's default; None when a value lies outside the space."""
    recorder = _Recorder(params, _defaults(space))
    steps, export = space.suggest(recorder)
    return None if recorder.invalid else (recorder.used, steps, export)

def params_of(space: SearchSpace, steps: list[dict], export: dict | None = None) -> dict | None:
    """The parameters of a recipe (a shipped one, say) in the space, or None when the space cannot
    express it (a type not searched, two steps in one stage, a value outside a range, a fixed field set
    otherwise): checked by building the candidate back from them."""
    from leanlm.core.step import parse_step

    params: dict[str, Any] = {f"stage.{s}": NONE for s in STAGES}
    try:
        full = [parse_step(s, f"steps[{i}]").to_dict() for i, s in enumerate(steps)]
    except ConfigError:
        return None
    for step in full:
        stage = step_type(step["type"]).config.stage
        if params.get(f"stage.{stage}", NONE) != NONE or step["type"] not in space.choices(stage or ""):
            return None
        params[f"stage.{stage}"] = step["type"]
        for key, rng in space.option(stage, step["type"]).fields.items():
            value = get_dotted(step, key)
            if not rng.contains(value):
                return None
            params[f"{step['type']}.{key}"] = json.dumps(value) if isinstance(rng, Choice) else value
    if space.export is not None:
        params["export.weight_type"] = json.dumps((export or {}).get("weight_type", "auto"))
    resolved = resolve(space, params)
    if resolved is None or canonical(resolved[1], resolved[2]) != canonical(full, export or {}):
        return None
    return resolved[0]

def neighbors(space: SearchSpace, params: dict) -> list[tuple[dict, str, str]]:
    """Every candidate one move away from `params`, with the move in words: one searchable field set to
    another value (a neighbouring grid point for ranges), then one stage given another type or none (the
    new type at its defaults, fields it shares with the old one carried over). Cheap moves first: a field
    keeps the recipe's costly steps; then another type in a stage the recipe uses; adding a stage last."""
    fields, stages, added = [], [], []
    for name, value in params.items():
        if name.startswith("stage."):
            for other in space.choices(name.removeprefix("stage.")):
                if other != value:
                    moved = {**params, name: other, **_carried(space, params, value, other)}
                    # another technique in a stage the recipe uses before a stage it does not use yet
                    (added if value == NONE else stages).append(
                        (moved, f"{name.removeprefix('stage.')}: {value} -> {other}"))
            continue
        rng = space.export if name == "export.weight_type" else field_range(space, name)
        for other in _alternatives(rng, value):
            fields.append(({**params, name: other}, f"{name}: {_show(value)} -> {_show(other)}"))
    out = []
    for moved, words in fields + stages + added:
        resolved = resolve(space, moved)
        if resolved is not None:
            out.append((resolved[0], canonical(resolved[1], resolved[2]), words))
    return out

def _carried(space: SearchSpace, params: dict, old: str, new: str) -> dict:
    """The fields a stage's new type shares with its old one, carried over where the new type's range holds
    the value: rtn with its LM head quantized becomes mixed with its LM head quantized, not mixed at its
    defaults, so a move changes one thing."""
    if NONE in (old, new):
        return {}
    out = {}
    for key, rng in space.option(step_type(new).config.stage, new).fields.items():
        value = params.get(f"{old}.{key}")
        if value is None:
            continue
        inside = value in [json.dumps(v) for v in rng.values] if isinstance(rng, Choice) else rng.contains(value)
        if inside:
            out[f"{new}.{key}"] = value
    return out


def field_range(space: SearchSpace, name: str) -> Range:
    kind, key = name.split(".", 1)
    stage = step_type(kind).config.stage
    return space.option(stage, kind).fields[key]

def _defaults(space: SearchSpace) -> dict[str, Any]:
    """Each field parameter's default value (what a seed uses), by parameter name."""
    from leanlm.core.step import parse_step

    out: dict[str, Any] = {}
    for options in space.stages.values():
        for option in options:
            try:
                defaults = parse_step({"type": option.type}, option.type).to_dict()
            except ConfigError:  # a type with a required field: its range's first or middle value
                defaults = {}
            for key, rng in option.fields.items():
                value = _seed_value(rng, get_dotted(defaults, key))
                out[f"{option.type}.{key}"] = value if value is not None else json.dumps(rng.values[0])
    if space.export is not None:
        out["export.weight_type"] = json.dumps("auto")
    return out


class _Recorder:
    """Stands in for an Optuna trial: answers each suggestion from `params` (a missing one with its default) and
    keeps the parameters the candidate really uses; a value outside its range marks the candidate invalid."""

    def __init__(self, params: dict, defaults: dict):
        self.params, self.defaults = params, defaults
        self.used: dict[str, Any] = {}
        self.invalid = False

    def _value(self, name: str, fallback: Any) -> Any:
        value = self.params.get(name, self.defaults.get(name, fallback))
        self.used[name] = value
        return value

    def suggest_categorical(self, name: str, choices):
        value = self._value(name, NONE if name.startswith("stage.") else choices[0])
        if value not in choices:
            self.invalid = True
            return choices[0]
        return value

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        value = self._value(name, low)
        if not isinstance(value, int) or not low <= value <= high or (value - low) % step:
            self.invalid = True
        return value

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> float:
        value = self._value(name, low)
        if not isinstance(value, (int, float)) or not low - 1e-9 <= value <= high + 1e-9:
            self.invalid = True
        return value


def _alternatives(rng: Range | None, value: Any) -> list[Any]:
    """The values one move away: every other choice, or for a range its neighbouring points (its grid step,
    else an eighth of its width), then the points halfway to either end: a candidate far from the budget
    (mixed precision at 4.5 bits, two bits short of it) gets there in a move or two, not in eight steps."""
    if rng is None:
        return []
    if isinstance(rng, Choice):
        return [label for label in (json.dumps(v) for v in rng.values) if label != value]
    delta = rng.step or (rng.high - rng.low) / 8
    if rng.integer:
        delta = max(1, int(round(delta)))
    out: list[Any] = []
    for moved in (value - delta, value + delta, (value + rng.low) / 2, (value + rng.high) / 2):
        if rng.step:
            moved = rng.low + round((moved - rng.low) / rng.step) * rng.step
        moved = int(round(moved)) if rng.integer else round(moved, 6)
        if rng.low <= moved <= rng.high and moved != value and moved not in out:
            out.append(moved)
    return out


def _show(value: Any) -> str:
    if isinstance(value, str):
        try:
            return repr(json.loads(value))
        except ValueError:
            return value
    return repr(value)


def get_dotted(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
