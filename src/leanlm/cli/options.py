"""What several commands share: the model and device options, and flags generated from a config
dataclass, so each option's type, choices and default are written once, on the config field."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from leanlm.models.builtin import DEFAULT_MODEL


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def command(sub, name: str, help: str, description: str, run) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments go to `run(args)` (nested groups add their own subparsers)."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(run=run)
    return p


def model_argument(p: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    if required:
        p.add_argument("model", help=what)
    else:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{what} (default: {DEFAULT_MODEL})")


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice, one per core)")


def runtime_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="leanlm", choices=["leanlm", "llama.cpp"],
                   help="run the model in leanlm (PyTorch) or, for a .gguf file, in llama.cpp through "
                        "llama-cpp-python (default: leanlm)")


def set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change one recipe option, checked like the recipe file (repeatable): steps.0.sparsity=0.6, "
                        "calibration.samples=32")


def output_options(p: argparse.ArgumentParser, default: str | None = None, what: str = "output directory") -> None:
    if default is None:
        p.add_argument("--out", required=True, help=what)
    else:
        p.add_argument("--out", default=default, help=f"{what} (default: {default})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def config_options(p: argparse.ArgumentParser, defaults: Any, helps: dict[str, str], prefix: str = "") -> None:
    """One flag per field named in `helps` (`--field-name`), typed, choices and default from `defaults` (a
    config instance); a boolean that defaults to true becomes `--no-field-name`."""
    hints = typing.get_type_hints(type(defaults))
    fields = {f.name for f in dataclasses.fields(defaults)}
    for name, text in helps.items():
        if name not in fields:
            raise ValueError(f"{type(defaults).__name__} has no field {name!r}")
        value, hint = getattr(defaults, name), hints[name]
        flag, dest = name.replace("_", "-"), prefix + name
        if hint is bool:
            off = value is True
            p.add_argument(f"--{'no-' if off else ''}{flag}", dest=dest, action="store_false" if off else "store_true",
                           default=value, help=text)
            continue
        kind, choices, many = _argument_type(hint)
        p.add_argument(f"--{flag}", dest=dest, metavar=name.upper(), type=kind, choices=choices, nargs="+" if many else None,
                       default=list(value) if many else value, help=f"{text} (default: {_shown(value)})")


def config_values(args: argparse.Namespace, helps: dict[str, str], prefix: str = "") -> dict:
    """The values of the flags `config_options` made, keyed by field name, for core.config.parse_config."""
    return {name: getattr(args, prefix + name) for name in helps}


def _argument_type(hint: Any) -> tuple[Any, list | None, bool]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(args[0]), list(args), False
    if origin in (list, tuple):
        return _argument_type(args[0])[0], None, True
    if args:  # X | None
        return _argument_type(args[0])
    return hint, None, False


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
