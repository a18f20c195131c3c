"""Sweeps through Ray Tune: per-cell early stopping, a tiny real sweep and what it leaves in
MLflow and Optuna, a trial retried from its checkpoint, and resume after the driver is killed."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import assert_user_error, pinned_to_one_cpu, runs_in, segsweep, tiny_spec, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _signal_handlers_as_they_were(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ray Tune's ``fit()`` in this process installs its own SIGINT and SIGUSR1 handlers and
    leaves them: a later test (or the session's Ctrl+C) would find no KeyboardInterrupt."""
    monkeypatch.setenv("TUNE_DISABLE_SIGINT_HANDLER", "1")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# Per-cell early stopping, on a synthetic trainable whose score depends on the cell


def _trainable(config: dict) -> None:
    from ray import tune

    base = {"low": 0.1, "high": 0.8}[config["cell"]]
    for step in range(1, 9):
        tune.report({"step": step, "tune/mIoU": base + config["quality"] * 0.01 * step})


def _finished_per_cell(scheduler: object, storage: Path) -> dict[str, int]:
    from ray import tune

    grid = {"cell": tune.grid_search(["high", "low"]), "quality": tune.grid_search([4, 3, 2, 1])}
    tuner = tune.Tuner(
        _trainable,
        param_space=grid,
        tune_config=tune.TuneConfig(
            scheduler=scheduler, metric="tune/mIoU", mode="max", max_concurrent_trials=1
        ),
        run_config=tune.RunConfig(verbose=0, storage_path=str(storage)),
    )
    out = {"high": 0, "low": 0}
    for r in tuner.fit():
        if r.metrics["step"] == 8:
            out[r.config["cell"]] += 1
    return out


def test_early_stopping_compares_trials_only_within_their_cell(tmp_path: Path) -> None:
    import ray
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from segsweep.sweep.ray_tune import CellScheduler

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        per_cell = _finished_per_cell(
            CellScheduler({"high": 8, "low": 8}, "tune/mIoU", "max", 1, 2), tmp_path
        )
        pooled = _finished_per_cell(
            AsyncHyperBandScheduler(
                time_attr="step",
                max_t=8,
                grace_period=1,
                reduction_factor=2,
                brackets=1,
                stop_last_trials=False,
            ),
            tmp_path,
        )
    finally:
        ray.shutdown()
    # One ASHA over all cells stops every low-ratio trial because high-ratio trials score higher ...
    assert pooled["low"] == 0 and pooled["high"] >= 1
    # ... per-cell ASHA keeps the best trials of each cell running to the end ...
    assert per_cell["low"] >= 1 and per_cell["high"] >= 1
    # ... and still stops the weak ones inside a cell.
    assert per_cell["low"] < 4


def _slow_to_close(config: dict) -> None:
    """Stopped after step 2; like a trial closing its MLflow run, it takes 4 s to end."""
    from ray import tune

    try:
        for step in range(1, 9):
            tune.report({"step": step})
    except SystemExit:  # how Ray ends a stopped trial's thread at its next report
        time.sleep(4)
        raise


@pytest.mark.timeout(300)  # without the fix Ray hangs or fails the next trial
def test_a_worker_is_reused_after_a_trial_slow_to_close(tmp_path: Path) -> None:
    """Ray waits 2 s for a stopped trial's thread before reusing its worker, and otherwise
    fails the *next* trial ("Could not re-use actor"); segsweep's Ray start waits longer.
    Started pinned to one CPU (``taskset``, a Slurm job), the local Ray instance has one."""
    from types import SimpleNamespace

    import ray
    from ray import tune

    from segsweep.sweep.ray_tune import ray_init

    plan = SimpleNamespace(
        spec=SimpleNamespace(resources=SimpleNamespace(gpus_per_trial=0, cpus_per_trial=1))
    )
    with pinned_to_one_cpu():  # and so the Ray processes it starts
        ray_init(None, plan)  # type: ignore[arg-type]
    try:
        assert ray.cluster_resources()["CPU"] == 1
        tuner = tune.Tuner(
            _slow_to_close,
            param_space={"i": tune.grid_search([0, 1, 2])},
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
            run_config=tune.RunConfig(verbose=0, storage_path=str(tmp_path), stop={"step": 2}),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert results.num_errors == 0, [str(r.error)[:200] for r in results if r.error]
    assert sorted(r.metrics["step"] for r in results) == [2, 2, 2]


# --------------------------------------------------------------------------------------------
# Real sweeps on the tiny synthetic dataset


def children(uri: str, experiment: str) -> tuple[object, list]:
    runs = runs_in(uri, experiment)
    parents = [r for r in runs if r.data.tags.get("segsweep.kind") == "sweep"]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], kids


def test_tiny_sweep_leaves_parent_and_child_runs(cache_dir: Path, tmp_path: Path) -> None:
    path = write_spec(tmp_path, tiny_spec("tiny", final={"seeds": [1, 2]}))
    with path.open("a") as spec_file:  # a password in the spec's text (optuna_storage, say)
        spec_file.write("# was: postgresql://bob:hunter2@db:5432/optuna\n")
    proc = segsweep("sweep", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Configuration for experiment" not in proc.stdout  # no raw Ray tables
    assert "search:" in proc.stdout and "best tune/mIoU" in proc.stdout and "optuna-dashboard" in proc.stdout

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, kids = children(uri, "tiny")
    assert parent.info.status == "FINISHED"
    search = [k for k in kids if k.data.tags["segsweep.phase"] == "search"]
    final = [k for k in kids if k.data.tags["segsweep.phase"] == "final"]
    assert len(search) == 2 * 1 + 2 * 2  # supervised cells: 1 trial, fixmatch cells: num_samples
    assert len(final) == 4 * 2  # every cell's best config over two seeds
    assert all(k.info.status == "FINISHED" for k in kids)
    assert len({k.data.tags["segsweep.run_key"] for k in kids}) == len(kids)  # no duplicate
    for k in kids:
        p, t = k.data.params, k.data.tags
        assert {"method", "label_ratio", "seed", "dataset"} <= set(p)
        assert t["segsweep.cell"].startswith(f"method={p['method']},ratio=")
        assert t["ray.trial_id"] and t["segsweep.status"] in ("finished", "stopped_early")
        if p["method"] == "fixmatch":
            assert "fixmatch.conf_threshold" in p
            assert "optuna.trial_number" in t if t["segsweep.phase"] == "search" else "segsweep.best_of" in t
        assert "val/mIoU" in k.data.metrics and "tune/mIoU" in k.data.metrics
    assert {k.data.params["seed"] for k in final} == {"1", "2"}
    # concurrent trials lost no metric: every finished run has all of its evaluations
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for k in kids:
        if k.data.tags["segsweep.status"] == "finished":
            steps = sorted(m.step for m in client.get_metric_history(k.info.run_id, "val/mIoU"))
            assert steps == [2, 4, 6], (k.data.tags["segsweep.cell"], steps)
            losses = client.get_metric_history(k.info.run_id, "train/loss")
            assert sorted(m.step for m in losses) == [2, 4, 6]
    # the parent run: the spec, outcome counts, the best trial per cell
    assert parent.data.metrics["trials/finished"] + parent.data.metrics.get("trials/stopped_early", 0) == 14
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "best_per_cell.csv"} <= files
    logged = Path(client.download_artifacts(parent.info.run_id, "sweep.yaml", str(tmp_path))).read_text()
    for text in (logged, (tmp_path / "sweeps/tiny/spec.yaml").read_text()):  # the copies keep no password
        assert "postgresql://bob:***@db:5432/optuna" in text and "hunter2" not in text
    assert (tmp_path / "sweeps/tiny/sweep.json").stat().st_mode & 0o777 == 0o600  # its --set as given
    # the answer where the MLflow UI shows it: one counted run per cell and final seed, the
    # parent's description, the stored view and its link (the Model training view)
    counted = [k for k in kids if k.data.tags.get("segsweep.counted") == "true"]
    assert len(counted) == 4 * 2 and all(k.data.tags["segsweep.phase"] == "final" for k in counted)
    assert all(k.data.tags.get("segsweep.counted") == "false" for k in kids if k not in counted)
    assert "| method | 1/4 | 1/2 |" in parent.data.tags["mlflow.note.content"]
    view = next(line for line in proc.stdout.splitlines() if line.strip().startswith("compare:"))
    assert "viewStateShareKey=segsweep-tiny" in view and "workflowType=machine_learning" in view
    assert "mlflow.sharedViewState.segsweep-tiny" in client.get_experiment(parent.info.experiment_id).tags
    assert "finals:" in proc.stdout and all(
        k.info.run_name.split()[0] in ("supervised", "fixmatch") for k in kids
    )
    # one Optuna study per searched cell, with its trials
    from segsweep.sweep.studies import counts

    studies = counts(f"sqlite:///{tmp_path / 'sweeps/tiny/optuna.db'}")
    # named by the sweep's instance: a sweep started anew never continues another's studies
    prefix = "tiny@" + json.loads((tmp_path / "sweeps/tiny/sweep.json").read_text())["instance"]
    assert studies == {
        f"{prefix}:method=fixmatch,ratio=0.25,seed=0": 2,
        f"{prefix}:method=fixmatch,ratio=0.5,seed=0": 2,
    }
    # curves: the final runs aggregated over their two seeds, logged to the parent run
    curve = segsweep("curve", "--experiment", "tiny", "--out", "report", cwd=tmp_path)
    assert curve.returncode == 0, curve.stderr
    assert "value: val/mIoU at the last evaluation" in curve.stdout and "(n=2)" in curve.stdout
    import csv

    rows = list(csv.DictReader((tmp_path / "report" / "runs.csv").open()))
    assert len(rows) == 8 and {r["seed"] for r in rows} == {"1", "2"}
    summary = list(csv.DictReader((tmp_path / "report" / "summary.csv").open()))
    assert len(summary) == 4 and all(r["n"] == "2" for r in summary)
    for s in summary:
        values = [
            float(r["mIoU"])
            for r in rows
            if r["method"] == s["method"] and r["label_ratio"] == s["label_ratio"]
        ]
        assert float(s["mean"]) == pytest.approx(sum(values) / 2)
    kid = {k.info.run_id: k for k in final}
    assert {r["run_id"] for r in rows} == set(kid)
    assert all(float(r["mIoU"]) == kid[r["run_id"]].data.metrics["val/mIoU_last"] for r in rows)
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "curve")}
    assert {"curve/curve.png", "curve/summary.csv", "curve/runs.csv", "curve/differences.csv"} <= logged
    # a baseline the experiment never ran is named, with the methods it has
    wrong = segsweep("curve", "--experiment", "tiny", "--baseline", "supervisd", "--out", "r2", cwd=tmp_path)
    assert_user_error(wrong, "--baseline", "no 'supervisd' runs", "methods: fixmatch, supervised")
    assert not (tmp_path / "r2").exists()
    # a second start refuses to overwrite the sweep
    again = segsweep("sweep", str(path), cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_a_crashing_trial_is_retried_from_its_checkpoint_and_a_diverging_one_is_not(
    cache_dir: Path, tmp_path: Path
) -> None:
    """One sweep, three cells alike but for a crash injected at step 5 in one and a NaN loss at
    step 3 in another: the crashed trial is retried from its step-4 checkpoint and ends exactly
    where the uninterrupted one ends; the diverging one stops at once, FAILED and never
    retried; the sweep goes on and ends 0."""
    cells = {"method": ["supervised"], "data.label_ratio": [0.25], "seed": [0]}
    variants = [{"debug.fail_at_step": 5}, {"debug.nan_at_step": 3}, {"debug.fail_at_step": None}]
    tree = tiny_spec("crash", grid=cells, variants=variants, max_failures=3)
    tree["base"]["train"]["steps"] = 8
    proc = segsweep("sweep", str(write_spec(tmp_path, tree)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected failure at step 5" in proc.stdout and "NaN!" in proc.stdout
    retries = [line for line in proc.stdout.splitlines() if "retry" in line]
    assert retries and all("fail_at_step=5" in line for line in retries), retries  # the crash only
    assert "2 finished, 0 stopped early, 0 failed, 1 diverged" in proc.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, kids = children(uri, "crash")
    by_cell = {(k.data.params["debug.fail_at_step"], k.data.params["debug.nan_at_step"]): k for k in kids}
    run, diverged, clean = by_cell["5", "None"], by_cell["None", "3"], by_cell["None", "None"]
    assert run.info.status == clean.info.status == "FINISHED" and len(kids) == 3
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [2, 4, 6, 8]  # resumed from the step-4 checkpoint, not from scratch
    # the retried trial ends exactly where an uninterrupted run with the same seed ends (CPU)
    assert run.data.metrics["val/mIoU"] == clean.data.metrics["val/mIoU"]
    # the diverged trial: FAILED once, saying where, no NaN logged as its loss
    assert (diverged.info.status, diverged.data.tags["segsweep.status"]) == ("FAILED", "diverged")
    assert "is nan at step 3" in diverged.data.tags["segsweep.error"]
    loss = diverged.data.metrics.get("train/loss")
    assert loss is None or math.isfinite(loss)


def _children_now(uri: str, experiment: str) -> list:
    try:
        runs = runs_in(uri, experiment)
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return []
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _finished(kids: list) -> dict[str, int]:
    return {k.info.run_id: k.info.end_time for k in kids if k.info.status == "FINISHED"}


def _running_new(kids: list, seen: list, phase: str | None = None) -> bool:
    """A trial running that the last stop had not seen (a trial run again reopens its run,
    and a run the kill left RUNNING may be stale), in ``phase`` if named."""
    old = {k.info.run_id for k in seen}
    return any(
        k.info.status == "RUNNING"
        and k.info.run_id not in old
        and phase in (None, k.data.tags.get("segsweep.phase"))
        for k in kids
    )


def _drive_until(
    tmp_path: Path, path: Path, moment: Callable[[list], bool], how: str, resume: bool, env: dict
) -> tuple[list, subprocess.Popen, str]:
    """Start the "killed" sweep (or ``--resume`` it) and signal it at ``moment``; the runs as
    they were then, the driver, and what it printed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_path = tmp_path / f"driver{len(list(tmp_path.glob('driver*.log')))}.log"
    # started with a --set, which every resume must reuse unasked
    args = ["--resume"] if resume else ["--set", "train.steps=30"]
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "segsweep.cli", "sweep", str(path), *args],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and not moment(_children_now(uri, "killed")):
            time.sleep(0.3)
        assert driver.poll() is None, (
            "the sweep ended before the moment to stop it\n" + log_path.read_text()[-3000:]
        )
        if how == "SIGKILL":
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        else:
            os.killpg(driver.pid, signal.SIGINT)  # Ctrl+C: the whole foreground process group
        driver.wait(timeout=120)
    return _children_now(uri, "killed"), driver, log_path.read_text()


def test_a_sweep_stopped_four_times_resumes_each_time_and_runs_every_trial_once(
    cache_dir: Path, tmp_path: Path
) -> None:
    """One sweep stopped four ways, each stop followed by ``--resume``: the driver killed
    (SIGKILL to its process group, Ray's processes included) before any trial has ended, then
    with some trials done and others running; Ctrl+C with a trial running (exit 130 with one
    line; running trials end KILLED, not "stopped early", which would count them as done); the
    driver killed while the final seeds of the best configurations run. The last resume
    completes it: every trial once, none run again, none left RUNNING. SIGTERM reaches the
    Ctrl+C handler (tests/test_sweep_live.py). Trials of 30 steps (about 5 s): one seen
    running must still be running when a signal lands."""
    path = write_spec(tmp_path, tiny_spec("killed", num_samples=3, final={"seeds": [1]}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finished: dict[str, int] = {}
    env: dict[str, str] = {}

    # 1. killed before any trial has ended
    kids, _, _ = _drive_until(
        tmp_path, path, lambda k: k and not any(r.info.status == "FINISHED" for r in k), "SIGKILL", False, env
    )
    assert kids and not _finished(kids)
    # 2. killed with some trials done and others running
    kids, _, out = _drive_until(tmp_path, path, lambda k: len(_finished(k)) >= 2, "SIGKILL", True, env)
    assert "note: resuming with the --set it was started with: train.steps=30" in out
    assert len(_finished(kids)) >= 2
    finished.update(_finished(kids))
    # The Optuna database is moved and named by SEGSWEEP_OPTUNA_STORAGE (as a changed password
    # would be): the resumed search must use it, not the storage Ray pickled when it started.
    old = tmp_path / "sweeps/killed/optuna.db"
    moved = tmp_path / "moved"
    moved.mkdir()
    for part in old.parent.glob("optuna.db*"):  # with its journal, if the kill left one
        part.rename(moved / part.name)
    env["SEGSWEEP_OPTUNA_STORAGE"] = storage = f"sqlite:///{moved / 'optuna.db'}"

    # 3. Ctrl+C with a search trial running
    seen, done = kids, len(finished)
    kids, driver, out = _drive_until(
        tmp_path,
        path,
        lambda k: len(_finished(k)) > done and _running_new(k, seen, "search"),
        "SIGINT",
        True,
        env,
    )
    assert driver.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "interrupted; continue it with --resume" in out, out[-3000:]
    parent, after = children(uri, "killed")
    assert parent.info.status == "KILLED"
    assert not [k for k in after if k.info.status == "RUNNING"]
    cut = [k for k in after if k.data.tags.get("segsweep.status") == "interrupted"]
    assert cut and all(k.info.status == "KILLED" for k in cut)
    finished.update(_finished(kids))

    # 4. killed while the final runs run
    seen = kids
    kids, _, _ = _drive_until(tmp_path, path, lambda k: _running_new(k, seen, "final"), "SIGKILL", True, env)
    finished.update(_finished(kids))

    # the last resume completes the sweep
    proc = segsweep("sweep", str(path), "--resume", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent, kids = children(uri, "killed")
    assert parent.info.status == "FINISHED"
    search = [k for k in kids if k.data.tags["segsweep.phase"] == "search"]
    final = [k for k in kids if k.data.tags["segsweep.phase"] == "final"]
    assert len(search) == 2 + 2 * 3 and len(final) == 4  # every trial exactly once ...
    assert len({k.data.tags["segsweep.run_key"] for k in kids}) == len(kids)  # ... no duplicate
    assert all(k.info.status == "FINISHED" for k in kids)  # ... none left RUNNING
    assert {k.data.params["train.steps"] for k in kids} == {"30"}  # ... as the sweep was started
    assert {k.data.tags["segsweep.status"] for k in kids} <= {"finished", "stopped_early"}
    end_times = {k.info.run_id: k.info.end_time for k in kids}
    assert {run: end_times[run] for run in finished} == finished  # finished trials not run again
    assert parent.data.metrics["trials/finished"] + parent.data.metrics.get("trials/stopped_early", 0) == 12
    # the moved Optuna database holds every searched cell's samples; the old one came not back
    assert not old.exists()
    from segsweep.sweep.studies import counts

    studies = counts(storage)
    assert len(studies) == 2 and all(n >= 3 for n in studies.values()), studies  # num_samples each
    assert stat.S_IMODE((tmp_path / "sweeps/killed/ray").stat().st_mode) == 0o700  # Ray's pickles
