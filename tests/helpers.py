"""Run the real ``segsweep`` command in a subprocess and read what it left in MLflow."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from segsweep.tracking.protocol import NullTracker


@contextlib.contextmanager
def without_collector() -> Iterator[None]:
    """Python's garbage collector off for the block. It runs in whichever thread allocates
    when it is due: late in a test session one full collection of the process's heap can take
    a second, and landing in the tracker's writer thread it counts (rightly) as the writer's
    CPU. CI measured 1.0 s so, where the writer's own work costs about 0.01 s."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def pinned_to_one_cpu() -> Iterator[None]:
    """This thread, and the processes it starts meanwhile, on one CPU (``taskset -c 0``, a
    one-CPU Slurm job); its affinity as it was afterwards."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def segsweep(
    *args: str, cwd: Path, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "segsweep.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def segsweep_here(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``segsweep ARGS`` run in this process: the same exit code and printed lines as
    ``segsweep()`` without a new interpreter importing torch (about 5 CPU-seconds each), for
    refusals and failing runs. Each command and each kind of refusal keeps one test through
    ``segsweep()``, the real process."""
    import contextlib
    import io

    from segsweep.cli import main

    out, err, cwd_before, env_before = io.StringIO(), io.StringIO(), Path.cwd(), dict(os.environ)
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's refusals
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(env_before)
    return subprocess.CompletedProcess(["segsweep", *args], code, out.getvalue(), err.getvalue())


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def tiny_spec(name: str, **over: object) -> dict:
    """A sweep spec of a few CPU seconds per trial: two methods, two label ratios."""
    tree = {
        "name": name,
        "base": {
            "data": {"synthetic": {"num_train": 96, "num_val": 16}, "tune_size": 8},
            "model": {"decoder_channels": 16},
            "train": {"steps": 6, "batch_size": 4, "eval_every": 2, "log_every": 2},
            "eval": {"diag_samples": 4, "panel_samples": 2},
        },
        "grid": {"method": ["supervised", "fixmatch"], "data.label_ratio": [0.25, 0.5], "seed": [0]},
        "search": {"fixmatch": {"fixmatch.conf_threshold": {"type": "float", "low": 0.5, "high": 0.95}}},
        "num_samples": 2,
        "early_stop": {"grace_period": 2, "reduction_factor": 2},
        "max_failures": 2,
    }
    tree.update(over)
    return tree


def write_spec(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / f"{tree['name']}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def runs_in(uri: str, experiment: str | None = None) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [
        e.experiment_id for e in client.search_experiments() if experiment is None or e.name == experiment
    ]
    if not exps:
        return []
    return client.search_runs(exps, max_results=5000)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one ``error:`` line naming the culprit, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


class Recorder(NullTracker):
    """A tracker keeping every logged metric by (key, step), for trainer-level tests."""

    def __init__(self) -> None:
        self.metrics: dict[tuple[str, int], float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update({(k, step): v for k, v in metrics.items()})


def store_with_two_sweeps_named_alike(uri: str, experiment: str) -> tuple[str, str]:
    """Two sweeps "s" in ``experiment`` (the second started anew), final runs of seeds 0-2 at
    ratio 0.1: the old one's fixmatch scores 0.40, the new one's 0.50 + 0.01 * seed,
    supervised 0.30 in both. Returns the parents' run ids, old then new."""
    from mlflow.entities import Metric, Param, RunTag

    from segsweep.tracking.store import client_for, ensure_experiment

    client = client_for(uri)
    exp = ensure_experiment(client, experiment, uri)
    ids = []
    for start, fix in ((1, lambda s: 0.40), (2, lambda s: 0.50 + 0.01 * s)):
        parent = client.create_run(exp, run_name="s", tags={"segsweep.kind": "sweep"}, start_time=start)
        ids.append(parent.info.run_id)
        for method, score in (("fixmatch", fix), ("supervised", lambda s: 0.30)):
            for seed in range(3):
                kid = client.create_run(
                    exp,
                    start_time=start,
                    tags={
                        "mlflow.parentRunId": parent.info.run_id,
                        "segsweep.phase": "final",
                        "segsweep.cell": f"method={method},ratio=0.1,seed=0",
                        "segsweep.status": "finished",
                    },
                )
                client.log_batch(
                    kid.info.run_id,
                    metrics=[Metric("val/mIoU_last", score(seed), 0, 1)],
                    params=[
                        Param(k, str(v))
                        for k, v in {"method": method, "label_ratio": 0.1, "seed": seed}.items()
                    ],
                    tags=[RunTag("x", "y")],
                )
                client.set_terminated(kid.info.run_id, "FINISHED")
        client.set_terminated(parent.info.run_id, "FINISHED")
    return ids[0], ids[1]


def chrome(profile: Path | None = None, size: str = "1200,1600"):
    """Headless Debian Chromium (Selenium), with a fresh profile when given (no remembered
    workflow type or view state). `make test` installs it: missing, the test fails."""
    import pytest

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail(
            "headless Chromium is missing: `make test` installs the chromium and chromium-driver packages"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    flags = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={size}",
    ]
    flags += [f"--user-data-dir={profile}"] if profile is not None else []
    for flag in flags:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM a process group started with ``start_new_session``, SIGKILL after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
