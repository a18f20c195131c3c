"""docker-compose.yml: services, volumes, health checks and start order, no literal secrets,
UIs published on loopback by default."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
UI_PORTS = {"5000", "8265", "8050", "8080", "9001"}


def test_the_stack_has_every_service_and_volume() -> None:
    assert {
        "postgres",
        "minio",
        "minio-init",
        "mlflow",
        "ray-head",
        "ray-worker",
        "dashboard",
        "optuna-dashboard",
    } <= set(SERVICES)
    assert {"pgdata", "miniodata", "sweeps", "data"} <= set(COMPOSE["volumes"])
    assert any(v.startswith("pgdata:") for v in SERVICES["postgres"]["volumes"])
    assert any(v.startswith("miniodata:") for v in SERVICES["minio"]["volumes"])
    assert "mb --ignore-existing store/mlflow" in " ".join(SERVICES["minio-init"]["command"])
    for node in ("ray-head", "ray-worker"):  # Ray nodes share the sweep storage
        assert any(v.startswith("sweeps:") for v in SERVICES[node]["volumes"])


def test_health_checks_and_start_order() -> None:
    for name, svc in SERVICES.items():
        if name != "minio-init":
            assert "healthcheck" in svc, name
    dep = {name: svc.get("depends_on", {}) for name, svc in SERVICES.items()}
    assert dep["mlflow"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    assert dep["minio-init"]["minio"]["condition"] == "service_healthy"
    assert dep["ray-head"]["mlflow"]["condition"] == "service_healthy"
    assert dep["ray-worker"]["ray-head"]["condition"] == "service_healthy"
    assert dep["dashboard"]["mlflow"]["condition"] == "service_healthy"


def test_mlflow_uses_postgres_s3_and_basic_auth() -> None:
    mlflow = SERVICES["mlflow"]
    script = (REPO / mlflow["command"][0].replace("/opt/segsweep/", "")).read_text()
    assert "--app-name basic-auth" in script and '/mlflow"' in script and "postgresql" in script
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert os.access(REPO / "deploy/mlflow/start.sh", os.X_OK)


def test_gpu_workers_are_scalable_and_reserve_gpus() -> None:
    worker = SERVICES["ray-worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "container_name" not in worker and "ports" not in worker  # --scale ray-worker=N works
    assert worker["build"] == "." and worker["image"] == "segsweep:latest"  # the repo's own image


def test_only_uis_are_published_and_on_loopback_by_default() -> None:
    published = []
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            host, _, rest = port.rpartition(":")
            bind, _, _ = host.rpartition(":")
            assert bind == "${BIND_ADDRESS:-127.0.0.1}", (name, port)
            published.append(rest)
    assert set(published) == UI_PORTS
    assert "ports" not in SERVICES["postgres"]


SECRET_KEY = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", re.I)


def test_no_literal_secrets_in_the_compose_file() -> None:
    def check(env: dict) -> None:
        for key, value in env.items():
            if SECRET_KEY.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", str(value)), (key, value)
            assert not re.search(r"://[^:/@$]+:[^@$]+@", str(value)), (key, value)  # user:pw@ literal

    for svc in SERVICES.values():
        env = svc.get("environment", {})
        check(env if isinstance(env, dict) else dict(e.split("=", 1) for e in env))
        assert ".env" in svc.get("env_file", [".env"])
    text = (REPO / "docker-compose.yml").read_text()
    example = (REPO / ".env.example").read_text()
    for var in set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", text)):  # $${X} is the container's own
        assert re.search(rf"^{var}=", example, re.M), f"{var} missing from .env.example"
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked == "" and ".env" in (REPO / ".gitignore").read_text().split()


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_parses_the_file_where_it_can(tmp_path: Path) -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("this docker client has no compose plugin")
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    out = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(REPO / "docker-compose.yml"),
            "--env-file",
            str(tmp_path / ".env"),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
