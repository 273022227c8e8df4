"""The ground every step type stands on: its config base, the context a run gives it, the checks made
before a recipe runs, and applying one step.

A technique adds a step type with one call beside its config, `register_step("gptq", GPTQConfig,
quantize_gptq, family=QUANTIZERS)` (core.registry), and one line in core/catalog.py; the pipeline finds
it by name and passes it calibration data and a device when the config says it needs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from leanlm.core import catalog
from leanlm.core.config import Validated, parse_config, to_dict
from leanlm.core.registry import (
    StepType,
    register_step,
    run_verb,
    step_type,
    step_types,
)
from leanlm.core.structure import share_tied_codes, tied_embedding
from leanlm.errors import ConfigError, LeanLMError

__all__ = ["StepConfig", "StepContext", "StepType", "register_step", "step_type", "step_types", "parse_step",
           "apply_step", "check_steps", "naming_step"]


class StepConfig(Validated):
    """Base for step configs (subclasses are dataclasses)."""
    type: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    # replaces or removes modules, so the steps after it can only be checked against the model once it has run
    reshapes_model: ClassVar[bool] = True
    # what an automatic search may try (core.search): the stage the step runs in, its searchable fields and
    # their ranges, and the runtimes its result runs on (llama.cpp: through a GGUF export that keeps it)
    stage: ClassVar[str | None] = None
    search: ClassVar[dict[str, Any]] = {}
    runtimes: ClassVar[tuple[str, ...]] = ("leanlm", "llama.cpp")
    # what one search trial of the step costs, roughly, so a search tries the cheap ones first: 0 no
    # calibration, 1 forward passes over the calibration data, 2 a solve per layer (GPTQ, SparseGPT,
    # low-rank), 3 a search or training per block (AWQ's scale grid, healing); None: 1 if it calibrates
    search_cost: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        self.check_types()  # before the comparisons below, which a string would break
        # options that mean the same in every step that has them, checked once here
        for name in ("batch_size", "block_size"):
            value = getattr(self, name, None)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        damp = getattr(self, "damp", None)
        if damp is not None and damp <= 0:
            raise ConfigError(f"damp (added to the Hessian's diagonal, relative to its mean) must be > 0, got {damp}")
        self.validate()

    def to_dict(self) -> dict:
        return {"type": self.type, **to_dict(self)}

    def check(self, model: nn.Module | None) -> None:
        """Refuse now what the step would refuse after minutes of work. `model` is None when an earlier
        step reshapes it; then only what does not depend on the model is checked."""

    def input_multiple(self) -> int:
        """What every input dimension of the layers this step handles must be a multiple of (a group size)."""
        return 1

    def check_later(self, later: list[tuple[int, StepConfig]]) -> None:
        """Refuse, before any work, a recipe whose later steps (index, config) cannot take the layers this
        step will make; for a step that reshapes the model, whose later steps cannot see its result yet."""

    def opaque_modules(self, model: nn.Module) -> dict[str, str]:
        """The modules (name -> kind) this step will leave holding weights that no per-linear step reaches."""
        return {}

    def check_opaque(self, opaque: dict[str, str]) -> None:
        """Refuse a selection that takes in `opaque` modules (what earlier steps' `opaque_modules` named),
        which a per-linear step would pass over."""


@contextmanager
def naming_step(index: int, step: StepConfig) -> Iterator[None]:
    """Prefix an error raised for a recipe's step with its place in the recipe."""
    try:
        yield
    except LeanLMError as err:
        raise type(err)(f"steps[{index}] ({step.type}): {err}") from err


def check_steps(model: nn.Module, steps: list[StepConfig]) -> None:
    """Check every step before the baseline is measured, against the model as each step will see it."""
    current: nn.Module | None = model
    opaque: dict[str, str] = {}  # what earlier steps will have turned into weights outside linear layers
    for i, step in enumerate(steps):
        with naming_step(i, step):
            step.check(current)
            step.check_later(list(enumerate(steps))[i + 1:])
            step.check_opaque(opaque)
            if current is not None:
                opaque.update(step.opaque_modules(current))
        if step.reshapes_model:
            current = None


@dataclass
class StepContext:
    """What a handler may use besides the model: the tokenizer and lazily built calibration data."""
    tokenizer: Any
    calibration: Callable[[], torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train_text: str | None = None  # the training split, for steps that train
    source: str | None = None  # the model the recipe started from (a distillation step's default teacher)
    work_dir: Path | None = None  # survives an interrupted run: training checkpoints live here
    resume: bool = False  # training steps continue from their checkpoints in work_dir

    def training_text(self) -> str:
        if self.train_text is None:
            raise ConfigError("this step trains on text, but no training data was given")
        return self.train_text

    def calibration_data(self) -> torch.Tensor:
        if self.calibration is None:
            raise ConfigError("this step needs calibration data, but none was configured")
        return self.calibration()

    def inputs(self, config: StepConfig) -> dict[str, Any]:
        """A verb's keyword inputs: calibration data and the device for a step that calibrates, else none."""
        if config.needs_calibration:
            return {"calibration": self.calibration_data(), "device": self.device}
        return {}


def parse_step(data: Any, where: str) -> StepConfig:
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"{where}: a step is a mapping with a 'type' key; step types: {', '.join(sorted(catalog.STEPS))}")
    kind = data["type"]
    try:
        entry = step_type(kind) if isinstance(kind, str) else None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if entry is None:
        raise ConfigError(f"{where}: step type must be a name, got {kind!r}; step types: {', '.join(sorted(catalog.STEPS))}")
    return parse_config(entry.config, data, f"{where} ({kind})", ignore=("type",))


def apply_step(model: nn.Module, config: StepConfig, ctx: StepContext) -> dict:
    """Run one step: its handler with the run's context, or its verb with what the config says it needs."""
    entry = step_type(config.type)
    if entry.handler is None:
        return run_verb(entry, model, config, **ctx.inputs(config))
    tied = tied_embedding(model)
    stats = entry.handler(model, config, ctx) or {}
    return share_tied_codes(model, stats) if tied else stats
