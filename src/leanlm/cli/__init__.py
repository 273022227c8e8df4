"""The `leanlm` command. Each subcommand is one module of this package (listed in core/catalog.py) with
`add_parser(subparsers)` and `run(args)`: it parses, calls a library function and prints.

Only the chosen command's parser is built, so `leanlm --help` imports no torch and a command's flags can
come from its config dataclasses (cli/options.py), which do."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from leanlm.core import catalog
from leanlm.errors import LeanLMError

COMMANDS = catalog.COMMANDS


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s options in full (every command's, when None) and the others listed."""
    parser = argparse.ArgumentParser(
        prog="leanlm",
        description="Make a causal LM cheaper, faster and better at one job, and measure what each step costs and buys.",
        epilog="Models are a built-in name (see `leanlm models`), a Hugging Face directory or a .gguf file. "
               "Data is a .txt/.jsonl/.parquet file or a directory of them; the default is Python's documentation "
               "(pydoc_data.topics, 90% train / 10% eval).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, path in COMMANDS.items():
        module = importlib.import_module(path)
        if command in (None, name):
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=module.HELP if hasattr(module, "HELP") else _help_of(module))
    return parser


def _help_of(module) -> str:
    """The one-line help of a command whose parser is not built: its module docstring's first sentence."""
    first = (module.__doc__ or "").split(":", 1)[-1].strip()
    return first.split(". ")[0].rstrip(".")


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # so `kill` cleans up partial outputs like Ctrl-C does
    try:
        return args.run(args) or 0
    except LeanLMError as err:
        print(f"leanlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leanlm {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt
