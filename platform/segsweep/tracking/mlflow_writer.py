"""The MLflow run writer: ``RunTracker`` owns one MLflow run.

Metrics, images and artifacts are queued and written by a background thread in batches, so a
training step never waits for the tracking store; ``flush()`` waits (the trainer flushes at
each evaluation, before reporting to a sweep) and re-raises a write that failed after its
retries, so a gap is never silent.

The default store is ``sqlite:///mlflow.db`` in the working folder, switched to WAL mode so
concurrent trials can write while others read; writes that still meet "database is locked"
are retried with backoff (``retries``).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segsweep.errors import first_line, redact
from segsweep.tracking.retries import TrackingError, authenticated, await_server, with_retries
from segsweep.tracking.store import client_for, end_run, ensure_experiment, runs_tagged, tag_run
from segsweep.tracking.tags import ENDING_TAGS, TAG_ERROR, TAG_KEY, TAG_PARENT, TAG_RESUMED_WITH, TAG_STATUS
from segsweep.tracking.uris import resolve_uri, safe_params, safe_tags

#: Niceness of the writer thread: on a small machine its requests (SQLAlchemy, PNG encoding)
#: would take a core from the training step's threads.
WRITER_NICE = 10

#: Seconds of metrics gathered into one write (a flush, an image or the run's end comes first).
#: Each write costs the SQLite store about 5 ms of CPU beside 60 us a metric; the UI's live
#: curves lag by about this much (plus the write, and any backlog).
METRIC_WINDOW_S = 5.0


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, _ - . / and space in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


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


def run_tags(tags: dict[str, str] | None, parent_run_id: str | None, run_key: str | None) -> dict[str, Any]:
    """The tags a run opens with: the code state, the caller's, its parent and its key."""
    all_tags: dict[str, Any] = {**git_state(), **(tags or {})}
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    if run_key:
        all_tags[TAG_KEY] = run_key
    return all_tags


class RunTracker:
    """One MLflow run, written asynchronously (a ``Tracker``).

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
        authenticated(self.uri)  # a refusal from here on is its auth database, not our login
        #: Per metric, the last step an earlier attempt of this run logged (read when needed).
        self._logged_through: dict[str, int] = {}
        self.steps_once = steps_once
        self._open(run_name, run_tags(tags, parent_run_id, run_key), run_key)
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

    def _open(self, run_name: str | None, all_tags: dict[str, Any], run_key: str | None) -> None:
        """Reopen the run with this key, or create one: sets ``run_id`` and ``resumed``."""
        existing = self._find(run_key) if run_key else None
        if existing is not None:
            self.run_id = existing
            self._reopen(all_tags)
            self.resumed = True
            return
        run = with_retries(
            lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=safe_tags(all_tags)),
            "create run",
            self.retry_budget_s,
        )
        self.run_id = run.info.run_id
        self.resumed = False

    def _reopen(self, tags: dict[str, Any]) -> None:
        """Continue a run an earlier attempt left (resumed from its checkpoint)."""
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        with_retries(lambda: c.update_run(rid, status="RUNNING"), "reopen run", budget)
        # The previous ending no longer holds: its status tag (left in place it would also stop
        # this attempt's ``finish(unless_marked=...)`` from closing), its error, the step a
        # scheduler stopped it at, the settings it was resumed with (this attempt tags its own).
        # The code state is this attempt's.
        old = with_retries(lambda: c.get_run(rid), "reopen run", budget).data.tags
        for key in ENDING_TAGS:
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
        """Write one queued item of ``kind`` to the store (on the writer thread)."""
        writers: dict[str, Callable[[Any], None]] = {
            "metrics": self._write_metrics,
            "params": self._write_params,
            "resumed_params": self._write_resumed_params,
            "tags": lambda tags: tag_run(self.client, self.run_id, tags, self.retry_budget_s),
            "image": self._write_image,
            "artifact": self._write_artifact,
            "text": self._write_text,
        }
        if kind in writers:
            writers[kind](payload)

    def _write_metrics(self, metrics: list[Any]) -> None:
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        if self.resumed and self.steps_once:
            metrics = self._not_logged_before(metrics)
        if metrics:
            with_retries(lambda: c.log_batch(rid, metrics=metrics, synchronous=True), "log metrics", budget)

    def _write_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            with_retries(lambda ch=chunk: c.log_batch(rid, params=ch, synchronous=True), "log params", budget)

    def _write_resumed_params(self, params: dict[str, str]) -> None:
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        logged = with_retries(lambda: c.get_run(rid), "read run", budget).data.params
        added = {k: v for k, v in params.items() if k not in logged}
        changed = [f"{k}: {logged[k]} -> {v}" for k, v in params.items() if k in logged and logged[k] != v]
        if added:
            self._write("params", added)
        if changed:
            self._write("tags", {TAG_RESUMED_WITH: "; ".join(changed)[:5000]})

    def _write_image(self, payload: tuple[np.ndarray, str, int, int]) -> None:
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        image, key, step, timestamp = payload
        with tempfile.TemporaryDirectory(prefix="segsweep-image-") as folder:
            write_stepped_image(Path(folder), image, key, step, timestamp)
            with_retries(lambda: c.log_artifacts(rid, folder, "images"), f"log image {key}", budget)
        if not self._images_tagged:  # the tag MlflowClient.log_image sets
            from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES

            with_retries(lambda: c.set_tag(rid, MLFLOW_LOGGED_IMAGES, "True"), f"log image {key}", budget)
            self._images_tagged = True

    def _write_artifact(self, payload: tuple[str, str | None]) -> None:
        path, artifact_path = payload
        c, rid, budget = self.client, self.run_id, self.retry_budget_s
        try:
            with_retries(lambda: c.log_artifact(rid, path, artifact_path), f"upload {path}", budget)
        except TrackingError as exc:
            raise TrackingError(f"{exc} (the file stays on local disk at {path})") from None

    def _write_text(self, payload: tuple[str, str]) -> None:
        text, name = payload
        with_retries(
            lambda: self.client.log_text(self.run_id, text, name), f"log {name}", self.retry_budget_s
        )

    def ui_hint(self) -> str:
        """How a person opens this run in the MLflow UI."""
        if self.uri.startswith("sqlite:///"):
            return (
                f"mlflow ui --backend-store-uri {self.uri} --port 5000, then open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            )
        return f"{redact(self.uri)}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
