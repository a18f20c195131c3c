"""User-facing errors.

Anything the user can fix (a config field, a dataset file, a sweep spec) raises a
``UserError``. The CLI prints it as one line, ``error: <message>``, and exits with code 2;
no traceback is shown. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """An input the user can fix. The message names the file or field at fault."""

    exit_code = 2


class ConfigError(UserError):
    """A run config or sweep spec is missing, malformed or invalid."""


class DataError(UserError):
    """A dataset root, split list, image or mask is missing or unreadable."""


class OutOfMemory(UserError):
    """A run's batches do not fit in its device's memory: the message names the settings."""


class Interrupted(UserError):
    """Ctrl+C or SIGTERM ended the work; the message says what was kept and how to go on."""

    exit_code = 130


class Diverged(Exception):
    """The training loss became NaN or infinite. Not retried: the same seed diverges again."""

    def __init__(self, step: int, name: str, value: float) -> None:
        super().__init__(f"loss '{name}' is {value} at step {step}: the run diverged")
        self.step = step


class InjectedFailure(RuntimeError):
    """``debug.fail_at_step``: a deliberate crash standing for a real one (tests of retries and
    resume). A sweep retries it like any crash; ``segsweep run`` reports it in one line, exit 1."""


class Stopped(Exception):
    """A sweep's scheduler stopped this trial early (not an error: its run ends FINISHED)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its type's name
    when it has none: a driver's or a server's error, reported in one line."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as a single line.

    DataLoader workers re-raise an exception as ``<type>(traceback text)``; the useful line is
    the last one, ``pkg.module.DataError: <message>``, so strip it back to ``<message>``.
    """
    text = str(exc).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1].strip()
    name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def user_message(exc: BaseException) -> str | None:
    """The one-line message of a ``UserError``, also when a DataLoader worker re-raised it as
    ``RuntimeError(traceback text)``; None for anything else (a bug keeps its traceback)."""
    if isinstance(exc, UserError):
        return one_line(exc)
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("DataError: " in text or "ConfigError: " in text):
        return one_line(exc).split("Error: ", 1)[-1]
    return None


#: ``scheme://``, a user (which may hold "@": Azure's ``bob@server``), ":", then a password
#: up to the last "@" of the token: SQLAlchemy takes a raw "@", "/", "#", "?" or "," in it, so
#: only white space, a double quote or "<>" end a token. Where a URL's path or query holds an
#: "@" (``https://host:5000/a@b``) the part before it is hidden too: shown less, never leaked.
_URI_USERINFO = re.compile(r"""\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s/:\[\]"<>]*):([^\s"<>]*)@""")


def redact(value: str) -> str:
    """Hide the password of every URI in ``value`` (``http://user:pw@host`` ->
    ``http://user:***@host``), a URI alone or quoted in a message (an error line)."""
    return _URI_USERINFO.sub(r"\1\2:***@", value)
