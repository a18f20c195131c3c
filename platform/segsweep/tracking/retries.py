"""A tracking store that hiccups: ``TrackingError`` (the store could not be written), which
failures are worth retrying, retrying them with backoff, and waiting for a server to answer.

The default SQLite store meets "database is locked" under concurrent trials; a server meets
restarts and network hiccups. Either is retried for a budget of seconds, then the run fails
loudly in one line, URI passwords hidden."""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from segsweep.errors import UserError, first_line, redact
from segsweep.waiting import poll

log = logging.getLogger(__name__)


class TrackingError(UserError):
    """The tracking store could not be written (after retries): the run fails loudly. Its
    message often quotes the store's URL (MLflow's own errors do): URI passwords are hidden
    once, here, wherever it is printed or tagged after."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(str(message)))


TRANSIENT_HINTS = (
    "database is locked",
    "connection",
    "timed out",
    "timeout",
    "temporarily",
    "max retries",
    "reset by peer",
    "refused",
    "unavailable",
    "broken pipe",
    # Two writers setting the same tag at once (a trial's worker and the sweep driver): the
    # SQL store's insert-or-update is not atomic; the retry updates.
    "unique constraint failed: tags",
)


#: HTTP statuses, as whole numbers: a run ID (32 hex digits) often holds "500" or "403".
TRANSIENT_STATUS = re.compile(r"\b50[0234]\b")
REFUSED_STATUS = re.compile(r"\b40[13]\b")


#: Servers (``scheme://host:port``) known to take this process's credentials: the sweep's
#: server once its driver used it, any server once a run was opened there. A 401 or 403 from one
#: of them is its auth database not answering (MLflow's basic-auth app refuses every request
#: while PostgreSQL restarts), retried like a 503; from any other server it is a wrong login.
AUTHENTICATED: set[str] = set()


def origin(uri: str) -> str:
    """``scheme://host:port`` of an http(s) URI, without its user and password."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}".lower()


def authenticated(uri: str) -> None:
    """Remember that ``uri``'s server took this process's credentials (see ``AUTHENTICATED``)."""
    if uri.startswith(("http://", "https://")):
        AUTHENTICATED.add(origin(uri))


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a server restarting, a network hiccup, SQLite's writer lock, a server
    that took our login before refusing it now. A local file error (permissions, not a
    directory, disk full) or a rejected request is not."""
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
        return False
    text = f"{type(exc).__name__}: {exc}".lower()
    if REFUSED_STATUS.search(text):
        return any(f"{server}/" in text for server in AUTHENTICATED)
    if "resource_already_exists" in text or "invalid_parameter" in text:
        return False
    return any(hint in text for hint in TRANSIENT_HINTS) or bool(TRANSIENT_STATUS.search(text))


def with_retries(fn: Callable[[], Any], what: str, budget_s: float) -> Any:
    """Call ``fn``; retry transient failures with backoff (0.25 s doubling to 8 s) for up to
    ``budget_s``; raise a one-line TrackingError naming ``what`` when it gives up."""
    result: list[Any] = []

    def attempt() -> str | None:
        try:
            result.append(fn())
            return None
        except Exception as exc:  # noqa: BLE001 - classified here: retried or reported
            if not is_transient(exc):
                raise TrackingError(f"tracking store: {what} failed: {first_line(exc)}") from None
            return redact(first_line(exc))  # MLflow's text quotes the URL, userinfo included

    def note(reason: str, delay: float, _: int) -> None:
        log.warning("tracking store: %s failed (%s); retrying in %.1fs", what, reason, delay)

    reason = poll(attempt, budget_s, delay_s=0.25, on_wait=note)
    if reason is not None:
        raise TrackingError(f"tracking store: {what} failed after {budget_s:.0f}s of retries: {reason}")
    return result[0]


def await_server(uri: str, budget_s: float) -> None:
    """For an http(s) store: wait until the server answers (its ``/health``), saying so once on
    stderr, for up to ``budget_s``. MLflow's own HTTP retries would hold a run silent for
    minutes before the first error reached us."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    parts = urlsplit(uri)
    health = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], path=parts.path.rstrip("/") + "/health")

    def answers() -> str | None:
        try:
            urllib.request.urlopen(health.geturl(), timeout=5).close()
        except urllib.error.HTTPError:
            pass  # it answers (a login, a proxy's 404): MLflow's own calls say what is wrong
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            if not isinstance(reason, ssl.SSLError):  # else it answers; TLS is MLflow's business
                return str(reason)
        return None

    def note(reason: str, _: float, waits: int) -> None:
        if waits == 0:
            log.warning(
                "tracking store: %s does not answer (%s); waiting up to %.0fs", redact(uri), reason, budget_s
            )

    reason = poll(answers, budget_s, on_wait=note)
    if reason is not None:
        raise TrackingError(f"tracking store: {redact(uri)} did not answer within {budget_s:.0f}s ({reason})")
