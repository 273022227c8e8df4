"""A family's verb (`quantize_`, `prune_`) dispatched on its config's type, torchao-style: each method
registers its handler next to its config class, so adding one touches no central table."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from leanlm.core.layerwise import check_calibration
from leanlm.core.structure import check_arguments
from leanlm.errors import ConfigError


class Registry(dict):
    """Config class -> handler(model, config, **kwargs) for the verb `verb`, whose handlers are `noun`s."""

    def __init__(self, verb: str, noun: str):
        super().__init__()
        self.verb, self.noun = verb, noun

    def register(self, config_cls: type) -> Callable[[Callable], Callable]:
        def wrap(fn: Callable) -> Callable:
            if config_cls in self:
                raise ValueError(f"{config_cls.__name__} has a {self.noun} already")
            self[config_cls] = fn
            return fn
        return wrap

    def dispatch(self, model: nn.Module, config: Any, **kwargs) -> dict:
        """Refuse a bad model, config type or calibration data before any work, then run the handler."""
        check_arguments(self.verb, model)
        handler = self.get(type(config))
        if handler is None:
            raise ConfigError(f"{self.verb}: no {self.noun} for {type(config).__name__}; "
                              f"known: {', '.join(c.__name__ for c in self)}")
        check_calibration(model, config, kwargs.get("calibration"))
        return handler(model, config, **kwargs)
