"""Waiting for something outside the process to answer: a server, a Ray head, a store.

One loop for those waits, so each backs off, keeps its deadline and says why it gave up in the
same way; the callers differ only in what they ask (a TCP connect, an HTTP ``/health``, an
MLflow call). Grace periods for processes to end (``tracking.stop_session``, the sweep's wait
for trials to close) are plain deadlines and stay where they are.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def poll(
    probe: Callable[[], str | None],
    budget_s: float,
    *,
    delay_s: float = 1.0,
    max_delay_s: float = 8.0,
    on_wait: Callable[[str, float, int], None] | None = None,
) -> str | None:
    """Call ``probe`` until it returns None (ready) and return None; a string is why it is
    not ready yet. Between calls sleep ``delay_s``, doubling up to ``max_delay_s``; before
    each sleep ``on_wait(reason, delay, n)`` is told (``n`` counts the waits from 0). When
    the next sleep would pass ``budget_s``, return the last reason instead: the caller words
    the error. An exception from ``probe`` ends the wait (a failure not worth retrying)."""
    deadline, delay, waits = time.monotonic() + budget_s, delay_s, 0
    while True:
        reason = probe()
        if reason is None:
            return None
        if time.monotonic() + delay > deadline:
            return reason
        if on_wait is not None:
            on_wait(reason, delay, waits)
        time.sleep(delay)
        delay, waits = min(delay * 2, max_delay_s), waits + 1


def said_once(line: Callable[[str], str]) -> Callable[[str, float, int], None]:
    """An ``on_wait`` for ``poll`` that prints ``line(reason)`` on stderr at the first wait only."""

    def note(reason: str, _: float, waits: int) -> None:
        if waits == 0:
            print(line(reason), file=sys.stderr, flush=True)

    return note


def unanswered(host: str, port: int, timeout_s: float) -> str | None:
    """Why ``host:port`` takes no TCP connection now, or None when it does."""
    import socket

    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout_s).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None
