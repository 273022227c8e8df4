"""`leanlm recipes`: the shipped recipes and step types, or one recipe as it would run."""

from __future__ import annotations

from leanlm.cli.options import command, set_option
from leanlm.errors import ConfigError, LeanLMError


def add_parser(sub) -> None:
    p = command(sub, "recipes", "list shipped recipes and step types, or show one recipe resolved",
                "List the recipes shipped with leanlm and every step type with its options; with RECIPE, print that "
                "recipe as it would run (every default filled in, --set applied), without running it.", run)
    p.add_argument("recipe", nargs="?", help="a shipped recipe's name or a recipe YAML path")
    set_option(p)


def run(args) -> int:
    from leanlm.core.step import step_types
    from leanlm.pipeline.recipe import load_recipe, shipped_recipes

    if args.recipe:
        import yaml

        print(yaml.safe_dump(load_recipe(args.recipe, args.overrides).to_dict(), sort_keys=False, width=110), end="")
        return 0
    if args.overrides:
        raise ConfigError("--set changes a recipe: name it (leanlm recipes RECIPE --set KEY=VALUE)")
    print("shipped recipes (use with `leanlm optimize --recipe NAME`, or see one with `leanlm recipes NAME`):")
    for name, path in sorted(shipped_recipes().items()):
        print(f"  {name:16s} {load_recipe(path).description}")
    print("\nstep types:")
    for name, entry in step_types().items():
        opts = ", ".join(f"{k}={v!r}" for k, v in _defaults(entry.config).items())
        print(f"  {name:16s} {opts}")
    return 0


def _defaults(cls) -> dict:
    """The options a step with none given runs with (resolved), or the bare field defaults of a step that
    needs some option set."""
    import dataclasses

    try:
        resolved = cls()
        return {f.name: getattr(resolved, f.name) for f in dataclasses.fields(cls)}
    except LeanLMError:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
