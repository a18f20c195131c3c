"""Writing a file so that an interrupt, a crash, a kill or a full disk never leaves half of it.

Checkpoints, the synthetic dataset's cache, sweep state, reports and bench JSON all go
through ``write_atomic``: readers (a resume, a second trial, a dashboard) see the old file
or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from segsweep.errors import ConfigError


def write_atomic(path: Path, content: str | bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function that writes to a binary file) to
    a temporary beside ``path``, then rename it over ``path`` (atomic on one file system).

    The temporary's name is unique, so writers racing for the same file (two trials
    generating the same dataset) never write into each other's; the last rename wins, and
    each renamed file is whole. On any error the temporary is removed and ``path`` is left
    as it was. The data reach the disk before the rename (fsync), so a power loss does not
    leave an empty file under the new name either. Permissions follow the umask, like any
    other file the user writes. A process killed mid-write (SIGKILL) leaves its temporary:
    a folder's one writer removes them with ``remove_leftovers``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def require_folder(path: Path, what: str) -> None:
    """Raise a one-line ``ConfigError`` naming ``what`` (a field or flag) if ``path`` cannot be
    a folder: it, or the nearest part of it that exists, is a file. Checked before anything is
    started or written, rather than failing half-way with ``NotADirectoryError``."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                shown = "" if part == path else f" (in {path})"
                raise ConfigError(f"{what}: {part} is a file, not a folder{shown}")
            return


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporaries that killed writers left in ``folder``; only for a folder that
    one writer owns (a run's checkpoints), where no other write can be in flight."""
    leftovers = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for tmp in leftovers:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return leftovers
