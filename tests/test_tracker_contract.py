"""The tracker contract: the same calls on either tracker, ``RunTracker`` on a SQLite MLflow
store and the in-memory ``FakeTracker``, give the same records: status, params, tags, metric
histories, stepped images and artifacts. MLflow's are read back through the store's read side
(what reports and the dashboard read); the fake's from its runs.

A second tracking backend joins by adding a ``Backend`` here."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
from PIL import Image

from segsweep.tracking.fake import FakeRun, FakeStore, FakeTracker
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.protocol import NullTracker, Tracker
from segsweep.tracking.retries import TrackingError
from segsweep.tracking.store import client_for, download_artifact, get_run, image_artifacts, metric_history
from segsweep.tracking.tags import (
    STATUS_INTERRUPTED,
    TAG_CELL,
    TAG_ERROR,
    TAG_KEY,
    TAG_PARENT,
    TAG_RESUMED_WITH,
    TAG_STATUS,
)


@dataclass
class Records:
    """What a run holds once written, in plain data, the same shape for every backend."""

    status: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]  # the code state's tags (``segsweep.git_*``) aside: the fake keeps none
    metrics: dict[str, float]  # each metric's latest value
    history: dict[str, list[tuple[int, float]]]  # by step
    images: list[tuple[str, int, np.ndarray]]  # by key, then step
    artifacts: dict[str, bytes]  # but images


def without_code_state(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if not k.startswith("segsweep.git_")}


class Backend(Protocol):
    def open(self, **kwargs: object) -> Tracker:
        """A tracker on this backend's store, with ``RunTracker``'s arguments but the URI."""
        ...

    def read(self, run_id: str) -> Records: ...

    def mark(self, run_id: str, tag: str, value: str) -> None:
        """Set a tag from outside the run's tracker (what the sweep driver does)."""
        ...


class MlflowBackend:
    """``RunTracker`` on one SQLite store, read back through ``tracking.store``."""

    def __init__(self, uri: str, experiment: str, downloads: Path) -> None:
        self.uri, self.experiment, self.downloads = uri, experiment, downloads

    def open(self, **kwargs: object) -> Tracker:
        return RunTracker(self.uri, self.experiment, **kwargs)  # type: ignore[arg-type]

    def read(self, run_id: str) -> Records:
        run = get_run(self.uri, run_id)
        history = metric_history(self.uri, run_id, list(run.metrics))
        images = [
            (d["key"], d["step"], self._picture(run_id, d["path"])) for d in image_artifacts(self.uri, run_id)
        ]
        artifacts = {path: self._download(run_id, path).read_bytes() for path in self._files(run_id, None)}
        return Records(
            run.status,
            run.name,
            run.params,
            without_code_state(run.tags),
            run.metrics,
            history,
            images,
            artifacts,
        )

    def mark(self, run_id: str, tag: str, value: str) -> None:
        client_for(self.uri).set_tag(run_id, tag, value)

    def _files(self, run_id: str, folder: str | None) -> list[str]:
        """Every artifact's path, the stepped images' folder aside."""
        found: list[str] = []
        for entry in client_for(self.uri).list_artifacts(run_id, folder):
            if entry.is_dir and entry.path != "images":
                found += self._files(run_id, entry.path)
            elif not entry.is_dir:
                found.append(entry.path)
        return sorted(found)

    def _download(self, run_id: str, path: str) -> Path:
        dest = self.downloads / uuid.uuid4().hex
        dest.mkdir(parents=True)
        return download_artifact(self.uri, run_id, path, dest)

    def _picture(self, run_id: str, path: str) -> np.ndarray:
        with Image.open(self._download(run_id, path)) as picture:
            return np.asarray(picture)


class FakeBackend:
    """``FakeTracker``s sharing one ``FakeStore``, read back from its runs."""

    def __init__(self) -> None:
        self.store = FakeStore()

    def open(self, **kwargs: object) -> Tracker:
        return FakeTracker("contract", store=self.store, **kwargs)  # type: ignore[arg-type]

    def read(self, run_id: str) -> Records:
        run = self._run(run_id)
        history = {k: sorted(points) for k, points in run.history.items()}
        images = sorted(run.images, key=lambda image: (image[0], image[1]))
        return Records(
            run.status,
            run.name,
            dict(run.params),
            dict(run.tags),
            run.metrics,
            history,
            images,
            run.artifacts,
        )

    def mark(self, run_id: str, tag: str, value: str) -> None:
        self._run(run_id).tags[tag] = value

    def _run(self, run_id: str) -> FakeRun:
        [run] = [r for r in self.store.runs if r.run_id == run_id]
        return run


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module: made once (its schema takes seconds), an experiment a test."""
    return f"sqlite:///{tmp_path_factory.mktemp('contract') / 'mlflow.db'}"


@pytest.fixture(params=["mlflow", "fake"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "fake":
        return FakeBackend()
    uri = request.getfixturevalue("mlflow_uri")
    return MlflowBackend(uri, f"contract-{uuid.uuid4().hex[:8]}", tmp_path / "downloads")


PANEL = np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3)


def test_both_trackers_and_the_null_tracker_are_trackers() -> None:
    assert isinstance(NullTracker(), Tracker)
    assert isinstance(FakeTracker(), Tracker)
    assert all(hasattr(RunTracker, name) for name in ("log_params", "flush", "finish", "ui_hint"))


def test_a_run_reads_back_as_it_was_written(backend: Backend, tmp_path: Path) -> None:
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"\x00weights\xff")
    rendered: list[int] = []

    def panel() -> np.ndarray:  # rendered by a tracker that keeps images
        rendered.append(1)
        return PANEL

    tracker = backend.open(
        run_name="r1", tags={TAG_CELL: "method=fixmatch", "note": "at http://alice:hunter2@mlflow:5000"}
    )
    assert tracker.run_id and not tracker.resumed
    tracker.log_params(
        {"lr": 0.01, "api_token": "s3cret", "tracking.uri": "http://alice:hunter2@mlflow:5000"}
    )
    tracker.log_text("lr: 0.01\n", "config.yaml")
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "odd:name": float(step), "skipped": None}, step)
    tracker.log_metrics({"val/mIoU": 0.25, "nan": float("nan"), "inf": float("inf")}, 4)
    tracker.log_image(panel, "samples/val", 4)
    tracker.log_image(PANEL[::-1].copy(), "samples/val", 2)
    tracker.flush()
    tracker.log_artifact(checkpoint, "checkpoints")
    tracker.finish("FINISHED", "finished")
    tracker.finish("FAILED", "failed")  # a second ending changes nothing

    got = backend.read(tracker.run_id)
    assert rendered == [1]
    assert (got.status, got.name) == ("FINISHED", "r1")
    assert got.params == {"lr": "0.01", "tracking.uri": "http://alice:***@mlflow:5000"}
    assert got.tags == {
        TAG_CELL: "method=fixmatch",
        "note": "at http://alice:***@mlflow:5000",
        TAG_STATUS: "finished",
        "mlflow.runName": "r1",
        "mlflow.loggedImages": "True",
    }
    assert got.history == {
        "train/loss": [(s, 1.0 / (s + 1)) for s in range(5)],
        "odd_name": [(s, float(s)) for s in range(5)],
        "val/mIoU": [(4, 0.25)],
    }
    assert got.metrics == {"train/loss": 0.2, "odd_name": 4.0, "val/mIoU": 0.25}
    assert [(key, step) for key, step, _ in got.images] == [("samples/val", 2), ("samples/val", 4)]
    assert np.array_equal(got.images[0][2], PANEL[::-1]) and np.array_equal(got.images[1][2], PANEL)
    assert got.artifacts == {"checkpoints/last.pt": b"\x00weights\xff", "config.yaml": b"lr: 0.01\n"}


def test_a_failed_run_says_why_with_no_password(backend: Backend) -> None:
    tracker = backend.open(run_name="r2", parent_run_id="parent-1")
    tracker.log_metrics({"train/loss": 2.0}, 0)
    tracker.set_tags({TAG_ERROR: "store at http://bob:pw-long@mlflow:5000 went away"})
    tracker.finish("FAILED", "failed")
    got = backend.read(tracker.run_id)
    assert got.status == "FAILED"
    assert got.tags[TAG_STATUS] == "failed" and got.tags[TAG_PARENT] == "parent-1"
    assert got.tags[TAG_ERROR] == "store at http://bob:***@mlflow:5000 went away"
    assert got.history == {"train/loss": [(0, 2.0)]}


def test_a_rejected_write_fails_the_run_at_the_next_flush(backend: Backend) -> None:
    tracker = backend.open(run_name="r3")
    tracker.log_params({"lr": 0.1})
    tracker.flush()
    tracker.log_params({"lr": 0.2})  # MLflow keeps a param's first value: a change is refused
    with pytest.raises(TrackingError, match=r"^tracking store: log params failed: Changing param values"):
        tracker.flush()
    tracker.log_metrics({"after": 1.0}, 0)  # a failed run writes nothing more
    with pytest.raises(TrackingError):
        tracker.finish("FINISHED", "finished")
    got = backend.read(tracker.run_id)
    assert got.status == "FAILED" and got.params == {"lr": "0.1"} and got.history == {}
    assert got.tags[TAG_STATUS] == "failed"
    assert got.tags[TAG_ERROR].startswith("tracking store: log params failed: Changing param values")


def test_a_run_found_by_its_key_is_reopened_and_logs_each_step_once(backend: Backend) -> None:
    first = backend.open(run_name="r4", run_key="trial-7", steps_once=True)
    first.log_params({"lr": 0.1, "seed": 0})
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step)
    first.set_tags({TAG_ERROR: "killed at step 5"})
    first.finish("KILLED", "killed")

    again = backend.open(run_name="r4", run_key="trial-7", steps_once=True)
    assert again.resumed and again.run_id == first.run_id
    again.log_resumed_params({"lr": 0.2, "seed": 0, "extra": "yes"})
    for step in range(3, 9):  # from its checkpoint at step 3: steps 3-5 were logged already
        again.log_metrics({"loss": 10.0 + step}, step)
    again.finish("FINISHED", "finished")

    got = backend.read(first.run_id)
    assert got.status == "FINISHED"
    assert got.params == {"lr": "0.1", "seed": "0", "extra": "yes"}
    assert got.tags[TAG_RESUMED_WITH] == "lr: 0.1 -> 0.2"
    assert got.tags[TAG_STATUS] == "finished" and got.tags[TAG_KEY] == "trial-7" and TAG_ERROR not in got.tags
    assert got.history == {"loss": [(s, float(s)) for s in range(6)] + [(s, 10.0 + s) for s in range(6, 9)]}
    assert got.metrics == {"loss": 18.0}


def test_a_late_ending_leaves_the_drivers_mark(backend: Backend) -> None:
    tracker = backend.open(run_name="r5", run_key="trial-8")
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.flush()
    backend.mark(tracker.run_id, TAG_STATUS, STATUS_INTERRUPTED)
    tracker.finish("FINISHED", "stopped_early", unless_marked=STATUS_INTERRUPTED)
    got = backend.read(tracker.run_id)
    assert got.status == "RUNNING" and got.tags[TAG_STATUS] == STATUS_INTERRUPTED
