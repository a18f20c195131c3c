"""MLflow at the edge: the only module that imports mlflow.

``RunTracker`` owns one MLflow run. Metrics, images and artifacts are queued and written by
a background thread in batches, so a training step never waits for the tracking store;
``flush()`` waits (the trainer flushes at each evaluation, before reporting to a sweep) and
re-raises a write that failed after its retries, so a gap is never silent.

The default store is ``sqlite:///mlflow.db`` in the working folder, switched to WAL mode so
concurrent trials can write while others read; writes that still meet "database is locked"
are retried with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from segsweep.errors import ConfigError, UserError, first_line, redact
from segsweep.files import require_writable_file
from segsweep.waiting import poll

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO chatter about table creation
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # segsweep prints its own
#: Credentials of an MLflow server; forwarded to the trials of a cluster sweep, never logged.
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

# Tags segsweep sets on its runs (the MLflow UI can filter and group on them).
TAG_KEY = "segsweep.run_key"  # a stable key: a resumed trial finds its run instead of duplicating
TAG_STATUS = "segsweep.status"  # finished | failed | diverged | stopped_early | killed | interrupted
TAG_ERROR = "segsweep.error"  # why a run failed, diverged or was cut short, in one line
TAG_STOPPED_AT = "segsweep.stopped_at_step"  # where a sweep's scheduler stopped a trial
TAG_RESUMED_WITH = "segsweep.resumed_with"  # settings a resume changed: "key: logged -> used; ..."
# Written by one module and read by others (reports, dashboards, the bench):
TAG_KIND = "segsweep.kind"  # "sweep" on a sweep's parent run
TAG_CELL = "segsweep.cell"  # a sweep trial's cell id, e.g. "method=fixmatch,ratio=0.25,seed=0"
TAG_PHASE = "segsweep.phase"  # a sweep trial's phase: search | final
TAG_SPLIT_FAMILY = "segsweep.split_family"  # which published split lists a run's split came from
#: The status the sweep driver gives the runs of trials an interrupt cut short.
STATUS_INTERRUPTED = "interrupted"
TAG_PARENT = "mlflow.parentRunId"
SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "credential")


class TrackingError(UserError):
    """The tracking store could not be written (after retries): the run fails loudly. Its
    message often quotes the store's URL (MLflow's own errors do): URI passwords are hidden
    once, here, wherever it is printed or tagged after."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(str(message)))


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use, absolute: trials run in other folders and must hit one store."""
    field = "tracking.uri"
    if not uri:  # MLflow's own convention (the compose image)
        uri, field = os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI"
    if not uri:
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if not path.startswith("/"):
            return f"sqlite:///{(Path.cwd() / path).resolve()}"
        return uri
    if scheme in ("http", "https", "postgresql", "postgresql+psycopg2", "mysql", "databricks"):
        return uri
    if scheme in ("", "file"):
        raise ConfigError(
            f"{field}: '{uri}': file stores are deprecated by MLflow; "
            "use sqlite:///path/mlflow.db or an http(s):// server"
        )
    raise ConfigError(f"{field}: unsupported scheme '{scheme}' in '{uri}'")


def is_secret_key(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow strings: secrets dropped, URI passwords hidden, long values cut."""
    out = {}
    for key, value in params.items():
        if is_secret_key(key):
            continue
        text = redact(str(value))
        out[key] = text if len(text) <= 6000 else text[:5997] + "..."
    return out


def safe_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as MLflow strings, URI passwords hidden (an error line may quote a URI)."""
    return {key: redact(str(value)) for key, value in tags.items()}


def tag_run(client: Any, run_id: str, tags: dict[str, Any], budget_s: float) -> None:
    """Set a run's tags (passwords hidden), with retries."""
    from mlflow.entities import RunTag

    batch = [RunTag(k, v) for k, v in safe_tags(tags).items()]
    with_retries(lambda: client.log_batch(run_id, tags=batch, synchronous=True), "set tags", budget_s)


def end_run(client: Any, run_id: str, status: str, tags: dict[str, Any], budget_s: float) -> None:
    """Tag a run with how it ended, then end it with the MLflow ``status``, with retries.

    The one way a run is ended: by its own tracker, or by a sweep's driver for a trial that
    could not end its run itself (stopped, killed, orphaned)."""
    if tags:
        tag_run(client, run_id, tags, budget_s)
    with_retries(lambda: client.set_terminated(run_id, status=status), "end run", budget_s)


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, _ - . / and space in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def prepare_store(uri: str) -> None:
    """Make a local SQLite store ready for concurrent writers (WAL mode persists in the file)."""
    path = sqlite_path(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=60) as con:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (absolute, whatever the cwd)."""
    path = sqlite_path(uri)
    return (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    prepare_store(uri)
    # An explicit client, never mlflow.set_tracking_uri: that exports MLFLOW_TRACKING_URI to
    # every child process, which would then silently write to this store.
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(uri))
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the segsweep checkout (empty when not in a git checkout)."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {
            "segsweep.git_commit": commit.stdout.strip(),
            "segsweep.git_dirty": str(bool(dirty.stdout.strip())).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {}


TRANSIENT_HINTS = (
    "database is locked",
    "connection",
    "timed out",
    "timeout",
    "temporarily",
    "max retries",
    "503",
    "502",
    "504",
    "500",
    "reset by peer",
    "refused",
    "unavailable",
    "broken pipe",
    # Two writers setting the same tag at once (a trial's worker and the sweep driver): the
    # SQL store's insert-or-update is not atomic; the retry updates.
    "unique constraint failed: tags",
)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a server restarting, a network hiccup, SQLite's writer lock. A local
    file error (permissions, not a directory, disk full) or a rejected request is not."""
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
        return False
    text = f"{type(exc).__name__}: {exc}".lower()
    if "resource_already_exists" in text or "invalid_parameter" in text or "401" in text or "403" in text:
        return False
    return any(hint in text for hint in TRANSIENT_HINTS)


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


@contextmanager
def local_server(folder: Path, budget_s: float = 120.0) -> Iterator[tuple[str, int]]:
    """An MLflow tracking server on 127.0.0.1, started as a process in a session of its own,
    with a SQLite store and proxied artifacts in ``folder``: training reaches the store over
    HTTP, as it reaches the compose deployment's server, and the store's work is the
    server's. Yields the URI and the server's process id, which is also its session id. On
    leaving (a SIGTERM included, in the main thread) every process of that session is ended.
    """
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri, log_path = f"http://127.0.0.1:{port}", folder / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{folder.resolve() / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(folder.resolve() / "artifacts")]
    # No job runner: MLflow starts one (and its consumer processes) beside a SQLite store, and
    # its polling is no part of what tracking costs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as out:
        server = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
        )
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


def runs_tagged(
    client: Any,
    experiment_id: str,
    tag: str,
    value: str,
    budget_s: float,
    where: str = "",
    limit: int = 50000,
) -> list[Any]:
    """Runs of an experiment whose ``tag`` equals ``value`` (and the extra ``where`` filter)."""
    query = f"tags.`{tag}` = '{value}'" + (f" and {where}" if where else "")
    return with_retries(
        lambda: client.search_runs([experiment_id], filter_string=query, max_results=limit),
        "search runs",
        budget_s,
    )


def finished_run(uri: str, experiment: str, run_key: str) -> tuple[str, dict[str, float]] | None:
    """The run id and latest metrics of a run with this key that already ended FINISHED.

    A resumed sweep may restart a trial whose run had finished just before the driver died;
    it reports these instead of reopening (and touching) a finished run.
    """
    client = with_retries(lambda: client_for(resolve_uri(uri)), "connect", 180)
    exp = with_retries(lambda: client.get_experiment_by_name(experiment), "find experiment", 180)
    if exp is None:
        return None
    runs = runs_tagged(client, exp.experiment_id, TAG_KEY, run_key, 180, "attributes.status = 'FINISHED'", 1)
    if not runs or runs[0].data.tags.get(TAG_STATUS) != "finished":
        return None
    return runs[0].info.run_id, dict(runs[0].data.metrics)


#: Niceness of the writer thread: on a small machine its requests (SQLAlchemy, PNG encoding)
#: would take a core from the training step's threads.
WRITER_NICE = 10

#: Seconds of metrics gathered into one write (a flush, an image or the run's end comes first).
#: Each write costs the SQLite store about 5 ms of CPU beside 60 us a metric; the UI's live
#: curves lag by about this much (plus the write, and any backlog).
METRIC_WINDOW_S = 5.0


def write_stepped_image(folder: Path, image: np.ndarray, key: str, step: int, timestamp_ms: int) -> None:
    """Write ``image`` into ``folder`` as the two files of MLflow's stepped-image layout, which
    the UI's image slider reads from a run's ``images/`` artifacts: the picture, and a
    thumbnail scaled to 256 px on its longer side.

    What ``MlflowClient.log_image(key=, step=)`` writes (the array converted and the
    thumbnail sized by MLflow's own functions), encoded for speed: it spent about 25 ms of
    the writer's CPU per sample panel (PNG at zlib level 6, WebP at its default effort, two
    uploads and a tag request each time); here PNG at level 1 and WebP at effort 0, and the
    caller uploads both in one call and sets MLflow's "this run has images" tag once per
    tracker. The layout is checked
    against MLflow's own in the tests, so a change in MLflow shows there.
    """
    from mlflow.tracking.multimedia import compress_image_size, convert_to_pil_image

    picture = convert_to_pil_image(image)
    stem = f"{key.replace('/', '~')}+step+{step}+timestamp+{timestamp_ms}+{uuid.uuid4()}"
    picture.save(folder / f"{stem}.png", compress_level=1)
    compress_image_size(picture).save(folder / f"{stem}+compressed.webp", method=0)


class RunTracker:
    """One MLflow run, written asynchronously.

    ``run_key``: a stable identity (e.g. sweep/trial id). If a run with that key exists in
    the experiment it is resumed instead of creating a duplicate (retries, ``--resume``).
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        run_key: str | None = None,
        retry_budget_s: float = 120.0,
        steps_once: bool = False,
    ) -> None:
        """``steps_once``: a training run, whose steps a resumed attempt trains again from its
        checkpoint; metric points at steps an earlier attempt logged are not logged twice."""
        from mlflow.entities import Metric, RunStatus

        self._Metric, self._RunStatus = Metric, RunStatus
        self.uri = resolve_uri(uri)
        self.retry_budget_s = retry_budget_s
        await_server(self.uri, retry_budget_s)
        self.client = with_retries(lambda: client_for(self.uri), "connect", retry_budget_s)
        self.experiment_id = with_retries(
            lambda: ensure_experiment(self.client, experiment, self.uri),
            "create experiment",
            retry_budget_s,
        )
        all_tags = {**git_state(), **(tags or {})}
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        if run_key:
            all_tags[TAG_KEY] = run_key
        #: Per metric, the last step an earlier attempt of this run logged (read when needed).
        self._logged_through: dict[str, int] = {}
        self.steps_once = steps_once
        existing = self._find(run_key) if run_key else None
        if existing is not None:
            self.run_id = existing
            self._reopen(all_tags)
            self.resumed = True
        else:
            run = with_retries(
                lambda: self.client.create_run(
                    self.experiment_id,
                    run_name=run_name,
                    tags=safe_tags(all_tags),
                ),
                "create run",
                retry_budget_s,
            )
            self.run_id = run.info.run_id
            self.resumed = False
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        #: Set when anything but metrics is queued: it ends the writer's metrics window early.
        #: Metrics wake the writer only to open a window, so a training step does not hand it
        #: the GIL at every step.
        self._urgent = threading.Event()
        self._error: BaseException | None = None
        #: CPU seconds the writer thread has used so far (what tracking costs the machine).
        self.writer_cpu_s = 0.0
        self._images_tagged = False  # MLflow's "this run has images" tag, set with the first
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="segsweep-tracker", daemon=True)
        self._thread.start()

    def _reopen(self, tags: dict[str, Any]) -> None:
        """Continue a run an earlier attempt left (resumed from its checkpoint)."""
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        with_retries(lambda: c.update_run(rid, status="RUNNING"), "reopen run", budget)
        # The previous ending no longer holds: its status tag (left in place it would also stop
        # this attempt's ``finish(unless_marked=...)`` from closing), its error, the step a
        # scheduler stopped it at, the settings it was resumed with (this attempt tags its own).
        # The code state is this attempt's.
        old = with_retries(lambda: c.get_run(rid), "reopen run", budget).data.tags
        for key in (TAG_ERROR, TAG_STOPPED_AT, TAG_RESUMED_WITH):
            if key in old:
                with_retries(lambda k=key: c.delete_tag(rid, k), "reopen run", budget)
        fresh = {k: v for k, v in tags.items() if k not in (TAG_PARENT, TAG_KEY)}
        self._write("tags", {**fresh, TAG_STATUS: "running"})

    def _not_logged_before(self, metrics: list[Any]) -> list[Any]:
        """A resumed run trains again the steps between its last checkpoint and where the
        earlier attempt stopped, which had logged them: those points stay, the new ones at
        the same steps are dropped, so each metric has one point per step, as an
        uninterrupted run has. (Its own later points are above every earlier step.)"""
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        for key in {m.key for m in metrics} - self._logged_through.keys():
            history = with_retries(lambda k=key: c.get_metric_history(rid, k), "read metric", budget)
            self._logged_through[key] = max((h.step for h in history), default=-1)
        return [m for m in metrics if m.step > self._logged_through[m.key]]

    def _find(self, run_key: str) -> str | None:
        runs = runs_tagged(self.client, self.experiment_id, TAG_KEY, run_key, self.retry_budget_s, limit=5)
        return runs[0].info.run_id if runs else None

    # -- producer side (training thread): never blocks on the store -------------------------
    def _send(self, kind: str, payload: Any) -> None:
        self._queue.put((kind, payload))
        self._urgent.set()

    def log_params(self, params: dict[str, Any]) -> None:
        self._send("params", safe_params(params))

    def log_resumed_params(self, params: dict[str, Any]) -> None:
        """A resumed run's params. MLflow keeps a param's first value; where this attempt
        runs with another (``--set`` on resume), the tag ``segsweep.resumed_with`` says so."""
        self._send("resumed_params", safe_params(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._send("tags", dict(tags))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [
            self._Metric(metric_name(k), float(v), now, int(step))
            for k, v in metrics.items()
            if v is not None and np.isfinite(v)
        ]
        if batch:
            self._queue.put(("metrics", batch))

    def log_image(self, image: np.ndarray | Callable[[], np.ndarray], key: str, step: int) -> None:
        """``image``, or a function that renders it: called here, on the caller's thread (it may
        need the model as it is now), and never by ``NullTracker``, so an untracked run does
        not pay for images nobody keeps."""
        image = image() if callable(image) else image
        now = int(time.time() * 1000)
        self._send("image", (np.asarray(image), metric_name(key), int(step), now))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send("artifact", (str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send("text", (text, artifact_file))

    def check(self) -> None:
        """Raise if a write has failed so far; never waits for the store."""
        if self._error is not None:
            raise TrackingError(str(self._error)) from None

    def flush(self) -> None:
        """Wait until everything queued is written; raise if a write failed."""
        done = threading.Event()
        self._send("flush", done)
        while not done.wait(0.5):
            if not self._thread.is_alive():
                break
        self.check()

    def finish(
        self, status: str = "FINISHED", segsweep_status: str | None = None, unless_marked: str | None = None
    ) -> None:
        """Flush, then end the run (FINISHED, FAILED or KILLED). Safe to call twice.

        ``unless_marked``: leave the run as it is if its status tag already reads this value.
        After an interrupt the sweep driver marks the runs it cut short ``interrupted`` once
        their workers have had time to close them; a worker slower than that must not
        overwrite the mark with its own ending.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        except TrackingError as exc:  # what was queued is not all written: the run failed
            self._end("FAILED", {TAG_STATUS: "failed", TAG_ERROR: first_line(exc)})
            raise
        except BaseException:  # Ctrl+C (or an exit) mid-flush: the run still ends, then it goes on
            self._end("KILLED", {TAG_STATUS: "killed"})
            raise
        self._end(status, {TAG_STATUS: segsweep_status} if segsweep_status else {}, unless_marked)

    def _end(self, status: str, tags: dict[str, str], unless_marked: str | None = None) -> None:
        """Stop the writer, then tag and terminate the run from this thread."""
        self._send("stop", None)
        self._thread.join(timeout=60)
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        if unless_marked is not None:
            run = with_retries(lambda: c.get_run(rid), "read run", budget)
            if run.data.tags.get(TAG_STATUS) == unless_marked:
                return
        end_run(c, rid, status, tags, budget)  # the writer thread has stopped: from here

    # -- consumer side (background thread) -----------------------------------------------------
    def _work(self) -> None:
        try:  # Linux: a thread's own nice value. Training threads get the cores first.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass
        pending: tuple[str, Any] | None = None
        while True:
            kind, payload = pending or self._queue.get()
            pending = None
            if kind == "stop":
                return
            if kind == "flush":
                payload.set()
                continue
            metrics = payload if kind == "metrics" else None
            if metrics is not None:
                metrics, pending = self._gather(metrics)
            if self._error is not None:
                continue  # the run already failed; drain the queue without writing
            try:
                self._write(kind, metrics if metrics is not None else payload)
            except TrackingError as exc:
                self._error = exc
            except Exception as exc:  # noqa: BLE001 - e.g. encoding an image, a full /tmp
                # A writer that died here would drop every later write and leave flush() and
                # check() nothing to report; the run fails at its next check instead.
                self._error = TrackingError(f"tracking: writing {kind} failed: {first_line(exc)}")
            self.writer_cpu_s = time.thread_time()  # this thread's own CPU time, since it began

    def _gather(self, metrics: list[Any]) -> tuple[list[Any], tuple[str, Any] | None]:
        """Coalesce the metrics of the next METRIC_WINDOW_S into one request (MLflow takes
        1000): one write per step would cost the training loop CPU time on a small machine.
        Anything else queued (a flush, an image, the end) ends the window at once; it is
        handed back to be written next."""
        deadline = time.monotonic() + METRIC_WINDOW_S
        while True:
            # Cleared, then the queue read, then the wait: what was queued before the clear is
            # found by the read (a flush left behind an image the last window ended on, say),
            # and whatever is sent after it sets the event again, so no wake-up is lost.
            self._urgent.clear()
            while True:
                try:
                    kind, payload = self._queue.get_nowait()
                except queue.Empty:
                    break
                if kind != "metrics" or len(metrics) + len(payload) > 1000:
                    return metrics, (kind, payload)
                metrics = metrics + payload
            left = deadline - time.monotonic()
            if left <= 0 or len(metrics) >= 1000:
                return metrics, None
            self._urgent.wait(left)

    def _write(self, kind: str, payload: Any) -> None:
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        if kind == "metrics":
            if self.resumed and self.steps_once:
                payload = self._not_logged_before(payload)
            if payload:
                with_retries(
                    lambda: c.log_batch(rid, metrics=payload, synchronous=True), "log metrics", budget
                )
        elif kind == "params":
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in payload.items()]
            for i in range(0, len(items), 100):
                chunk = items[i : i + 100]
                with_retries(
                    lambda ch=chunk: c.log_batch(rid, params=ch, synchronous=True), "log params", budget
                )
        elif kind == "resumed_params":
            logged = with_retries(lambda: c.get_run(rid), "read run", budget).data.params
            added = {k: v for k, v in payload.items() if k not in logged}
            changed = [
                f"{k}: {logged[k]} -> {v}" for k, v in payload.items() if k in logged and logged[k] != v
            ]
            if added:
                self._write("params", added)
            if changed:
                self._write("tags", {TAG_RESUMED_WITH: "; ".join(changed)[:5000]})
        elif kind == "tags":
            tag_run(c, rid, payload, budget)
        elif kind == "image":
            image, key, step, timestamp = payload
            with tempfile.TemporaryDirectory(prefix="segsweep-image-") as folder:
                write_stepped_image(Path(folder), image, key, step, timestamp)
                with_retries(lambda: c.log_artifacts(rid, folder, "images"), f"log image {key}", budget)
            if not self._images_tagged:  # the tag MlflowClient.log_image sets
                from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES

                with_retries(lambda: c.set_tag(rid, MLFLOW_LOGGED_IMAGES, "True"), f"log image {key}", budget)
                self._images_tagged = True
        elif kind == "artifact":
            path, artifact_path = payload
            try:
                with_retries(lambda: c.log_artifact(rid, path, artifact_path), f"upload {path}", budget)
            except TrackingError as exc:
                raise TrackingError(f"{exc} (the file stays on local disk at {path})") from None
        elif kind == "text":
            text, name = payload
            with_retries(lambda: c.log_text(rid, text, name), f"log {name}", budget)

    def ui_hint(self) -> str:
        """How a person opens this run in the MLflow UI."""
        if self.uri.startswith("sqlite:///"):
            return (
                f"mlflow ui --backend-store-uri {self.uri} --port 5000, then open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            )
        return f"{redact(self.uri)}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


class NullTracker:
    """Tracking switched off (``tracking.enabled: false``); also the bench's baseline."""

    run_id: str | None = None
    resumed = False
    writer_cpu_s = 0.0

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_resumed_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: np.ndarray | Callable[[], np.ndarray], key: str, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def check(self) -> None: ...
    def flush(self) -> None: ...
    def finish(
        self, status: str = "FINISHED", segsweep_status: str | None = None, unless_marked: str | None = None
    ) -> None: ...

    def ui_hint(self) -> str:
        return "tracking disabled"


Tracker = RunTracker | NullTracker


# ---------------------------------------------------------------------------------------------
# Reading runs back (reports, dashboard): plain records, fetched in bulk


@dataclass
class RunRecord:
    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    end_time: int = 0  # ms since the epoch; 0 while the run is open

    @classmethod
    def of(cls, r: Any) -> RunRecord:
        """From an ``mlflow.entities.Run``."""
        return cls(
            r.info.run_id,
            r.info.experiment_id,
            r.info.run_name or "",
            r.info.status,
            r.info.start_time or 0,
            dict(r.data.params),
            dict(r.data.metrics),
            dict(r.data.tags),
            r.info.end_time or 0,
        )


def experiment_id_of(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(
            f"--experiment: no experiment '{name}' in the tracking store; "
            f"experiments: {', '.join(names) or 'none'}"
        )
    return exp.experiment_id


def uri_origin(*given: tuple[str | None, str]) -> tuple[str | None, str]:
    """The store URI a command was given and what an error about it should name: the first
    of the (value, flag or field) pairs, in order of precedence, with a value; with none,
    (None, the environment variable or default ``resolve_uri`` will use)."""
    for uri, named in given:
        if uri:
            return uri, named
    return None, "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default store"


def existing_store(uri: str | None, must_exist: bool = True, what: str | None = None) -> str:
    """``uri`` resolved and checked before anything is started or written: a SQLite path
    with no file (``must_exist``; otherwise its folder must be writable, so the store can be
    made), a folder, or a file that is no SQLite database, is a one-line error naming
    ``what`` (the flag or field the URI came from; by default ``--tracking-uri``, or with no
    URI the environment variable or default store used) and the path. Commands that only
    read a store never create one."""
    what = what or uri_origin((uri, "--tracking-uri"))[1]
    resolved = resolve_uri(uri)
    path = sqlite_path(resolved)
    if path is None:
        return resolved
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder, not an MLflow store")
    if not path.exists():
        if must_exist:
            raise ConfigError(
                f"{what}: no MLflow store at {path} (runs and sweeps create it; "
                "run this where they ran, or pass --tracking-uri)"
            )
        require_writable_file(path, what)
        return resolved
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    if head not in (b"", b"SQLite format 3\x00"):  # empty: a store just created, still unwritten
        raise ConfigError(f"{what}: {path} is not an MLflow store (not a SQLite database)")
    return resolved


def fetch_runs(uri: str | None, experiment: str) -> list[RunRecord]:
    """Every active run of ``experiment`` with its latest metrics, 1,000 per request."""
    client = client_for(existing_store(uri))
    exp_id = experiment_id_of(client, experiment)
    out: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        out += [RunRecord.of(r) for r in page]
        token = page.token
        if not token:
            return out


def list_experiments(uri: str | None) -> list[dict[str, str]]:
    client = client_for(resolve_uri(uri))
    return [{"id": e.experiment_id, "name": e.name} for e in client.search_experiments()]


def get_run(uri: str | None, run_id: str) -> RunRecord:
    client = client_for(resolve_uri(uri))
    try:
        r = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for unknown ids
        raise ConfigError(f"run {run_id}: not found in the tracking store") from None
    return RunRecord.of(r)


def metric_history(uri: str | None, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    client = client_for(resolve_uri(uri))
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def image_artifacts(uri: str | None, run_id: str) -> list[dict[str, Any]]:
    """Images logged with a step (``log_image``): key, step and artifact path of each."""
    client = client_for(resolve_uri(uri))
    found = []
    for f in client.list_artifacts(run_id, "images"):
        if f.is_dir or not f.path.endswith(".png"):
            continue
        # MLflow names them "<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>.png"
        name = f.path.split("/", 1)[1]
        m = re.match(r"(?P<key>.+?)\+step\+(?P<step>\d+)\+timestamp\+", name)
        if m:
            found.append({"key": m["key"].replace("~", "/"), "step": int(m["step"]), "path": f.path})
    return sorted(found, key=lambda d: (d["key"], d["step"]))


def download_artifact(uri: str | None, run_id: str, path: str, dest: Path) -> Path:
    client = client_for(resolve_uri(uri))
    return Path(client.download_artifacts(run_id, path, str(dest)))


def log_files(uri: str | None, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
    """Attach files to an existing (possibly finished) run."""
    client = client_for(resolve_uri(uri))
    for f in files:
        with_retries(lambda f=f: client.log_artifact(run_id, str(f), artifact_path), f"upload {f}", 120)
