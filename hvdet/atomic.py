"""Atomic file writes: readers, and a run resumed after a crash mid-write, see the old file or the
complete new one, never a truncated one. Every file a run writes goes through here."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hvdet.errors import HvdetError


class WriteError(HvdetError, OSError):
    """A file of the run could not be written (a full disk, a lost mount); the message names it."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            raise WriteError(f"cannot write {path}: {_first_line(err)}{_free_space(path.parent)}") from err
        raise
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that writes killed mid-way left in ``folder`` (call it when no write is
    running there: rank 0 at the start of a run)."""
    found = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


def _first_line(err: BaseException) -> str:
    """The operating system's reason where the chain has one (torch.save reports a full disk as
    "unexpected pos ...", caused by the OSError that says so), else the error's first line."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**20:.0f} MiB free on its file system)"
