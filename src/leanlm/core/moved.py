"""Names that moved in the 0.2 re-layering keep working from their old place, with a warning.

An old module (or package) sets `__getattr__ = moved(__name__, {name: new_module})`; the new module
is imported only when an old name is used, so the shims add no import edges to the layering.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved(old: str, names: dict[str, str] | str) -> Callable[[str], Any]:
    """`names`: name -> the module that now defines it, or one module for every name."""
    def __getattr__(name: str) -> Any:
        target = names if isinstance(names, str) else names.get(name)
        if target is None or name.startswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {target}.{name}; import it from there", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(target), name)
    return __getattr__
