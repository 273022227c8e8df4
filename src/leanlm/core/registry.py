"""The one registry: step types and runtime modules, each registered by the module that defines it,
and found by name through core.catalog, which says which module to import.

A step type is a typed config plus the function that applies it: a verb `verb(model, config, **inputs)`,
called with calibration data and a device when the config says it needs calibration, or a pipeline
handler `handler(model, config, ctx)` for steps that need more of the run (training text, a work
directory). A family verb (`quantize_`, `prune_`) dispatches a config to its step type's verb, so the
Python API and a recipe run the same function with the same checks.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from leanlm.core import catalog
from leanlm.core.layerwise import check_calibration
from leanlm.core.structure import check_arguments, share_tied_codes, tied_embedding
from leanlm.errors import ConfigError, UnsupportedModelError


@dataclass(frozen=True)
class StepType:
    name: str
    config: type
    verb: Callable[..., dict] | None  # verb(model, config, **inputs)
    handler: Callable[..., dict] | None  # handler(model, config, ctx), for steps that need the whole run
    family: Family | None  # the family verb that dispatches to `verb`


_STEPS: dict[str, StepType] = {}
_MODULES: dict[str, type[nn.Module]] = {}


def register_step(name: str, config_cls: type, verb: Callable | None = None, *, handler: Callable | None = None,
                  family: Family | None = None) -> StepType:
    """Make `config_cls` the step type `name`, applied by `verb` (or by `handler`, given the run's context)."""
    if (verb is None) == (handler is None):
        raise ValueError(f"step type {name!r}: give exactly one of verb and handler")
    if name in _STEPS:
        raise ValueError(f"step type {name!r} registered twice")
    config_cls.type = name
    entry = StepType(name, config_cls, verb, handler, family)
    _STEPS[name] = entry
    return entry


def step_type(name: str) -> StepType:
    """The step type `name`, importing the module that defines it on first use."""
    if name not in _STEPS:
        if name not in catalog.STEPS:
            close = difflib.get_close_matches(name, list(catalog.STEPS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown step type {name!r}{hint}; step types: {', '.join(sorted(catalog.STEPS))}")
        importlib.import_module(catalog.STEPS[name])
        if name not in _STEPS:
            raise RuntimeError(f"{catalog.STEPS[name]} does not register step type {name!r} (core/catalog.py)")
    return _STEPS[name]


def step_types() -> dict[str, StepType]:
    """Every step type in the catalog (imports them all: for listings, not for running a recipe)."""
    return {name: step_type(name) for name in sorted(catalog.STEPS)}


def run_verb(entry: StepType, model: nn.Module, config: Any, **inputs) -> dict:
    """Refuse a bad model or calibration data before any work, then apply the step's verb."""
    check_arguments(entry.family.verb if entry.family else entry.name, model)
    check_calibration(model, config, inputs.get("calibration"))
    tied = tied_embedding(model)
    stats = entry.verb(model, config, **inputs) or {}
    return share_tied_codes(model, stats) if tied else stats


class Family:
    """A family verb's dispatch (`quantize_`, `prune_`): a config goes to the verb its step type registered."""

    def __init__(self, verb: str, noun: str):
        self.verb, self.noun = verb, noun

    def members(self) -> list[type]:
        return [e.config for e in _STEPS.values() if e.family is self]

    def dispatch(self, model: nn.Module, config: Any, **inputs) -> dict:
        check_arguments(self.verb, model)
        entry = _STEPS.get(getattr(type(config), "type", None))
        if entry is None or entry.family is not self or type(config) is not entry.config:
            raise ConfigError(f"{self.verb}: no {self.noun} for {type(config).__name__}; "
                              f"known: {', '.join(c.__name__ for c in self.members())}")
        return run_verb(entry, model, config, **inputs)


def register_module(scheme: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a runtime module class under `scheme`, so leanlm checkpoints that hold it load back.

    The class provides `empty(in_features, out_features, bias, **params)`, which builds an uninitialised
    instance (or `wrap(existing_module, **params)` for a module built around one of the model's own), and
    `manifest()`, which returns those params (see core.packed)."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if scheme in _MODULES:
            raise ValueError(f"runtime module scheme {scheme!r} registered twice")
        cls.scheme = scheme
        _MODULES[scheme] = cls
        return cls
    return wrap


def runtime_module(scheme: str, where: str = "checkpoint") -> type[nn.Module]:
    """The runtime module class for `scheme`, importing the module that defines it on first use."""
    if scheme not in _MODULES:
        if scheme not in catalog.RUNTIME_MODULES:
            raise UnsupportedModelError(f"{where}: unknown runtime module scheme {scheme!r}; known: "
                                        f"{', '.join(sorted(catalog.RUNTIME_MODULES))} (a newer leanlm wrote it?)")
        importlib.import_module(catalog.RUNTIME_MODULES[scheme])
    return _MODULES[scheme]


def is_runtime_module(module: nn.Module) -> bool:
    """A module a plain HF checkpoint cannot hold (its class was registered, so it has been imported)."""
    return type(module) in _MODULES.values()


def registered() -> tuple[dict[str, StepType], dict[str, type[nn.Module]]]:
    """What has registered so far (for the test that checks the catalog)."""
    return dict(_STEPS), dict(_MODULES)
