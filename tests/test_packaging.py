"""What ``pip install .`` (not editable) ships: a wheel built from the sources, installed into a
fresh venv, must hold the reference data and the dashboard's page, and its ``segsweep
dashboard`` must serve them.

Nothing is downloaded: the fresh venv has no pip of its own and reaches the dependencies (pip
and setuptools included) through a ``.pth`` line naming this venv's site-packages. Python does
not process the ``.pth`` files inside a folder added that way, so this venv's editable
segsweep (a ``.pth`` pointing at ``platform/``) stays out: the test checks that segsweep is
imported from the fresh install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "segsweep"

pytestmark = pytest.mark.slow  # a wheel build and an install: about ten seconds


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd``; its stdout, or a failure showing both streams."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def data_files(root: Path) -> set[str]:
    """Every file under the package's data folders, relative to the package."""
    found = set()
    for folder in ("reference", "reports/web"):
        found |= {str(p.relative_to(root)) for p in (root / folder).rglob("*") if p.is_file()}
    return {f for f in found if "__pycache__" not in f}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with segsweep installed from a wheel of a copy of the sources (the build
    writes its folders there, not into the checkout); its path and the environment to run it."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "platform", src / "platform", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, dict(os.environ))
    python = venv / "bin" / "python"
    site = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, {}).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_NO_INDEX"] = "1"  # never the network
    wheels = tmp / "wheels"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], tmp, env)
    (wheel,) = wheels.glob("segsweep-*.whl")
    # --ignore-installed: the segsweep this venv reaches through the .pth is never touched.
    run([*pip, "install", "--no-deps", "--ignore-installed", str(wheel)], tmp, env)
    return venv, env


def test_the_installed_package_is_the_fresh_one_and_holds_its_data(
    installed: tuple[Path, dict[str, str]],
) -> None:
    venv, env = installed
    where = run(
        [str(venv / "bin" / "python"), "-c", "import segsweep, sys; print(segsweep.__path__[0])"],
        venv.parent,
        env,
    ).strip()
    root = Path(where)
    assert root.is_relative_to(venv), f"segsweep imported from {root}, not the fresh install"
    # Every reference table, split list and dashboard file of the sources is in the install.
    shipped, sources = data_files(root), data_files(PACKAGE)
    assert "reference/published.csv" in sources and "reports/web/index.html" in sources
    assert any(f.startswith("reference/splits/") and f.endswith(".txt") for f in sources)
    assert sources - shipped == set()
    for name in ("reference/published.csv", "reports/web/index.html", "reports/web/app.js"):
        assert (root / name).read_bytes() == (PACKAGE / name).read_bytes()
    # and the code reads them from there
    out = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from segsweep.reports.published import published_table; "
            "from segsweep.reports.dashboard import web_root; "
            "print(len(published_table()), web_root())",
        ],
        venv.parent,
        env,
    ).split()
    assert int(out[0]) > 0 and Path(out[1]) == root / "reports" / "web"


def test_the_installed_dashboard_serves_its_page_and_api(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    venv, env = installed
    store = tmp_path / "mlflow.db"
    store.touch()  # an empty store: the dashboard reads one, never creates it
    server = subprocess.Popen(
        [str(venv / "bin" / "segsweep"), "dashboard", "--tracking-uri", f"sqlite:///{store}", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("segsweep dashboard on http://127.0.0.1:"), line + server.stderr.read()  # type: ignore[union-attr]
        url = line.split()[3]
        with urllib.request.urlopen(url, timeout=60) as page:
            body = page.read()
        assert body == (PACKAGE / "reports" / "web" / "index.html").read_bytes()
        with urllib.request.urlopen(url + "app.js", timeout=60) as script:
            assert script.read() == (PACKAGE / "reports" / "web" / "app.js").read_bytes()
        with urllib.request.urlopen(url + "api/experiments", timeout=60) as api:
            payload = json.loads(api.read())
        assert payload["store"] == f"sqlite:///{store}" and isinstance(payload["experiments"], list)
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl+C: the command's own way out
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0
