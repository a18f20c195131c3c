"""What the training loop, the runner and the sweep write a run to: the ``Tracker`` protocol,
and ``NullTracker``, which keeps nothing (tracking switched off).

A tracker owns one run. Its writes never wait for the store: a failed write surfaces at the
next ``check()`` or ``flush()`` as a ``TrackingError``; ``finish()`` ends the run once. The
implementations: ``mlflow_writer.RunTracker`` (MLflow), ``fake.FakeTracker`` (in memory, for
tests), ``NullTracker``; the contract suite (tests/test_tracker_contract.py) holds the first
two to the same records.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: An image, or a function that renders one (called only by a tracker that keeps images).
Image = np.ndarray | Callable[[], np.ndarray]


@runtime_checkable
class Tracker(Protocol):
    """One run's tracking, as the training loop, the runner and the sweep call it."""

    @property
    def run_id(self) -> str | None:
        """The run's id in its store; None where nothing is kept."""
        ...

    @property
    def resumed(self) -> bool:
        """Whether the run was found by its key and reopened, not created."""
        ...

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's params (secrets dropped, URI passwords hidden)."""
        ...

    def log_resumed_params(self, params: dict[str, Any]) -> None:
        """A resumed run's params: new ones are logged, changed ones said in a tag."""
        ...

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set tags (URI passwords hidden)."""
        ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics at ``step``; None and non-finite values are left out."""
        ...

    def log_image(self, image: Image, key: str, step: int) -> None:
        """An image at ``step`` under ``key`` (a function is rendered on the caller's thread)."""
        ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, into the folder ``artifact_path`` of the run's artifacts."""
        ...

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file``."""
        ...

    def check(self) -> None:
        """Raise ``TrackingError`` if a write has failed so far; never waits for the store."""
        ...

    def flush(self) -> None:
        """Wait until everything sent is written; raise ``TrackingError`` if a write failed."""
        ...

    def finish(
        self, status: str = "FINISHED", segsweep_status: str | None = None, unless_marked: str | None = None
    ) -> None:
        """Flush, then end the run with the MLflow ``status`` and the tag ``segsweep.status``,
        unless that tag already reads ``unless_marked``. Safe to call twice."""
        ...

    def ui_hint(self) -> str:
        """How a person finds this run."""
        ...


class NullTracker:
    """Tracking switched off (``tracking.enabled: false``); also the bench's baseline. It
    keeps nothing, and renders no image it is handed as a function."""

    run_id: str | None = None
    resumed = False
    writer_cpu_s = 0.0  # the bench reads it beside a RunTracker's

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_resumed_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image, key: str, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def check(self) -> None: ...
    def flush(self) -> None: ...
    def finish(
        self, status: str = "FINISHED", segsweep_status: str | None = None, unless_marked: str | None = None
    ) -> None: ...

    def ui_hint(self) -> str:
        return "tracking disabled"
