"""Strict typed configs: dataclasses parsed from YAML/dicts, unknown keys and wrong types rejected.

Each error names where it happened (`steps[1]`), the offending key, and the valid keys, so a
typo in a recipe fails in a second instead of silently running with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import os
import types
import typing
from typing import Any, Literal, TypeVar, Union

from leanlm.errors import ConfigError

T = TypeVar("T")


class Validated:
    """Dataclass mixin: every field's type is checked and `validate()` runs on construction, so a
    config built in Python is checked exactly as one parsed from YAML."""

    def __post_init__(self) -> None:
        self.check_types()
        self.validate()

    def check_types(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.init:
                value = check_type(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
                object.__setattr__(self, f.name, value)  # ints given for floats become floats

    def validate(self) -> None:
        pass


def parse_config(cls: type[T], data: Any, where: str, ignore: tuple[str, ...] = ()) -> T:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields) - set(ignore))
    if unknown:
        guesses = [g for k in unknown for g in difflib.get_close_matches(str(k), fields, n=1)]
        hint = f" (did you mean {', '.join(map(repr, guesses))}?)" if guesses else ""
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                          f"{hint}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {k: check_type(v, hints[k], f"{where}.{k}") for k, v in data.items() if k in fields}
    try:
        obj = cls(**values)
        if not isinstance(obj, Validated) and hasattr(obj, "validate"):
            obj.validate()
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where}: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    return obj


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_type(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {_describe(hint)}")
    if origin is Literal:
        if isinstance(value, bool) is not isinstance(args[0], bool) or value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return args[args.index(value)]  # the plain Python value, even for a numpy one
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if not args:
            return value
        return {check_type(k, args[0], f"{where} key"): check_type(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null")
        return None
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else parse_config(hint, value, where)
    if isinstance(value, bool) and hint in (int, float):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, numbers.Integral):  # numpy and torch integers too
        return int(value)
    if hint is float and isinstance(value, numbers.Real):
        return float(value)
    if hint is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if hint is Any:
        return value
    if not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {_describe(hint)}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"list of {_describe(args[0])}" if args else "list"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def to_dict(obj: Any) -> Any:
    """A config back to plain YAML-able data, with every default filled in."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj
