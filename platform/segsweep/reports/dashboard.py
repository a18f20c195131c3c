"""The segsweep dashboard: a small web server over the MLflow store.

``segsweep dashboard`` serves the single page in ``web/`` (beside this module) and a JSON API:

    /api/experiments                 experiments in the store
    /api/curve?experiment=&value=    label-ratio summary, paired differences, published points
    /api/curve.png?experiment=&value=  the curve plot
    /api/runs?experiment=            runs with their method, ratio, seed and summary values
    /api/run?id=                     one run: params, tags, metric histories, panel images
    /api/artifact?run=&path=         a logged image (panels, curves) of a run

It reads MLflow through ``segsweep.tracking`` (a local SQLite store or a server) and writes
nothing. The page renders every name with ``textContent``: run names and tags are data, never
markup. It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import errno
import json
import math
import mimetypes
import os
import socket
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from segsweep.errors import ConfigError, UserError
from segsweep.reports import curve as report
from segsweep.reports.answer import TAG_COUNTED, ui_base_url
from segsweep.tracking import mlflow_view
from segsweep.tracking.store import (
    download_artifact,
    fetch_runs,
    get_run,
    image_artifacts,
    list_experiments,
    metric_history,
)
from segsweep.tracking.tags import TAG_KIND, TAG_PHASE, TAG_STATUS
from segsweep.tracking.uris import redact, resolve_uri

#: The dashboard's single page (index.html, app.js, style.css), inside the package.
WEB = Path(__file__).resolve().parent / "web"

HISTORY_KEYS = (
    "train/loss",
    "train/loss_sup",
    "train/loss_unsup",
    "train/mask_ratio",
    "lr",
    "val/mIoU",
    "tune/mIoU",
    "val_teacher/mIoU",
    "pseudo/mIoU",
    "pseudo/kept_share",
    "pseudo/kept_acc",
)


def web_root() -> Path:
    """The page's folder: ``web/`` beside this module, shipped as package data (an installed
    segsweep and a checkout alike), or $SEGSWEEP_DASHBOARD_DIR where it is set (a page of
    one's own)."""
    env = os.environ.get("SEGSWEEP_DASHBOARD_DIR")
    if env:
        return Path(env)
    return WEB


def _clean(value: Any) -> Any:
    """JSON has no NaN: missing numbers become null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class Dashboard:
    """The API's logic, independent of HTTP (tested directly and through a browser)."""

    def __init__(self, tracking_uri: str | None, mlflow_url: str | None) -> None:
        self.uri = resolve_uri(tracking_uri)
        # Where the store's MLflow UI is: given, or the server of an http(s) store; a local
        # store's UI runs only where someone started `mlflow ui`, so it stays unset (said).
        served = redact(self.uri).startswith(("http://", "https://"))
        self.mlflow_url = (mlflow_url or (ui_base_url(self.uri) if served else "")).rstrip("/")
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="segsweep-dashboard-"))

    def _cached(self, key: tuple[str, str], make: Any, ttl: float = 15.0) -> Any:
        with self._lock:
            hit = self._cache.get(key)
            if hit and time.time() - hit[0] < ttl:
                return hit[1]
        value = make()
        with self._lock:
            self._cache[key] = (time.time(), value)
        return value

    def _link(self, experiment_id: str, run_id: str | None = None) -> str:
        """A link into the MLflow UI's Model training view ("" while its address is unset)."""
        if not self.mlflow_url:
            return ""
        if run_id is None:
            return mlflow_view.runs_link(self.mlflow_url, experiment_id)
        return mlflow_view.run_link(self.mlflow_url, experiment_id, run_id)

    def experiments(self) -> dict[str, Any]:
        return {
            "experiments": list_experiments(self.uri),
            "mlflow_url": self.mlflow_url,
            "store": redact(self.uri),
        }

    def _runs(self, experiment: str, sweep: str = "") -> list:
        """The experiment's runs, or (``sweep``: a parent's run id or name) one sweep's."""
        runs = self._cached(("runs", experiment), lambda: fetch_runs(self.uri, experiment))
        return report.one_sweep(runs, sweep, experiment)[1] if sweep else runs

    def curve(self, experiment: str, value: str, sweep: str = "") -> dict[str, Any]:
        curve = report.build_curve(self._runs(experiment, sweep), value)
        return _clean(
            {
                "rule": curve.rule,
                "rule_text": report.RULE_TEXT[curve.rule],
                "summary": [vars(s) for s in curve.summary],
                "differences": [vars(d) for d in curve.differences],
                "published": curve.published,
                "dataset": curve.dataset,
                "family": curve.family,
                "n_runs": len(curve.rows),
                "notes": curve.notes,
            }
        )

    def curve_png(self, experiment: str, value: str, sweep: str = "") -> bytes:
        def make() -> bytes:
            curve = report.build_curve(self._runs(experiment, sweep), value)
            path = report.plot(
                curve,
                self._tmp / f"curve-{abs(hash((experiment, value, sweep)))}.png",
                f"{experiment}{f' ({sweep})' if sweep else ''}: mIoU vs label ratio",
            )
            return path.read_bytes()

        return self._cached(("png", f"{experiment}|{value}|{sweep}"), make)

    def runs(self, experiment: str, sweep: str = "") -> dict[str, Any]:
        """The runs table, and the experiment's sweeps (to choose one where it has several)."""
        sweeps = [
            {"id": p.run_id, "name": p.name, "started": report.started_at(p)}
            for p in report.sweep_parents(self._runs(experiment))
        ]
        rows = []
        for r in self._runs(experiment, sweep):
            if r.tags.get(TAG_KIND) == "sweep":
                continue
            rows.append(
                {
                    "id": r.run_id,
                    "name": r.name,
                    "status": r.status,
                    "segsweep_status": r.tags.get(TAG_STATUS, ""),
                    "phase": r.tags.get(TAG_PHASE, ""),
                    "method": r.params.get("method", ""),
                    "label_ratio": r.params.get("label_ratio", ""),
                    "seed": r.params.get("seed", ""),
                    "val_mIoU_last": r.metrics.get("val/mIoU_last"),
                    "tune_mIoU_best": r.metrics.get("tune/mIoU_best"),
                    "experiment_id": r.experiment_id,
                    # the run the curve counts for its cell and seed (answer.py tags it)
                    "counted": r.tags.get(TAG_COUNTED) == "true",
                    "mlflow_link": self._link(r.experiment_id, r.run_id),
                }
            )
        rows.sort(key=lambda x: (x["method"], x["label_ratio"], x["seed"], x["name"]))
        return _clean({"runs": rows, "sweeps": sweeps, "mlflow_url": self.mlflow_url})

    def run(self, run_id: str) -> dict[str, Any]:
        r = get_run(self.uri, run_id)
        keys = [k for k in HISTORY_KEYS if k in r.metrics] + sorted(
            k for k in r.metrics if k.startswith(("cam/", "proxy/", "match/")) and k.endswith("loss")
        )
        images = image_artifacts(self.uri, run_id)
        return _clean(
            {
                "id": r.run_id,
                "name": r.name,
                "status": r.status,
                "experiment_id": r.experiment_id,
                "params": r.params,
                "tags": {k: v for k, v in r.tags.items() if not k.startswith("mlflow.")},
                "metrics": r.metrics,
                "history": metric_history(self.uri, run_id, keys),
                "images": [
                    {**i, "url": f"/api/artifact?run={quote(run_id)}&path={quote(i['path'], safe='')}"}
                    for i in images
                ],
                "mlflow_url": self.mlflow_url,
                "mlflow_link": self._link(r.experiment_id, r.run_id),
            }
        )

    def artifact(self, run_id: str, path: str) -> tuple[bytes, str]:
        if ".." in path.split("/") or not path.startswith(("images/", "curve/")) or not path.endswith(".png"):
            raise ConfigError(f"artifact {path!r}: only logged images can be served")
        key = ("artifact", f"{run_id}/{path}")
        local = self._cached(
            key, lambda: download_artifact(self.uri, run_id, path, self._tmp / run_id), ttl=1e9
        )
        return Path(local).read_bytes(), "image/png"


def make_handler(app: Dashboard, root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "segsweep-dashboard"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per error only
            return

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            try:
                if parts.path == "/api/experiments":
                    return self._json(200, app.experiments())
                sweep = q.get("sweep", "")
                if parts.path == "/api/curve":
                    return self._json(200, app.curve(q["experiment"], q.get("value", "last"), sweep))
                if parts.path == "/api/curve.png":
                    png = app.curve_png(q["experiment"], q.get("value", "last"), sweep)
                    return self._send(200, png, "image/png")
                if parts.path == "/api/runs":
                    return self._json(200, app.runs(q["experiment"], sweep))
                if parts.path == "/api/run":
                    return self._json(200, app.run(q["id"]))
                if parts.path == "/api/artifact":
                    body, ctype = app.artifact(q["run"], q["path"])
                    return self._send(200, body, ctype)
                return self._static(parts.path)
            except KeyError as exc:
                return self._json(400, {"error": f"missing query parameter {exc}"})
            except UserError as exc:
                return self._json(404, {"error": redact(str(exc))})

        def _static(self, path: str) -> None:
            name = "index.html" if path in ("", "/") else path.lstrip("/")
            target = (root / name).resolve()
            if root.resolve() not in target.parents or not target.is_file():
                return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            return self._send(200, target.read_bytes(), ctype)

    return Handler


def serve(tracking_uri: str | None, host: str, port: int, mlflow_url: str | None) -> ThreadingHTTPServer:
    """A server ready to ``serve_forever()`` (port 0 picks a free one)."""
    root = web_root()
    if not (root / "index.html").is_file():
        raise ConfigError(f"{root}: dashboard files not found (set SEGSWEEP_DASHBOARD_DIR)")
    app = Dashboard(tracking_uri, mlflow_url)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(app, root))
    except OSError as exc:  # an unknown or foreign address is the host's fault, a busy port the port's
        flag = (
            f"--host {host}"
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
            else f"--port {port}"
        )
        raise ConfigError(f"{flag}: cannot listen on {host}:{port} ({exc.strerror})") from None
    return server
