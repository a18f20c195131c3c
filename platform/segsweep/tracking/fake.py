"""``FakeTracker``: a ``Tracker`` that keeps its runs in memory, as MLflow would hold them, for
tests that check what a run records without a store (and for a second backend's template).

What it keeps follows ``RunTracker`` on MLflow, which the contract suite
(tests/test_tracker_contract.py) holds it to: params as safe strings whose first value stays
(a changed value is a rejected write), tags with URI passwords hidden, one metric point per
logged value with names made MLflow-safe and non-finite values left out, stepped images,
artifacts by path, MLflow's run status and segsweep's status tag, a run found again by its
key and reopened. A rejected write surfaces at the next ``check()``/``flush()``, as the
writer thread's would. Left out: the code state tags (``segsweep.git_*``) and the tags MLflow
adds on its own, but for ``mlflow.runName`` and ``mlflow.loggedImages``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segsweep.errors import first_line
from segsweep.tracking.mlflow_writer import metric_name
from segsweep.tracking.protocol import Image
from segsweep.tracking.retries import TrackingError
from segsweep.tracking.tags import ENDING_TAGS, TAG_ERROR, TAG_KEY, TAG_PARENT, TAG_RESUMED_WITH, TAG_STATUS
from segsweep.tracking.uris import safe_params, safe_tags

#: The tags MLflow itself sets for a run's name and for "this run has images".
TAG_RUN_NAME = "mlflow.runName"
TAG_LOGGED_IMAGES = "mlflow.loggedImages"


@dataclass
class FakeRun:
    """One run as the fake holds it: what MLflow would hold for it."""

    run_id: str
    experiment: str
    name: str
    status: str = "RUNNING"  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    #: Per metric, its (step, value) points in the order they were logged.
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    #: Artifacts by their path in the run ("checkpoints/last.pt", "config.yaml"): their bytes.
    artifacts: dict[str, bytes] = field(default_factory=dict)
    #: Stepped images: (key, step, the picture), in the order they were logged.
    images: list[tuple[str, int, np.ndarray]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """Each metric's latest value: at its highest step, the last logged among equals."""
        return {
            k: max(enumerate(points), key=lambda ip: (ip[1][0], ip[0]))[1][1]
            for k, points in self.history.items()
        }


@dataclass
class FakeStore:
    """The runs of every ``FakeTracker`` that shares it, in the order they were made."""

    runs: list[FakeRun] = field(default_factory=list)

    def find(self, experiment: str, run_key: str) -> FakeRun | None:
        """The run of ``experiment`` whose key tag is ``run_key``, if any."""
        return next(
            (r for r in self.runs if r.experiment == experiment and r.tags.get(TAG_KEY) == run_key), None
        )


class FakeTracker:
    """One run, kept in a ``FakeStore`` (its own unless one is shared), written at once.

    Takes ``RunTracker``'s arguments but the store's URI and its retry budget."""

    def __init__(
        self,
        experiment: str = "fake",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        run_key: str | None = None,
        steps_once: bool = False,
        store: FakeStore | None = None,
    ) -> None:
        self.store = store if store is not None else FakeStore()
        self.steps_once = steps_once
        self._error: TrackingError | None = None
        self._closed = False
        #: Per metric, the last step an earlier attempt of this run logged.
        self._logged_through: dict[str, int] = {}
        opening = {**(tags or {})}
        if parent_run_id:
            opening[TAG_PARENT] = parent_run_id
        if run_key:
            opening[TAG_KEY] = run_key
        existing = self.store.find(experiment, run_key) if run_key else None
        self.resumed = existing is not None
        if existing is not None:
            self.run = existing
            self._reopen(opening)
        else:
            self.run = FakeRun(uuid.uuid4().hex, experiment, run_name or "")
            self.run.tags.update(safe_tags({**opening, **({TAG_RUN_NAME: run_name} if run_name else {})}))
            self.store.runs.append(self.run)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def _reopen(self, opening: dict[str, Any]) -> None:
        """Continue a run an earlier attempt left: what its ending said no longer holds."""
        self.run.status = "RUNNING"
        for key in ENDING_TAGS:
            self.run.tags.pop(key, None)
        fresh = {k: v for k, v in opening.items() if k not in (TAG_PARENT, TAG_KEY)}
        self.run.tags.update(safe_tags({**fresh, TAG_STATUS: "running"}))
        self._logged_through = {k: max(s for s, _ in points) for k, points in self.run.history.items()}

    def _apply(self, write: Callable[[], None]) -> None:
        """Make one write, unless an earlier one failed; a failure waits for ``check()``."""
        if self._error is not None:
            return  # the run already failed; as the writer does, nothing more is written
        try:
            write()
        except TrackingError as exc:
            self._error = exc

    # -- the Tracker protocol -------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._apply(lambda: self._write_params(safe_params(params)))

    def _write_params(self, params: dict[str, str]) -> None:
        for key, value in params.items():
            if key in self.run.params and self.run.params[key] != value:
                raise TrackingError(
                    "tracking store: log params failed: Changing param values is not allowed: "
                    f"'{key}' was logged as '{self.run.params[key]}', now '{value}'"
                )
        self.run.params.update(params)

    def log_resumed_params(self, params: dict[str, Any]) -> None:
        given, logged = safe_params(params), self.run.params
        added = {k: v for k, v in given.items() if k not in logged}
        changed = [f"{k}: {logged[k]} -> {v}" for k, v in given.items() if k in logged and logged[k] != v]
        if added:
            self._apply(lambda: self._write_params(added))
        if changed:
            self.set_tags({TAG_RESUMED_WITH: "; ".join(changed)[:5000]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._apply(lambda: self.run.tags.update(safe_tags(tags)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        def write() -> None:
            for key, value in metrics.items():
                if value is None or not np.isfinite(value):
                    continue
                name = metric_name(key)
                if self.resumed and self.steps_once and int(step) <= self._logged_through.get(name, -1):
                    continue  # the earlier attempt's point at this step stays
                self.run.history.setdefault(name, []).append((int(step), float(value)))

        self._apply(write)

    def log_image(self, image: Image, key: str, step: int) -> None:
        picture = np.asarray(image() if callable(image) else image)

        def write() -> None:
            self.run.images.append((metric_name(key), int(step), picture))
            self.run.tags[TAG_LOGGED_IMAGES] = "True"

        self._apply(write)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        def write() -> None:
            name = Path(path).name
            try:
                content = Path(path).read_bytes()
            except OSError as exc:
                raise TrackingError(
                    f"tracking store: upload {path} failed: {first_line(exc)} "
                    f"(the file stays on local disk at {path})"
                ) from None
            self.run.artifacts[f"{artifact_path}/{name}" if artifact_path else name] = content

        self._apply(write)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._apply(lambda: self.run.artifacts.__setitem__(artifact_file, text.encode()))

    def check(self) -> None:
        if self._error is not None:
            raise TrackingError(str(self._error)) from None

    def flush(self) -> None:
        self.check()

    def finish(
        self, status: str = "FINISHED", segsweep_status: str | None = None, unless_marked: str | None = None
    ) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        except TrackingError as exc:  # a write was rejected: the run failed
            self._end("FAILED", {TAG_STATUS: "failed", TAG_ERROR: first_line(exc)})
            raise
        if unless_marked is not None and self.run.tags.get(TAG_STATUS) == unless_marked:
            return
        self._end(status, {TAG_STATUS: segsweep_status} if segsweep_status else {})

    def _end(self, status: str, tags: dict[str, str]) -> None:
        self.run.tags.update(safe_tags(tags))
        self.run.status = status

    def ui_hint(self) -> str:
        return f"in-memory run {self.run_id} (FakeTracker)"
