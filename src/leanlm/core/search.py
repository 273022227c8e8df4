"""What a step type offers an automatic search: its searchable fields and their ranges, and its place in a
searched recipe. Declared on each step config beside its fields, so a step type added later joins the
search (`leanlm auto`) with no change to the search itself:

    @dataclass
    class RTNConfig(StepConfig):
        stage = "quantize"
        search = {"bits": Choice(4, 8), "group_size": Choice(None, 32, 64, 128)}

A recipe found by a search holds at most one step per stage, in STAGES order.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from leanlm.errors import ConfigError

# The canonical order a searched recipe's steps run in: structure first (it changes what later steps see),
# then low-rank factorization (it reshapes linears; the factors are what later steps calibrate on),
# healing right after the damage it repairs, sparsity before quantization (a quantizer calibrates on the
# sparse model), and the runtime's own format last.
STAGES = ("structure", "lowrank", "heal", "weight_sparsity", "act_sparsity", "quantize", "export")
# a stage whose steps only repair what an earlier stage did: searched only when that stage has a step
REPAIRS = {"heal": "structure"}


@dataclass(frozen=True)
class Choice:
    """One of a few values (numbers, names, None, lists)."""
    values: tuple

    def __init__(self, *values: Any):
        if not values:
            raise ValueError("a Choice needs at least one value")
        object.__setattr__(self, "values", tuple(values))

    def contains(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.values))


@dataclass(frozen=True)
class Span:
    """A number in [low, high], on a grid of `step` when given (ints when both ends are ints)."""
    low: float
    high: float
    step: float | None = None
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"a Span needs low < high, got {self.low}, {self.high}")

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return not self.integer or float(value).is_integer()
        k = (value - self.low) / self.step
        return math.isclose(k, round(k), abs_tol=1e-9)

    def describe(self) -> str:
        grid = f" in steps of {self.step}" if self.step else ""
        return f"{'an integer' if self.integer else 'a number'} from {self.low} to {self.high}{grid}"


Range = Choice | Span


def search_fields(config_cls: type) -> dict[str, Range]:
    """The searchable fields of a step config (dotted names reach into nested configs: `train.max_minutes`)."""
    space = getattr(config_cls, "search", None) or {}
    for name in space:
        field_type(config_cls, name)  # a typo in a declaration fails where it is made, in the tests
    return dict(space)


def field_type(config_cls: type, dotted: str) -> Any:
    """The type hint of a (possibly nested) field, or a ConfigError naming the fields there are."""
    cls, hint = config_cls, None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{config_cls.__name__}: {dotted!r} reaches into {part!r}, which is not a section")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if part not in names:
            raise ConfigError(f"{config_cls.__name__} has no field {dotted!r}; fields: {', '.join(names)}")
        hint = hints[part]
        cls = hint
    return hint


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data[a][b] = value for `a.b`, making the sections on the way."""
    *sections, last = dotted.split(".")
    for part in sections:
        data = data.setdefault(part, {})
    data[last] = value
