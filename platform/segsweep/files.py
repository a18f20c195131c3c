"""Writing a file so that an interrupt, a crash, a kill or a full disk never leaves half of it.

Checkpoints, the synthetic dataset's cache, sweep state, reports and bench JSON all go
through ``write_atomic``: readers (a resume, a second trial, a dashboard) see the old file
or the new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

from pydantic import BeforeValidator

from segsweep.errors import ConfigError


def expand_user(text: str) -> Path:
    """``text`` as a path with ``~`` expanded; ``ValueError`` (one line) for an empty path,
    which would silently mean the current folder, or a ``~user`` with no home."""
    if not text:
        raise ValueError("an empty path (leave the key out for its default)")
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # '~nosuchuser/x'
        raise ValueError(f"cannot expand '{text}' ({exc})") from None


def _typed_path(value: object) -> object:
    return expand_user(value) if isinstance(value, str) else value


#: A path field of a config: what the user typed, ``~`` expanded, never silently empty.
UserPath = Annotated[Path, BeforeValidator(_typed_path)]


def write_atomic(
    path: Path, content: str | bytes | Callable[[BinaryIO], object], *, private: bool = False
) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function that writes to a binary file) to
    a temporary beside ``path``, then rename it over ``path`` (atomic on one file system).

    The temporary's name is unique, so writers racing for the same file (two trials
    generating the same dataset) never write into each other's; the last rename wins, and
    each renamed file is whole. On any error the temporary is removed and ``path`` is left
    as it was. The data reach the disk before the rename (fsync), so a power loss does not
    leave an empty file under the new name either. Permissions follow the umask, like any
    other file the user writes; ``private``: readable by the user alone from its creation on
    (a file that may hold a password). A process killed mid-write (SIGKILL) leaves its
    temporary: a folder's one writer removes them with ``remove_leftovers``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    mode = 0o600 if private else 0o666  # then less the umask, as open() does

    def opener(name: str, flags: int) -> int:
        return os.open(name, flags, mode)

    try:
        with open(tmp, "xb", opener=opener) as fh:
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


def make_folder(path: Path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) for ``what`` (a field or flag), or raise a
    one-line ``ConfigError`` saying why it cannot be (a file in the way, no permission)."""
    path = Path(os.path.abspath(path))  # 'a/../runs' makes runs/, never a/
    require_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot create {path} ({exc.strerror or exc})") from None
    return path


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating ``path`` adds),
    or None when ``path`` exists."""
    path = Path(os.path.abspath(path))  # 'a/../runs' is runs/: judged as the file system sees it
    missing = None
    for part in (path, *path.parents):
        if part.exists():
            break
        missing = part
    return missing


def unmake_folder(path: Path, top: Path | None) -> None:
    """Undo ``make_folder(path)`` after a failure: remove ``path`` with everything in it, then
    each parent up to ``top`` (``first_missing`` before it was made) that is still empty. A
    parent another process has written into meanwhile (a second run in ``runs/``) stays."""
    if top is None:
        return
    path = Path(os.path.abspath(path))  # as ``first_missing`` saw it
    shutil.rmtree(path, ignore_errors=True)
    if top == path:
        return
    for part in path.parents:  # top is one of them
        try:
            part.rmdir()
        except OSError:  # not empty (or gone): leave it and everything above
            return
        if part == top:
            return


@contextlib.contextmanager
def new_folder(path: Path, what: str) -> Iterator[Path | None]:
    """``make_folder(path, what)`` for the first steps of a job: if the block fails, what was
    made is removed again (``unmake_folder``). Yields ``first_missing(path)`` from before, for
    a later clean-up of the same kind."""
    made = first_missing(path)
    make_folder(path, what)
    try:
        yield made
    except BaseException:
        unmake_folder(path, made)
        raise


def require_writable_file(path: Path, what: str) -> None:
    """Raise a one-line ``ConfigError`` naming ``what`` unless ``path`` can be written: it is
    not a folder, and a file can be created in its folder (or in the nearest existing parent
    of a folder still to be made). Checked before a long job starts, so its result is not
    lost at the end; leaves nothing behind."""
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder, not a file")
    require_folder(path.parent, what)
    existing = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".segsweep-check.")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write {path} ({exc.strerror or exc})") from None
    os.close(handle)
    os.unlink(probe)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporaries that killed writers left in ``folder``; only for a folder that
    one writer owns (a run's checkpoints), where no other write can be in flight."""
    leftovers = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for tmp in leftovers:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return leftovers


def _lock_folder() -> Path:
    """Where this user's locks live: stable whatever the job's TMPDIR (a scheduler sets one
    per job), and one user's locks never block another's files."""
    candidates = [Path("/tmp"), Path(tempfile.gettempdir())]
    with contextlib.suppress(RuntimeError):  # no home (HOME unset, a uid with no passwd entry)
        candidates.insert(0, Path.home() / ".cache" / "segsweep" / "locks")
    for folder in candidates:
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
    raise ConfigError(f"cannot write a lock file in any of {', '.join(map(str, candidates))}")


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder`` (``only_writer``), keyed by its real path."""
    import hashlib

    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return _lock_folder() / f"segsweep-{os.getuid()}-{key}.lock"


def _same_file(path: Path, handle: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except OSError:
        return False


@contextlib.contextmanager
def only_writer(folder: Path, what: str) -> Iterator[None]:
    """Hold this user's lock on ``folder`` (a sweep's or a run's) while the block runs; a
    second process started on it meanwhile (``make demo`` twice, a ``--resume`` of a run still
    training) gets a one-line ``ConfigError`` naming the first one, instead of two writers of
    one state. Not reentrant: one process takes it once.

    The lock is a ``flock`` on a file outside ``folder`` (nothing is written beside a job that
    never starts), keyed by the folder's real path and removed on release. The kernel drops
    it when its holder exits, however it exits (a forked DataLoader worker shares it until it
    notices its parent is gone and exits too)."""
    import fcntl

    path = lock_path(folder)
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise ConfigError(
                f"{what} {folder} is in use by another segsweep process on this machine (pid "
                f"{holder}): wait for it to end, or stop it, before starting it again"
            ) from None
        except BaseException:
            os.close(handle)
            raise
        if _same_file(path, handle):  # else the holder before removed it after our open: again
            break
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        yield
    finally:
        if _same_file(path, handle):  # still ours: a process that opened it before retries
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(handle)  # releases the lock
