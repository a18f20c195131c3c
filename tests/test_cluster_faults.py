"""What a cluster loses most often, lost mid-sweep on the loopback cluster (tests/localcluster.py):
a worker node, the PostgreSQL that holds MLflow's runs and the Optuna studies, the artifact store,
the Ray head. Each sweep has 8 trials running on both Ray nodes; every wait is bounded and
nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import tiny_spec
from .localcluster import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: Trials per fault sweep: supervised at two ratios, FixMatch at two ratios x 3 samples.
TRIALS = 2 + 2 * 3

#: Every sweep driver a test started: one a failed test left running is killed after it.
DRIVERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_driver_left() -> Iterator[None]:
    """After each test: no sweep driver it started still running, and this process's Ctrl+C
    handler and signal mask as they were, said and put back if not (a clean-clone run of
    2026-12-06 found Ctrl+C no longer stopping two later tests' processes; a targeted run of
    these tests found neither changed, so the cause is still open)."""
    handler, mask = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    if signal.getsignal(signal.SIGINT) != handler or signal.pthread_sigmask(signal.SIG_BLOCK, []) != mask:
        print(
            f"note: SIGINT changed: {signal.getsignal(signal.SIGINT)}, mask {signal.pthread_sigmask(signal.SIG_BLOCK, [])}"
        )
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    while DRIVERS:
        driver = DRIVERS.pop()
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # its group: started with start_new_session
            driver.wait(timeout=30)


class ClusterSweep:
    """A sweep of ``TRIALS`` trials driven in the background on the cluster, watched through
    the MLflow server."""

    def __init__(self, cluster: LocalCluster, tmp_path: Path, name: str, steps: int, **env: str) -> None:
        tree = tiny_spec(name, num_samples=3)
        tree["base"]["train"]["steps"] = steps
        del tree["early_stop"]  # every trial runs to its end
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(tree))
        self.cluster, self.tmp_path, self.name = cluster, tmp_path, name
        self.env = cluster.env(SEGSWEEP_OPTUNA_STORAGE=cluster.optuna_storage, **env)
        self.logs: list[Path] = []
        self.driver = self.start()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(cluster.tracking_uri)

    def start(self, *extra: str) -> subprocess.Popen:
        log = self.tmp_path / f"driver{len(self.logs)}.log"
        self.logs.append(log)
        args = ["sweep", str(self.path), "--ray-address", self.cluster.ray_address]
        with log.open("w") as out:
            self.driver = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "segsweep.cli",
                    *args,
                    "--tracking-uri",
                    self.cluster.tracking_uri,
                    *extra,
                ],
                cwd=self.tmp_path,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        DRIVERS.append(self.driver)
        return self.driver

    @property
    def log(self) -> str:
        return self.logs[-1].read_text()

    def kids(self) -> list[Any]:
        """The trials' runs, as the server has them now (none while it is down)."""
        try:
            exp = self.client.get_experiment_by_name(self.name)
            runs = self.client.search_runs([exp.experiment_id], max_results=1000) if exp else []
        except Exception:  # noqa: BLE001 - the server or its database may be down right now
            return []
        return [r for r in runs if "mlflow.parentRunId" in r.data.tags]

    def wait_for(self, what: str, found: Callable[[], Any], timeout: float = 300) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = found()
            if value:
                return value
            assert self.driver.poll() is None, f"the sweep ended before {what}:\n{self.log[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout:.0f}s\n{self.log[-3000:]}")

    def wait_until_mid_sweep(self, running: int) -> None:
        """Until a trial has finished and at least ``running`` train."""
        self.wait_for(
            f"a trial finished and {running} training",
            lambda: (
                (kids := self.kids())
                and any(k.info.status == "FINISHED" for k in kids)
                and sum(k.info.status == "RUNNING" for k in kids) >= running
            ),
        )

    def checkpointed_on(self, node: str) -> list[tuple[Any, int]]:
        """Trials running on ``node`` with a checkpoint and at least two evaluations to go:
        their runs, and the step of their last report (each report holds a checkpoint)."""
        found = []
        for k in self.kids():
            if k.info.status == "RUNNING" and k.data.tags.get("ray.node_id") == node:
                reported = self.reported(k.data.tags["ray.trial_id"])
                if reported and reported[-1][0] <= self.steps - 4:
                    found.append((k, reported[-1][0]))
        return found

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.driver.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            raise AssertionError(
                f"the sweep did not end within {timeout:.0f}s:\n{self.log[-3000:]}"
            ) from None

    def assert_complete(self) -> list[Any]:
        """Every trial has exactly one run, FINISHED, each evaluation and loss step once; each
        Optuna study holds each of its trials once; the parent run FINISHED."""
        exp = self.client.get_experiment_by_name(self.name)
        runs = self.client.search_runs([exp.experiment_id], max_results=1000)
        [parent] = [r for r in runs if r.data.tags.get("segsweep.kind") == "sweep"]
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED"
        assert len(kids) == TRIALS and len({k.data.tags["segsweep.run_key"] for k in kids}) == TRIALS
        assert {k.info.status for k in kids} == {"FINISHED"}, [(k.info.run_name, k.info.status) for k in kids]
        steps, password = self.steps, self.cluster.admin_password
        assert password not in "".join(p.read_text() for p in self.logs)  # never printed
        for k in kids:
            for key in ("train/loss", "val/mIoU"):
                logged = [m.step for m in self.client.get_metric_history(k.info.run_id, key)]
                assert sorted(logged) == list(range(2, steps + 1, 2)), (k.info.run_name, key, logged)
            assert not any(password in v for v in k.data.params.values())
            files = {f.path for f in self.client.list_artifacts(k.info.run_id)}
            assert {"config.yaml", "checkpoints"} <= files, files
            if k.data.params["method"] == "fixmatch":  # its pseudo-mask panels
                assert any(
                    f.path.startswith("images/") for f in self.client.list_artifacts(k.info.run_id, "images")
                )
        assert len({k.data.tags["ray.node_id"] for k in kids}) >= 2  # the trials ran on both nodes
        from segsweep.sweep.studies import counts

        instance = json.loads((self.tmp_path / f"sweeps/{self.name}/sweep.json").read_text())["instance"]
        mine = {
            k: v
            for k, v in counts(self.cluster.optuna_storage).items()
            if k.startswith(f"{self.name}@{instance}:")
        }
        assert sorted(mine.values()) == [3, 3], mine  # num_samples each, none doubled
        return kids

    @property
    def steps(self) -> int:
        return yaml.safe_load(self.path.read_text())["base"]["train"]["steps"]

    def reported(self, trial_id: str) -> list[tuple[int, int]]:
        """What a trial reported to Ray, attempt after attempt (its result.json): the step, and
        the reports since its attempt began (1 at the first report after a restore)."""
        files = list((self.tmp_path / f"sweeps/{self.name}/ray").rglob(f"*{trial_id}*/result.json"))
        lines = files[0].read_text().splitlines() if files else []
        rows = [json.loads(line) for line in lines if line.endswith("}")]  # a line being written: not yet
        return [(r["step"], r["iterations_since_restore"]) for r in rows if "step" in r]


@pytest.fixture
def tracking_login(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process reads the server with the cluster's credentials (MLflow's client reads them
    from the environment)."""
    env = cluster.env()
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, env[key])


def test_a_sweep_survives_losing_a_worker_node(
    cluster: LocalCluster, cache_dir: Path, tmp_path: Path, tracking_login: None
) -> None:
    """The second node's raylet and workers SIGKILLed while its trial trains: the trial runs
    again on the head from its last checkpoint (its steps go on, not from zero), its run is
    the same one; the node coming back gets trials again; nothing is doubled or left RUNNING."""
    head, lost = cluster.node_id("ray-head"), cluster.node_id("ray-node")
    sweep = ClusterSweep(cluster, tmp_path, "nodeloss", steps=16, SEGSWEEP_CACHE=str(cache_dir))
    [(victim, checkpointed)] = sweep.wait_for(
        "a checkpoint on the second node", lambda: sweep.checkpointed_on(lost)[:1]
    )
    lost_at = time.time()
    cluster.kill("ray-node")

    # Ray finds the node dead, and the trial starts again on the head, in the same run
    sweep.wait_for("the lost trial retried", lambda: "retry" in sweep.log, timeout=120)
    noticed_s = time.time() - lost_at
    sweep.wait_for(  # its run reopened there (its node tag is the attempt's)
        "the lost trial on the head",
        lambda: [
            k
            for k in sweep.kids()
            if k.info.run_id == victim.info.run_id and k.data.tags["ray.node_id"] == head
        ],
    )
    cluster.start_ray_node()  # the machine is back
    back = cluster.node_id("ray-node")
    assert sweep.finish() == 0, sweep.log[-3000:]
    print(f"node lost: retry after {noticed_s:.0f}s")

    kids = sweep.assert_complete()
    assert "retry" in sweep.log and "Traceback" not in sweep.log
    assert any(k.data.tags.get("ray.node_id") == back for k in kids), "the returning node got no trial"
    assert "its Ray worker was lost" in sweep.log
    # the retried attempt went on from its checkpoint: its step counts continue (reports at
    # steps 2, 4, ... each once, the first after the restore past where it was lost)
    reported = sweep.reported(victim.data.tags["ray.trial_id"])
    assert [step for step, _ in reported] == list(range(2, sweep.steps + 1, 2)), reported
    restored = [step for step, since in reported[1:] if since == 1]
    assert len(restored) == 1 and restored[0] > checkpointed > 0, (reported, checkpointed)


def test_a_sweep_rides_out_a_postgresql_restart(
    cluster: LocalCluster, cache_dir: Path, tmp_path: Path, tracking_login: None
) -> None:
    """PostgreSQL (MLflow's runs, the auth database, the Optuna studies) stopped for 30 s
    while trials train on both nodes and one has finished: the trials' writers, the driver's
    searcher and its run closings retry; no metric, param or study trial is lost or doubled."""
    sweep = ClusterSweep(cluster, tmp_path, "pgrestart", steps=10, SEGSWEEP_CACHE=str(cache_dir))
    sweep.wait_until_mid_sweep(running=2)
    cluster.stop_postgres()
    time.sleep(30)
    cluster.start_postgres_server()
    assert sweep.finish() == 0, sweep.log[-3000:]
    assert "Traceback" not in sweep.log
    kids = sweep.assert_complete()  # every step once, each study trial once
    for method in ("supervised", "fixmatch"):
        keys = {frozenset(k.data.params) for k in kids if k.data.params.get("method") == method}
        assert len(keys) == 1 and {"method", "label_ratio", "seed", "train.steps"} <= next(iter(keys))


def test_checkpoints_survive_the_artifact_store_being_unreachable(
    cluster: LocalCluster, cache_dir: Path, tmp_path: Path, tracking_login: None
) -> None:
    """The link between the MLflow server and its S3 store cut for 30 s while trials end and
    upload their checkpoints: the uploads are retried, every run ends with its checkpoints in
    the store, byte for byte the ones on the trial's local disk."""
    sweep = ClusterSweep(cluster, tmp_path, "s3outage", steps=10, SEGSWEEP_CACHE=str(cache_dir))
    sweep.wait_until_mid_sweep(running=2)
    server_log = cluster.root / "mlflow.log"
    refused_before = server_log.read_text().count("Could not connect to the endpoint URL")
    cluster.s3_link.cut()
    time.sleep(30)
    cluster.s3_link.up()
    assert sweep.finish() == 0, sweep.log[-3000:]
    assert "Traceback" not in sweep.log
    # uploads met the outage (the server could not reach S3), and none was lost
    assert server_log.read_text().count("Could not connect to the endpoint URL") > refused_before
    kids = sweep.assert_complete()
    for k in kids:
        run_dir = tmp_path / "sweeps/s3outage/trials" / k.data.tags["segsweep.run_key"].split("/", 1)[1]
        local = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
        stored = sorted(Path(f.path).name for f in sweep.client.list_artifacts(k.info.run_id, "checkpoints"))
        assert local and stored == local, (k.info.run_name, stored, local)
        got = sweep.client.download_artifacts(
            k.info.run_id, "checkpoints/last.pt", str(tmp_path / k.info.run_id)
        )
        assert Path(got).read_bytes() == (run_dir / "checkpoints/last.pt").read_bytes()


def test_losing_the_ray_head_ends_the_driver_in_one_line_and_resume_completes(
    cluster: LocalCluster, cache_dir: Path, tmp_path: Path, tracking_login: None
) -> None:
    """The head's processes (its GCS, raylet and workers) SIGKILLed mid-sweep: the driver exits
    1 in one line naming what happened and the --resume command; once a head (and the second
    node) is back, that command completes the sweep with nothing doubled. Last in this file:
    the cluster after it has a new head."""
    sweep = ClusterSweep(cluster, tmp_path, "headloss", steps=10, SEGSWEEP_CACHE=str(cache_dir))
    sweep.wait_until_mid_sweep(running=1)
    lost_at = time.time()
    cluster.kill("ray-head")
    assert sweep.finish(timeout=120) == 1, sweep.log[-3000:]
    ended_s = time.time() - lost_at
    errors = [line for line in sweep.log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in sweep.log, sweep.log[-3000:]
    command = f"segsweep sweep {sweep.path} --ray-address {cluster.ray_address} --tracking-uri {cluster.tracking_uri} --resume"
    assert errors[0].startswith(f"error: the Ray head at {cluster.ray_address} is gone (") and errors[
        0
    ].endswith(command)
    print(f"head lost: driver ended after {ended_s:.0f}s")

    cluster.kill("ray-node")  # a node without its head (it would end by itself, later)
    cluster.start_ray_head()
    cluster.start_ray_node()
    sweep.start("--resume")
    assert sweep.finish() == 0, sweep.log[-3000:]
    sweep.assert_complete()  # every trial once, none RUNNING, each step once, each study trial once
