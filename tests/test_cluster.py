"""The deployment topology without Docker: PostgreSQL, an authenticated MLflow server and a
two-node Ray cluster on loopback (the ``cluster`` fixture), its authentication, a tracking
server restart and a password in a tracking URI. The sweeps submitted to it with --ray-address
and --tracking-uri, and the faults they survive, are in test_cluster_faults.py. Run by
`make test-cluster` and by CI."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .helpers import tiny_spec
from .localcluster import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def spec(name: str) -> dict:
    """The tiny sweep, shorter, run to the end: every trial is checked on the server."""
    tree = tiny_spec(name)
    tree["base"]["train"]["steps"] = 4
    del tree["early_stop"], tree["max_failures"]
    return tree


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


def test_trials_ride_out_a_tracking_server_restart(
    cluster: LocalCluster, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from mlflow.tracking import MlflowClient

    tree = spec("restart")
    tree["base"]["train"].update(steps=8, eval_every=2)
    path = tmp_path / "restart.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = cluster.env(SEGSWEEP_CACHE=str(cache_dir))
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, env[key])
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "segsweep.cli", "sweep", str(path), "--tracking-uri", cluster.tracking_uri],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = MlflowClient(cluster.tracking_uri)
    deadline = time.time() + 600
    while time.time() < deadline:  # restart the server once the first trial has finished
        exp = client.get_experiment_by_name("restart")
        if exp and any(
            r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags
            for r in client.search_runs([exp.experiment_id])
        ):
            break
        time.sleep(1)
    cluster.stop_mlflow()
    time.sleep(5)
    cluster.start_mlflow()
    assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    exp = client.get_experiment_by_name("restart")
    kids = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(kids) == 6 and all(k.info.status == "FINISHED" for k in kids)
    for k in kids:  # no silent gap: every evaluation and every logged step is there
        assert sorted(m.step for m in client.get_metric_history(k.info.run_id, "val/mIoU")) == [2, 4, 6, 8]
        assert sorted(m.step for m in client.get_metric_history(k.info.run_id, "train/loss")) == [2, 4, 6, 8]


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
