"""Ctrl+C and SIGTERM while a sweep runs: the first stops it gracefully, a second at once.

The handlers only set ``INTERRUPT``; ``ray_tune.SweepCallback`` hands it to Ray Tune inside
``fit()`` (a signal between two fits would reach a stale Ray handler and be lost).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from segsweep.errors import Interrupted

#: Set by Ctrl+C or SIGTERM while a sweep runs; ``SweepCallback`` hands it to Ray Tune.
INTERRUPT = threading.Event()


class SweepInterrupted(Interrupted):
    def __init__(self, name: str) -> None:
        super().__init__(f"sweep '{name}' interrupted; continue it with --resume")


def on_signal(signum: int, frame: Any) -> None:
    """First signal: stop gracefully (Ray saves the experiment state, then ends the running
    trials, which ``--resume`` runs again). A second one: quit at once."""
    if INTERRUPT.is_set():
        raise KeyboardInterrupt
    INTERRUPT.set()
    print(
        "\ninterrupted: saving the sweep's state and stopping its trials (again to quit at once)",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def signals_caught() -> Iterator[None]:
    """Ctrl+C and SIGTERM set ``INTERRUPT`` while the block runs (Ray's own SIGINT handler
    off); the handlers before are restored after it."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    INTERRUPT.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
