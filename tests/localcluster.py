"""The compose topology as processes on loopback: PostgreSQL (Debian's server), the MLflow
server started by the same script as the compose service (basic auth, local artifact root)
and a Ray head plus a second Ray node (``ray start``). Everything started is stopped again."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import stop_group

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f}s ({last})")


def as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: drop to the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class LocalCluster:
    root: Path
    pg_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    ray_port: int = field(default_factory=free_port)
    admin_password: str = field(default_factory=lambda: "pw-" + secrets.token_hex(8))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- addresses --------------------------------------------------------------------------
    @property
    def pg_url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}"

    @property
    def optuna_storage(self) -> str:
        return f"{self.pg_url}/optuna"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ray_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """What a client of the cluster needs: credentials and the Ray token, nothing else."""
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.root / "ray_token"),
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.admin_password,
            "RAY_DISABLE_USAGE_STATS": "1",
        }
        env.update(extra)
        return env

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_postgres(self) -> None:
        # Not under pytest's private tmp: the postgres user must be able to reach it.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="segsweep-pg-"))
        if os.geteuid() == 0:
            import pwd

            os.chown(self.pg_dir, pwd.getpwnam("postgres").pw_uid, -1)
        data = self.pg_dir / "data"
        subprocess.run(
            [*as_postgres_user(), str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )
        self._spawn(
            "postgres",
            [
                *as_postgres_user(),
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.pg_port),
                "-k",
                str(self.pg_dir),
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            dict(os.environ),
        )
        import psycopg2

        def ready() -> bool:
            psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres").close()
            return True

        wait_for(ready, 60, "PostgreSQL")
        con = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres")
        con.autocommit = True
        for db in ("mlflow", "mlflow_auth", "optuna"):
            con.cursor().execute(f"CREATE DATABASE {db}")
        con.close()

    def start_mlflow(self) -> None:
        env = self.env(
            POSTGRES_USER="postgres",
            POSTGRES_PASSWORD="unused-trust-auth",
            POSTGRES_HOST="127.0.0.1",
            POSTGRES_PORT=str(self.pg_port),
            MLFLOW_ADMIN_USERNAME="admin",
            MLFLOW_ADMIN_PASSWORD=self.admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
            MLFLOW_ARTIFACTS_DESTINATION=(self.root / "artifacts").as_uri(),
            MLFLOW_HOST="127.0.0.1",
            MLFLOW_PORT=str(self.mlflow_port),
            MLFLOW_WORKERS="1",
            MLFLOW_ALLOWED_HOSTS=f"127.0.0.1:{self.mlflow_port},localhost:{self.mlflow_port}",
        )
        self._spawn("mlflow", [str(REPO / "deploy/mlflow/start.sh")], env)
        wait_for(
            lambda: urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2).status == 200,
            120,
            "the MLflow server",
        )

    def stop_mlflow(self) -> None:
        self._stop("mlflow")

    def start_ray(self) -> None:
        (self.root / "ray_token").write_text(secrets.token_hex(32))
        temp = Path(f"/tmp/ray-{self.ray_port}")  # Ray's socket paths must stay short
        self.temp = temp
        common = ["--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
        self._spawn(
            "ray-head",
            [
                str(VENV_BIN / "ray"),
                "start",
                "--head",
                "--port",
                str(self.ray_port),
                "--include-dashboard",
                "false",
                "--temp-dir",
                str(temp),
                *common,
            ],
            self.env(),
        )
        wait_for(lambda: self._ray_nodes() >= 1, 120, "the Ray head")
        self._spawn(
            "ray-node", [str(VENV_BIN / "ray"), "start", "--address", self.ray_address, *common], self.env()
        )
        wait_for(lambda: self._ray_nodes() >= 2, 120, "the second Ray node")

    def _ray_nodes(self) -> int:
        out = subprocess.run(
            [str(VENV_BIN / "ray"), "status", "--address", self.ray_address],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.count(" node_") if out.returncode == 0 else 0

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            # `ray start --block` sits out a SIGTERM for 30 s: at teardown its group is killed
            # after 3 (the group holds the raylet, the GCS and the workers; none is left).
            stop_group(proc, grace_s=3 if name.startswith("ray") else 30)

    def stop(self) -> None:
        for name in ("ray-node", "ray-head", "mlflow", "postgres"):
            self._stop(name)
        for folder in (getattr(self, "temp", None), getattr(self, "pg_dir", None)):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def alive(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is None]
