"""Where leanlm keeps its cache, and how it writes outputs without ever leaving half of one."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from leanlm.errors import OutputError, OutputExistsError


def leanlm_version() -> str:
    """The installed distribution's version (pyproject.toml), the one place it is written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leanlm")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The user's cache dir for leanlm (override with LEANLM_CACHE)."""
    env = os.environ.get("LEANLM_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "leanlm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of all files under `path` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output, or a place where nothing can be written, before any long work starts."""
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output {out} already exists; choose another path or pass --overwrite to replace it"
        )
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Create and remove a probe directory in the nearest existing ancestor of `out` (permission bits
    alone say nothing of read-only mounts or of what root may do)."""
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {out}: {ancestor} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".leanlm-probe-", dir=ancestor))
    except OSError as err:
        raise OutputError(f"cannot write {out}: {ancestor} does not accept new files ({err.strerror}); "
                          "choose another output path") from err


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block completes.

    The temporary directory sits beside the target so the final rename stays on one
    filesystem; on any exception (Ctrl-C included) it is removed and `path` is untouched.
    """
    out = check_output(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_orphans(out: Path) -> None:
    """Partial outputs of `out` whose process died without cleaning up (killed, out of memory): a
    model-sized directory each, so they are removed rather than left to fill the disk."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.warning("removing %s, left by process %s that did not finish", partial, pid)
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that replaces `path` only when the block completes."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
