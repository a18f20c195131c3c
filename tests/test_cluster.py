"""The deployment topology without Docker, on loopback (tests/localcluster.py): PostgreSQL,
S3, the authenticated MLflow server and a two-node Ray cluster (the ``cluster`` fixture); its
authentication, a password in a tracking URI, and one sweep of 8 trials on both nodes that
meets, in turn, what a cluster loses most often: a worker node, the MLflow server, the
PostgreSQL that holds MLflow's runs and the Optuna studies, the artifact store, the Ray head.
Each fault has its test; every wait is bounded and nothing is left running afterwards. Run by
`make test-cluster` and by `make test`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import tiny_spec
from .localcluster import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

#: Trials of the faulted sweep: supervised at two ratios, FixMatch at two ratios x 3 samples.
TRIALS = 2 + 2 * 3
#: Steps per trial: long enough that trials still train when the last fault comes.
STEPS = 20
#: What the MLflow server logs when S3 refuses its connection.
S3_REFUSED = "Could not connect to the endpoint URL"

#: Every sweep driver started here: one a failed test left running is killed after it.
DRIVERS: list[subprocess.Popen] = []


def _kill_drivers() -> None:
    while DRIVERS:
        driver = DRIVERS.pop()
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # its group: started with start_new_session
            driver.wait(timeout=30)


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
    _kill_drivers()


# --------------------------------------------------------------------------------------------
# The server's authentication, and a password in a tracking URI


def test_the_mlflow_server_refuses_unauthenticated_requests(cluster: LocalCluster) -> None:
    url = f"{cluster.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 401
    wrong = urllib.request.Request(url, headers={"Authorization": "Basic YWRtaW46d3Jvbmc="})  # admin:wrong
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(wrong, timeout=10)
    assert err.value.code == 401
    import base64

    token = base64.b64encode(f"admin:{cluster.admin_password}".encode()).decode()
    ok = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    assert urllib.request.urlopen(ok, timeout=10).status == 200


def test_a_run_never_logs_or_prints_the_password_in_its_tracking_uri(
    cluster: LocalCluster, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import tiny_tree
    from .helpers import write_config

    cfg = write_config(
        tmp_path / "r.yaml",
        tiny_tree(cache_dir, **{"tracking.enabled": True, "tracking.experiment": "secret"}),
    )
    uri = cluster.tracking_uri.replace("http://", f"http://admin:{cluster.admin_password}@")
    env = {k: v for k, v in cluster.env().items() if not k.startswith("MLFLOW_TRACKING_")}
    proc = subprocess.run(
        [sys.executable, "-m", "segsweep.cli", "run", str(cfg), "--tracking-uri", uri],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cluster.admin_password not in proc.stdout + proc.stderr
    assert "admin:***@" in proc.stdout
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", cluster.admin_password)
    client = MlflowClient(cluster.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("secret").experiment_id])
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    assert cluster.admin_password not in logged and "admin:***@" in run.data.params["tracking.uri"]
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert cluster.admin_password not in Path(config).read_text()
    # nor the checkpoints, the run folder's and the logged ones (each holds the run's config)
    client.download_artifacts(run.info.run_id, "checkpoints", str(tmp_path / "logged"))
    saved = list(tmp_path.rglob("*.pt"))
    owners = {p.parent.parent.name for p in saved}
    assert "logged" in owners and len(owners) == 2, saved  # the logged copies and the run's own
    assert not [p for p in saved if cluster.admin_password.encode() in p.read_bytes()]


# --------------------------------------------------------------------------------------------
# One sweep meeting every fault in turn


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

    def running(self) -> list[str]:
        """The run IDs of the trials training now."""
        return [k.info.run_id for k in self.kids() if k.info.status == "RUNNING"]

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

    def assert_every_step_once(self, run_id: str, what: str) -> None:
        """The run's loss and evaluation logged at each reporting step (2, 4, ...) once."""
        for key in ("train/loss", "val/mIoU"):
            logged = [m.step for m in self.client.get_metric_history(run_id, key)]
            assert sorted(logged) == list(range(2, self.steps + 1, 2)), (what, key, logged)

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
        password = self.cluster.admin_password
        assert password not in "".join(p.read_text() for p in self.logs)  # never printed
        for k in kids:
            self.assert_every_step_once(k.info.run_id, k.info.run_name)
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


@dataclass
class Faulted:
    """The sweep that met every fault, and what was seen on the way."""

    sweep: ClusterSweep
    nodes: dict[str, str] = field(default_factory=dict)  # head, lost, back: Ray node IDs
    victim: Any = None  # the run of the trial training on the lost node
    checkpointed: int = 0  # the step of its last checkpoint when the node was lost
    training: dict[str, list[str]] = field(default_factory=dict)  # fault -> runs training then
    seconds: dict[str, float] = field(default_factory=dict)  # fault -> until segsweep said so
    s3_refused: int = 0  # S3 connections the MLflow server found refused during the cut
    exits: list[int] = field(default_factory=list)  # the driver's, then the resumed one's
    head_lost_log: str = ""  # what the driver met by the head loss printed
    at: dict[str, float] = field(default_factory=dict)  # when each step of the story began


@pytest.fixture(scope="module")
def faulted(
    cluster: LocalCluster, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Faulted]:
    """One sweep of ``TRIALS`` trials on both nodes meeting, in turn: a worker node lost, the
    MLflow server restarted, PostgreSQL stopped for 30 s, S3 cut for 30 s, the Ray head lost
    and the sweep resumed. One sweep for all of them: five took 11 minutes of `make test`."""
    with pytest.MonkeyPatch.context() as mp:
        env = cluster.env()  # this process reads the server with the cluster's credentials
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(key, env[key])
        try:
            yield _meet_every_fault(cluster, cache_dir, tmp_path_factory.mktemp("faults"))
        finally:
            _kill_drivers()


def _meet_every_fault(cluster: LocalCluster, cache_dir: Path, tmp_path: Path) -> Faulted:
    seen = Faulted(ClusterSweep(cluster, tmp_path, "faults", steps=STEPS, SEGSWEEP_CACHE=str(cache_dir)))
    seen.at["start"] = time.time()
    sweep = seen.sweep

    # A worker node dies (preempted, rebooted, the OOM killer): its raylet and workers
    # SIGKILLed while its trial trains with a checkpoint and at least two evaluations to go.
    head, lost = cluster.node_id("ray-head"), cluster.node_id("ray-node")
    [(seen.victim, seen.checkpointed)] = sweep.wait_for(
        "a checkpoint on the second node", lambda: sweep.checkpointed_on(lost)[:1]
    )
    seen.at["node lost"] = time.time()
    lost_at = time.time()
    cluster.kill("ray-node")
    sweep.wait_for("the lost trial retried", lambda: "retry" in sweep.log, timeout=120)
    seen.seconds["node"] = time.time() - lost_at
    sweep.wait_for(  # its run reopened on the head (its node tag is the attempt's)
        "the lost trial on the head",
        lambda: [
            k
            for k in sweep.kids()
            if k.info.run_id == seen.victim.info.run_id and k.data.tags["ray.node_id"] == head
        ],
    )
    cluster.start_ray_node()  # the machine is back, and gets a trial again
    seen.nodes = {"head": head, "lost": lost, "back": (back := cluster.node_id("ray-node"))}
    sweep.wait_for(
        "a trial on the returning node",
        lambda: [
            k for k in sweep.kids() if k.info.status == "RUNNING" and k.data.tags["ray.node_id"] == back
        ],
    )
    seen.at["node back"] = time.time()

    # The MLflow server restarts (5 s down); PostgreSQL (MLflow's runs, its auth database, the
    # Optuna studies) stops for 30 s; the link from the MLflow server to its S3 store is cut for
    # 30 s while trials upload.
    _outage(seen, "mlflow", cluster.stop_mlflow, 5, cluster.start_mlflow)
    _outage(seen, "postgres", cluster.stop_postgres, 30, cluster.start_postgres_server)
    server_log = cluster.root / "mlflow.log"
    refused_before = server_log.read_text().count(S3_REFUSED)

    def refused() -> int:  # S3 connections the server found refused since the cut
        return server_log.read_text().count(S3_REFUSED) - refused_before

    _outage(seen, "s3", cluster.s3_link.cut, 30, cluster.s3_link.up, until=refused)
    seen.s3_refused = refused()

    # The Ray head's processes (its GCS, raylet and workers) are SIGKILLed; once a head and the
    # second node are back, the sweep is resumed.
    sweep.wait_until_mid_sweep(running=1)
    seen.training["head"] = sweep.running()
    seen.at["head lost"] = time.time()
    lost_at = time.time()
    cluster.kill("ray-head")
    seen.exits.append(sweep.finish(timeout=120))
    seen.seconds["head"] = time.time() - lost_at
    seen.head_lost_log = sweep.log
    cluster.kill("ray-node")  # a node without its head (it would end by itself, later)
    cluster.start_ray_head()
    cluster.start_ray_node()
    seen.at["resumed"] = time.time()
    sweep.start("--resume")
    seen.exits.append(sweep.finish())
    seen.at["end"] = time.time()
    print(", ".join(f"{step} {t - seen.at['start']:.0f}s" for step, t in seen.at.items()))
    print(
        f"node lost: retry after {seen.seconds['node']:.0f}s; S3 refused {seen.s3_refused} connections; "
        f"head lost: driver ended after {seen.seconds['head']:.0f}s"
    )
    return seen


def _outage(
    seen: Faulted,
    fault: str,
    down: Callable[[], None],
    seconds: float,
    up: Callable[[], None],
    until: Callable[[], Any] = lambda: True,
) -> None:
    """``fault`` for ``seconds`` once a trial has finished and two train (one on each node),
    and longer until ``until()`` (a trial met it: on a loaded machine no trial may end within
    the 30 s); the runs training then are kept for the fault's test."""
    seen.sweep.wait_until_mid_sweep(running=2)
    seen.training[fault] = seen.sweep.running()
    seen.at[fault] = time.time()
    down()
    time.sleep(seconds)
    seen.sweep.wait_for(f"a trial meeting the {fault} outage", until, timeout=120)
    up()


def test_after_every_fault_each_trial_has_one_finished_run_with_every_step_once(faulted: Faulted) -> None:
    """The sweep ended 0 once resumed; each trial has exactly one FINISHED run with each
    evaluation and logged step once, its config, checkpoints and panels; each Optuna study
    holds each of its trials once; no password was printed or logged."""
    assert faulted.exits[-1] == 0, faulted.sweep.log[-3000:]
    assert "Traceback" not in "".join(p.read_text() for p in faulted.sweep.logs)
    kids = faulted.sweep.assert_complete()
    for method in ("supervised", "fixmatch"):  # the same params on every run of a method
        keys = {frozenset(k.data.params) for k in kids if k.data.params.get("method") == method}
        assert len(keys) == 1 and {"method", "label_ratio", "seed", "train.steps"} <= next(iter(keys))


def _finished_with_every_step(faulted: Faulted, fault: str) -> None:
    """The runs that trained while ``fault`` happened ended FINISHED with every step once."""
    assert faulted.training[fault]
    for run_id in faulted.training[fault]:
        assert faulted.sweep.client.get_run(run_id).info.status == "FINISHED"
        faulted.sweep.assert_every_step_once(run_id, fault)


def test_a_lost_worker_nodes_trial_goes_on_from_its_checkpoint_and_the_node_gets_trials_again(
    faulted: Faulted,
) -> None:
    """The trial on the lost node runs again on the head from its last checkpoint (its steps
    go on, not from zero), in the same run; the node coming back gets trials again."""
    log = faulted.sweep.logs[0].read_text()
    assert "retry" in log and "its Ray worker was lost" in log
    # Its reports (steps 2, 4, ...): one restore, after which the steps go on from a checkpoint
    # of the lost attempt to the end, never from zero. The first report after the restore is
    # past the last checkpoint seen before the kill, or that step again when the node died
    # between Ray writing the report and registering its checkpoint (the driver asks the lost
    # worker for it): one evaluation made twice in Ray's log, once in MLflow (the test above).
    reported = faulted.sweep.reported(faulted.victim.data.tags["ray.trial_id"])
    steps = [step for step, _ in reported]
    [restore] = [i for i, (_, since) in enumerate(reported) if since == 1 and i > 0]
    before, after = steps[:restore], steps[restore:]
    assert before == list(range(2, before[-1] + 1, 2)) and after == list(range(after[0], STEPS + 1, 2)), (
        reported
    )
    assert after[0] - 2 in before and after[0] >= faulted.checkpointed > 0, (reported, faulted.checkpointed)


def test_trials_ride_out_a_tracking_server_restart(faulted: Faulted) -> None:
    _finished_with_every_step(faulted, "mlflow")


def test_a_sweep_rides_out_a_postgresql_restart(faulted: Faulted) -> None:
    """The trials' writers, the driver's searcher and its run closings retry through 30 s
    without the database: no metric, param or study trial lost or doubled (the studies: the
    test after every fault)."""
    _finished_with_every_step(faulted, "postgres")


def test_checkpoints_survive_the_artifact_store_being_unreachable(faulted: Faulted, tmp_path: Path) -> None:
    """Uploads met the cut (the server could not reach S3) and were retried: every run ends
    with its checkpoints in the store; those of the runs training during the cut byte for byte
    the ones on the trial's local disk."""
    assert faulted.s3_refused > 0
    _finished_with_every_step(faulted, "s3")
    sweep = faulted.sweep
    for k in sweep.kids():
        run_dir = sweep.tmp_path / "sweeps/faults/trials" / k.data.tags["segsweep.run_key"].split("/", 1)[1]
        local = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
        stored = sorted(Path(f.path).name for f in sweep.client.list_artifacts(k.info.run_id, "checkpoints"))
        assert local and stored == local, (k.info.run_name, stored, local)
        if k.info.run_id not in faulted.training["s3"]:
            continue
        got = sweep.client.download_artifacts(
            k.info.run_id, "checkpoints/last.pt", str(tmp_path / k.info.run_id)
        )
        assert Path(got).read_bytes() == (run_dir / "checkpoints/last.pt").read_bytes()


def test_losing_the_ray_head_ends_the_driver_in_one_line_and_resume_completes(
    faulted: Faulted, cluster: LocalCluster
) -> None:
    """The driver exits 1 in one line naming what happened and the --resume command; that
    command, once a head is back, completes the sweep (nothing doubled: the test after every
    fault)."""
    log = faulted.head_lost_log
    assert faulted.exits == [1, 0], log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    sweep = faulted.sweep
    command = f"segsweep sweep {sweep.path} --ray-address {cluster.ray_address} --tracking-uri {cluster.tracking_uri} --resume"
    assert errors[0].startswith(f"error: the Ray head at {cluster.ray_address} is gone (")
    assert errors[0].endswith(command)
    _finished_with_every_step(faulted, "head")
