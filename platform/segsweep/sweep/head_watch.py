"""The Ray head of a cluster, watched while a sweep drives trials on it.

Without a head (its GCS) the cluster is gone: the trials on every node are lost with it, and
Ray's own driver waits a minute for it, then ends the process with a fatal log of its own.
The watch says it sooner, in one line with the command that continues the sweep once the head
is back: Ray's experiment state, the checkpoints and the MLflow runs let ``--resume`` go on
where the sweep was (``tests/test_cluster.py``).
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from collections.abc import Callable

from segsweep.errors import redact
from segsweep.waiting import unanswered

#: Seconds without an answer from the head before the sweep is ended: a head does not come
#: back by itself (a new one has none of the old one's state), so a short grace is enough.
HEAD_LOST_S = 6.0
PROBE_EVERY_S = 1.0


def resume_command(argv: list[str]) -> str:
    """The command line that continues this sweep: as it was typed, with ``--resume``, any
    password in a URI hidden."""
    args = [redact(a) for a in argv]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["segsweep", *args])


def watch_head(
    address: str,
    continue_with: str,
    gone: Callable[[str], None] | None = None,
) -> threading.Event:
    """Probe the head at ``HOST:PORT`` every second from a daemon thread; when it has not
    answered for ``HEAD_LOST_S``, call ``gone`` with the line to print (by default: print it
    and end the process with exit code 1, as Ray's driver cannot go on). Set the event returned
    to stop watching. Other address forms (``auto``, ``ray://``) are not watched."""
    stop = threading.Event()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or address.startswith("ray://"):
        return stop

    def end(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        os._exit(1)  # Ray's threads would hold a normal exit for a minute

    def run() -> None:
        silent_since = None
        while not stop.wait(PROBE_EVERY_S):
            reason = unanswered(host, int(port), PROBE_EVERY_S)
            if reason is None:
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= HEAD_LOST_S and not stop.is_set():
                (gone or end)(
                    f"error: the Ray head at {address} is gone ({reason} for {HEAD_LOST_S:.0f}s): the trials "
                    f"on the cluster are lost with it; once it is back, continue the sweep with: {continue_with}"
                )
                return

    threading.Thread(target=run, name="segsweep-head-watch", daemon=True).start()
    return stop
