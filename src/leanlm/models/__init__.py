"""Model I/O: load a causal LM (built-in name, HF directory, GGUF, leanlm checkpoint) after checking it fits
in memory (`load`), and save it as plain HF or as a leanlm checkpoint (`save`). Built-in models are in
`builtin`, which imports no torch, so the CLI can name the default model before torch loads."""

import importlib

_NAMES = {"LoadedModel": "leanlm.models.load", "load_model": "leanlm.models.load", "save_model": "leanlm.models.save"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
