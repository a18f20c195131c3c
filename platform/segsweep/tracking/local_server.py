"""A local MLflow tracking server for the bench and the tests: started as a process in a
session of its own, and ended with every process of that session, a SIGTERM included.

Nothing in a run or a sweep uses it; they reach whatever server ``tracking.uri`` names."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segsweep.tracking.retries import TrackingError
from segsweep.waiting import poll

log = logging.getLogger(__name__)


@dataclass
class Member:
    """A process of a session, as ``/proc`` shows it."""

    pid: int
    state: str  # "Z": a zombie, ended but not yet reaped
    cpu_s: float  # user + system CPU seconds, its own and its reaped children's


def session_members(session_id: int) -> list[Member] | None:
    """The processes of one session (Linux ``/proc``); None where there is no ``/proc``."""
    proc = Path("/proc")
    if not (proc / "self/stat").exists():
        return None
    ticks, members = os.sysconf("SC_CLK_TCK"), []
    for stat in proc.glob("[0-9]*/stat"):
        try:  # after the name (which may hold spaces and parentheses): state, ppid, pgrp, session
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while being read
        if int(fields[3]) == session_id:
            cpu = sum(int(f) for f in fields[11:15]) / ticks  # utime, stime, cutime, cstime
            members.append(Member(int(stat.parent.name), fields[0], cpu))
    return members


def session_running(session_id: int) -> list[int] | None:
    """The pids of one session's processes still running (zombies aside); None where there
    is no ``/proc``."""
    members = session_members(session_id)
    return None if members is None else [m.pid for m in members if m.state != "Z"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` in a session of its own, with a SQLite store and
    proxied artifacts in ``folder``, its output in ``folder/server.log``."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{folder.resolve() / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(folder.resolve() / "artifacts")]
    # No job runner: MLflow starts one (and its consumer processes) beside a SQLite store, and
    # its polling is no part of what tracking costs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "server.log", "wb") as out:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
        )


def await_health(server: subprocess.Popen, uri: str, log_path: Path, budget_s: float) -> None:
    """Wait until the server at ``uri`` says OK on its ``/health``; a TrackingError if it
    exits first (its log's last line) or does not answer within ``budget_s``."""
    import urllib.request

    def ready() -> str | None:
        if server.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines() or ["no output"]
            raise TrackingError(f"mlflow server exited at start ({server.returncode}): {lines[-1]}")
        try:  # its own answer: another program that took the port would not say OK
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                said_ok = reply.read().strip() == b"OK"
        except OSError as exc:
            return str(exc)
        return None if said_ok and server.poll() is None else "its /health did not say OK"

    why = poll(ready, budget_s, delay_s=0.25, max_delay_s=0.25)
    if why is not None:
        raise TrackingError(f"mlflow server at {uri} did not answer within {budget_s:.0f}s ({why})")


@contextmanager
def local_server(folder: Path, budget_s: float = 120.0) -> Iterator[tuple[str, int]]:
    """An MLflow tracking server on 127.0.0.1, started as a process in a session of its own,
    with a SQLite store and proxied artifacts in ``folder``: training reaches the store over
    HTTP, as it reaches the compose deployment's server, and the store's work is the
    server's. Yields the URI and the server's process id, which is also its session id. On
    leaving (a SIGTERM included, in the main thread) every process of that session is ended.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(folder, port)
    # Python's default SIGTERM skips ``finally``, which would leave the server running: in the
    # main thread a SIGTERM becomes SystemExit meanwhile (a handler set outside Python, which
    # getsignal reports as None, could not be put back: then it stays).
    previous = (
        signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    )

    def on_sigterm(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the cleanup must finish
        sys.exit(128 + signal.SIGTERM)

    try:
        if previous is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
        await_health(server, uri, folder / "server.log", budget_s)
        yield uri, server.pid
    finally:
        try:
            stop_session(server)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def stop_session(leader: subprocess.Popen) -> None:
    """End every process of the session ``leader`` began (SIGTERM, then SIGKILL after 20 s)
    and return once none is left running; warn of any that outlived both."""

    def running() -> list[int] | None:
        leader.poll()  # reaped, the leader no longer counts
        return session_running(leader.pid)

    left = running()
    if left is None:  # no /proc: the leader's process group is what can be reached
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=20)
        return
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        for pid in left or []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = running()
        if not left:
            return
    log.warning("processes of the mlflow server's session still run: %s", left)
