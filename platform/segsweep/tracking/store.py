"""The tracking store, through an ``MlflowClient``: connecting (SQLite made ready for
concurrent writers), the experiment, finding runs by tag, ending a run from outside its
tracker, and the read side that reports, dashboards and the CLI use: plain ``RunRecord``s
fetched in bulk, metric histories, stepped images and artifacts."""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segsweep.errors import ConfigError
from segsweep.files import require_writable_file
from segsweep.tracking.retries import with_retries
from segsweep.tracking.tags import TAG_KEY, TAG_STATUS
from segsweep.tracking.uris import local_artifact_root, resolve_uri, safe_tags, sqlite_path, uri_origin

# -- connecting and writing by run id -----------------------------------------------------------


def prepare_store(uri: str) -> None:
    """Make a local SQLite store ready for concurrent writers (WAL mode persists in the file)."""
    path = sqlite_path(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=60) as con:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")


def client_for(uri: str):
    """An ``MlflowClient`` on the store at ``uri`` (resolved), its HTTP retries set."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    prepare_store(uri)
    # An explicit client, never mlflow.set_tracking_uri: that exports MLFLOW_TRACKING_URI to
    # every child process, which would then silently write to this store.
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, made (or restored from deletion) if need be."""
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


# -- reading runs back (reports, dashboard): plain records, fetched in bulk ---------------------


@dataclass
class RunRecord:
    """One run as the reports read it: its latest metrics, params and tags."""

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
    """The id of an active experiment; a one-line error listing the others when there is none."""
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(
            f"--experiment: no experiment '{name}' in the tracking store; "
            f"experiments: {', '.join(names) or 'none'}"
        )
    return exp.experiment_id


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
    """Every experiment of the store: id and name."""
    client = client_for(resolve_uri(uri))
    return [{"id": e.experiment_id, "name": e.name} for e in client.search_experiments()]


def get_run(uri: str | None, run_id: str) -> RunRecord:
    """One run by id; a one-line error when the store has none."""
    client = client_for(resolve_uri(uri))
    try:
        r = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for unknown ids
        raise ConfigError(f"run {run_id}: not found in the tracking store") from None
    return RunRecord.of(r)


def metric_history(uri: str | None, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) points, by step."""
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
    """Fetch one artifact of a run into ``dest``; its local path."""
    client = client_for(resolve_uri(uri))
    return Path(client.download_artifacts(run_id, path, str(dest)))


def log_files(uri: str | None, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
    """Attach files to an existing (possibly finished) run."""
    client = client_for(resolve_uri(uri))
    for f in files:
        with_retries(lambda f=f: client.log_artifact(run_id, str(f), artifact_path), f"upload {f}", 120)
