"""The compose topology as processes on loopback: PostgreSQL (Debian's server), an S3 server
(moto's, where compose runs MinIO) behind a link a test can cut, the MLflow server started by
the same script as the compose service (basic auth, artifacts to the S3 bucket) and a Ray
head plus a second Ray node (``ray start``). Everything started is stopped again."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


#: The artifact bucket and the S3 login of the MLflow server (moto takes any).
S3_BUCKET = "mlflow"
S3_LOGIN = {
    "AWS_ACCESS_KEY_ID": "segsweep",
    "AWS_SECRET_ACCESS_KEY": "segsweep-s3",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _boto_login() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_LOGIN["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_LOGIN["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_LOGIN["AWS_DEFAULT_REGION"],
    }


#: Each Ray node: one CPU (trials of one CPU run one per node), loopback, no usage reports.
RAY_NODE = ["--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (zombies, gone but not yet reaped, left out)."""
    members = []
    for proc in Path("/proc").iterdir():
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp ...", comm may hold spaces
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: drop to the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class Link:
    """A TCP link on loopback that a test can cut: connections to ``port`` reach
    ``127.0.0.1:target`` while it is up; cut, new ones are refused and open ones dropped, as a
    store behind a network that went away."""

    def __init__(self, target: int) -> None:
        self.port, self.target = free_port(), target
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self._serve, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
            listener.close()
        with self._lock:
            for conn in self._open:
                conn.close()
            self._open.clear()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                near, _ = listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self._lock:
                self._open.update((near, far))
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (a, b):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


@dataclass
class LocalCluster:
    root: Path
    pg_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    ray_port: int = field(default_factory=free_port)
    s3_port: int = field(default_factory=free_port)
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
        log = (self.root / f"{name}.log").open("a")  # a restart appends
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_postgres(self) -> None:
        # Not under pytest's private tmp: the postgres user must be able to reach it.
        self.pg_dir = Path(tempfile.mkdtemp(prefix="segsweep-pg-"))
        if os.geteuid() == 0:
            import pwd

            os.chown(self.pg_dir, pwd.getpwnam("postgres").pw_uid, -1)
        self.pg_data = self.pg_dir / "data"
        subprocess.run(
            [
                *as_postgres_user(),
                str(PG_BIN / "initdb"),
                "-D",
                str(self.pg_data),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
        )
        self.start_postgres_server()
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres")
        con.autocommit = True
        for db in ("mlflow", "mlflow_auth", "optuna"):
            con.cursor().execute(f"CREATE DATABASE {db}")
        con.close()

    def start_postgres_server(self) -> None:
        """The PostgreSQL server on its data folder (again, after ``stop_postgres``)."""
        cmd = [
            str(PG_BIN / "postgres"),
            "-D",
            str(self.pg_data),
            "-p",
            str(self.pg_port),
            "-k",
            str(self.pg_dir),
        ]
        self._spawn(
            "postgres", [*as_postgres_user(), *cmd, "-c", "listen_addresses=127.0.0.1"], dict(os.environ)
        )
        import psycopg2

        def ready() -> bool:
            psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres", dbname="postgres").close()
            return True

        wait_for(ready, 60, "PostgreSQL")

    def stop_postgres(self) -> None:
        """PostgreSQL's fast shutdown (open sessions are cut, as in a restart or a failover)."""
        stop = [str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.pg_data), "-m", "fast", "-w"]
        subprocess.run([*as_postgres_user(), *stop], check=True, capture_output=True, timeout=60)
        self.procs.pop("postgres").wait(timeout=30)

    def start_mlflow(self) -> None:
        env = self.env(
            POSTGRES_USER="postgres",
            POSTGRES_PASSWORD="unused-trust-auth",
            POSTGRES_HOST="127.0.0.1",
            POSTGRES_PORT=str(self.pg_port),
            MLFLOW_ADMIN_USERNAME="admin",
            MLFLOW_ADMIN_PASSWORD=self.admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
            # The artifact store: S3 (moto's server, as compose runs MinIO), reached through a
            # link the tests can cut.
            MLFLOW_ARTIFACTS_DESTINATION=f"s3://{S3_BUCKET}",
            MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_link.port}",
            **S3_LOGIN,
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

    def start_s3(self) -> None:
        """An S3-compatible server (moto's, in memory) with the artifact bucket, behind ``s3_link``."""
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)]
        self._spawn("s3", cmd, {**os.environ, **S3_LOGIN})
        wait_for(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.s3_port}/", timeout=2).status == 200,
            60,
            "S3",
        )
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.s3_port}", **_boto_login())
        s3.create_bucket(Bucket=S3_BUCKET)
        self.s3_link = Link(self.s3_port)

    def stop_mlflow(self) -> None:
        self._stop("mlflow")

    def start_ray(self) -> None:
        (self.root / "ray_token").write_text(secrets.token_hex(32))
        self.start_ray_head()
        self.start_ray_node()

    def start_ray_head(self) -> None:
        """The Ray head (its GCS, a raylet of one CPU), at the same port each time."""
        temp = Path(f"/tmp/ray-{self.ray_port}")  # Ray's socket paths must stay short
        self.temp = temp
        head = [
            "--head",
            "--port",
            str(self.ray_port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(temp),
        ]
        self._spawn("ray-head", [str(VENV_BIN / "ray"), "start", *head, *RAY_NODE], self.env())
        wait_for(lambda: self._ray_nodes() >= 1, 120, "the Ray head")

    def start_ray_node(self) -> None:
        """A second Ray node of one CPU joining the head (again, after ``kill("ray-node")``)."""
        before = self._ray_nodes()
        self._spawn(
            "ray-node", [str(VENV_BIN / "ray"), "start", "--address", self.ray_address, *RAY_NODE], self.env()
        )
        wait_for(lambda: self._ray_nodes() > before, 120, "the second Ray node")

    def node_id(self, name: str) -> str:
        """The Ray node ID of ``ray-head`` or ``ray-node``: its raylet's ``--node_id``."""
        for pid in group_members(self.procs[name].pid):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for arg in args:
                if arg.startswith(b"--node_id="):
                    return arg.split(b"=", 1)[1].decode()
        raise LookupError(f"no raylet in {name}'s process group")

    def kill(self, name: str) -> None:
        """SIGKILL ``name``'s process group, as a machine lost: for a Ray node its raylet and
        every worker on it (a preempted or rebooted machine, the OOM killer), nothing left."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not group_alive(proc.pid), 30, f"{name}'s processes to go")

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
        for name in ("ray-node", "ray-head", "mlflow", "s3", "postgres"):
            self._stop(name)
        if getattr(self, "s3_link", None) is not None:
            self.s3_link.cut()
        for folder in (getattr(self, "temp", None), getattr(self, "pg_dir", None)):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def alive(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is None]
