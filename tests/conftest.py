"""Shared fixtures: a tiny synthetic dataset cached once per session, small run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # make test: 1 per worker
# Tests make their own stores; a user's server in the environment must never receive them.
os.environ.pop("MLFLOW_TRACKING_URI", None)


#: The longest modules by their time on 2 cores (2026-12-07), longest first, then the rest as
#: collected: under `make test`'s two workers (``--dist loadfile``, a module at a time each) the
#: two longest start at once on their own workers and no long module starts last, to run alone
#: while the other worker idles (longest-processing-time-first scheduling).
LONGEST_FIRST = (
    "test_cluster.py",
    "test_sweep.py",
    "test_protocols.py",
    "test_cli_run.py",
    "test_reliability.py",
    "test_mlflow_view.py",
    "test_bench.py",
    "test_packaging.py",
    "test_methods_weak.py",
    "test_contract.py",
    "test_probe.py",
    "test_bad_input.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each module, and of the rest, as collected


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("segsweep-cache")
    os.environ["SEGSWEEP_CACHE"] = str(path)
    return path


def tiny_tree(cache: Path, **over: object) -> dict:
    """A run config small enough for a few CPU seconds: 64 px, 96 training images."""
    tree: dict = {
        "method": "supervised",
        "seed": 0,
        "data": {
            "name": "synthetic",
            "root": str(cache),
            "label_ratio": 0.25,
            "tune_size": 8,
            "crop_size": 64,
            "synthetic": {"image_size": 64, "num_train": 96, "num_val": 16},
        },
        "model": {"arch": "deeplabv3plus", "encoder": "tu-mobilenetv3_small_050", "decoder_channels": 32},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 1},
        "eval": {"diag_samples": 4, "panel_samples": 2},
        "tracking": {"enabled": False, "experiment": "tests"},
    }
    from segsweep.config import set_dotted

    for key, value in over.items():
        set_dotted(tree, key, value)
    return tree


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """PostgreSQL, S3, the authenticated MLflow server and two Ray nodes on loopback
    (tests/localcluster.py), for tests/test_cluster.py; every process stopped after that
    module. (Kept for the whole session, one clean-clone run of 2026-12-06 found
    Ctrl+C no longer stopping two later tests' processes; cause not found.)"""
    from .localcluster import PG_BIN, LocalCluster

    if not (PG_BIN / "postgres").exists():
        pytest.fail("PostgreSQL is missing: `make test-cluster` installs Debian's postgresql package")
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_postgres()
        c.start_s3()
        c.start_mlflow()
        c.start_ray()
        yield c
    finally:
        c.stop()
        assert c.alive() == []


@pytest.fixture
def tiny(cache_dir: Path, tmp_path: Path):
    """Factory: tiny(**{"train.steps": 6}) -> validated RunConfig writing under tmp_path."""
    from segsweep.config import validate_run_config

    def make(**over: object):
        over.setdefault("output_dir", str(tmp_path / "runs"))
        return validate_run_config(tiny_tree(cache_dir, **over), "test")

    return make


#: The published split lists, as shipped with segsweep (copied from shared/reference).
SHARED = Path(__file__).resolve().parents[1] / "platform" / "segsweep" / "reference" / "splits" / "unimatch"
