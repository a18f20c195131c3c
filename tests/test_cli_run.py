"""``segsweep run`` end to end: what a finished run leaves in MLflow, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import tiny_tree
from .fixtures import write_folder
from .helpers import assert_user_error, runs_in, segsweep, segsweep_here, write_config


@pytest.mark.slow
def test_a_short_run_leaves_a_finished_mlflow_run_with_metrics_and_artifacts(
    cache_dir: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tree = tiny_tree(cache_dir, method="fixmatch", **{"tracking.enabled": True, "train.steps": 4})
    cfg = write_config(tmp_path / "run.yaml", tree)
    proc = segsweep(
        "run", str(cfg), "--tracking-uri", uri, "--set", "fixmatch.ema_teacher=true", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: fixmatch run" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout

    [run] = runs_in(uri, "tests")
    assert run.info.status == "FINISHED"
    p, tags, m = run.data.params, run.data.tags, run.data.metrics
    assert p["method"] == "fixmatch" and p["dataset"] == "synthetic"
    assert float(p["label_ratio"]) == 0.25 and p["seed"] == "0" and p["n_labeled"] == "22"
    assert p["fixmatch.ema_teacher"] == "True" and "supervised" not in " ".join(p)
    # what "auto" became here: a CPU run, full precision, no loader workers
    assert (p["train.device"], p["resolved.device"], p["resolved.amp"]) == ("auto", "cpu", "off")
    assert p["resolved.channels_last"] == "False" and p["resolved.num_workers"] == "0"
    assert tags["segsweep.split_family"] == "generated/seed0"
    assert tags["segsweep.eval_mode"] == "whole" and tags["segsweep.status"] == "finished"
    for key in (
        "train/loss",
        "train/loss_sup",
        "train/loss_unsup",
        "train/mask_ratio",
        "lr",
        "val/mIoU",
        "val/pixel_acc",
        "val/iou/disk-stripes",
        "tune/mIoU",
        "val_teacher/mIoU",
        "val/mIoU_last",
        "val/mIoU_best",
        "val/mIoU_at_best_tune",
        "val_teacher/mIoU_last",
        "pseudo/mIoU",
        "pseudo/kept_share",
    ):
        assert key in m, key

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run.info.run_id, "val/mIoU")
    assert sorted(h.step for h in history) == [2, 4]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "images"} <= files
    ckpts = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/last.pt", "checkpoints/best.pt"}
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert images and all("panels" in f for f in images)


@pytest.mark.slow
def test_resume_continues_the_same_mlflow_run(cache_dir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tree = tiny_tree(
        cache_dir,
        **{
            "tracking.enabled": True,
            "train.steps": 6,
            "debug.fail_at_step": 4,
            "output_dir": str(tmp_path / "runs"),
        },
    )
    cfg = write_config(tmp_path / "run.yaml", tree)
    first = segsweep("run", str(cfg), "--tracking-uri", uri, cwd=tmp_path)
    assert first.returncode == 1 and "Traceback" not in first.stderr
    [line] = [x for x in first.stderr.splitlines() if x.startswith("error: ")]
    assert "injected failure at step 4" in line and "segsweep run --resume" in line
    [run] = runs_in(uri)
    assert run.info.status == "FAILED" and "injected failure" in run.data.tags["segsweep.error"]
    [run_dir] = (tmp_path / "runs").iterdir()
    again = segsweep("run", "--resume", str(run_dir), "--tracking-uri", uri, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "note: resuming" not in again.stdout  # nothing changed
    [run] = runs_in(uri)
    assert run.info.status == "FINISHED" and run.data.tags["segsweep.status"] == "finished"
    assert "segsweep.error" not in run.data.tags  # the earlier attempt's failure no longer holds
    client = __import__("mlflow").tracking.MlflowClient(uri)
    assert sorted(h.step for h in client.get_metric_history(run.info.run_id, "val/mIoU")) == [2, 4, 6]
    # step 3 was trained (and logged) before the failure and again after the checkpoint at 2:
    # one point per step, as an uninterrupted run has
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(h.step for h in losses) == [1, 2, 3, 4, 5, 6]
    assert "segsweep.resumed_with" not in run.data.tags  # resumed as it was configured
    # extended on resume: MLflow keeps a param's first value, the tag says what ran instead
    # (this resume and the next in this process: the real one is above)
    longer = segsweep_here(
        "run", "--resume", str(run_dir), "--tracking-uri", uri, "--set", "train.steps=8", cwd=tmp_path
    )
    assert longer.returncode == 0, longer.stderr
    assert (
        "note: resuming with settings changed since its last attempt: train.steps: 6 -> 8; the "
        "learning-rate schedule follows the new train.steps from the checkpoint on"
    ) in longer.stdout
    [run] = runs_in(uri)
    assert run.data.params["train.steps"] == "6"
    assert run.data.tags["segsweep.resumed_with"] == "train.steps: 6 -> 8"
    assert sorted(h.step for h in client.get_metric_history(run.info.run_id, "val/mIoU")) == [2, 4, 6, 8]
    # a resume as first configured again: the earlier resume's tag no longer holds
    again = segsweep_here(
        "run", "--resume", str(run_dir), "--tracking-uri", uri, "--set", "train.steps=6", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    [run] = runs_in(uri)
    assert "segsweep.resumed_with" not in run.data.tags


BAD_CASES = {
    "unknown method": ({"method": "mixmatch"}, ["method", "unknown method 'mixmatch'", "fixmatch"]),
    "ratio zero": ({"data.label_ratio": 0}, ["data.label_ratio", "greater than 0"]),
    "ratio above one": ({"data.label_ratio": 1.5}, ["data.label_ratio", "less than or equal to 1"]),
    "unknown dataset": ({"data.name": "imagenet"}, ["data.name", "synthetic"]),
    "unknown key": ({"train.stepz": 3}, ["train.stepz", "unknown key"]),
    "wrong type": ({"train.steps": "many"}, ["train.steps", "integer"]),
    "missing root": ({"data.name": "voc", "data.root": "/nonexistent/voc"}, ["/nonexistent/voc"]),
    "root required": ({"data.name": "cityscapes", "data.root": None}, ["data.root", "required"]),
    "missing split": ({"data.split": "/nonexistent/split"}, ["data.split", "synthetic"]),
    "missing weights": (
        {"model.encoder_weights": "/nonexistent/enc.pt"},
        ["model.encoder_weights", "not found"],
    ),
    "blur wider than the crop": (
        {"data.augment.blur_sigma_max": 22},
        ["data", "augment.blur_sigma_max", "crop_size 64", "at most 21.0"],
    ),
    "missing proxy": (
        {"method": "mixandmatch", "mixandmatch.proxy_from": "/nonexistent/proxy.pt"},
        ["mixandmatch.proxy_from", "not found"],
    ),
    "nothing unlabeled": (
        {"method": "fixmatch", "data.label_ratio": 1.0},
        ["data.label_ratio", "no unlabeled images left", "use supervised"],
    ),
    "no such device": ({"train.device": "cuda:63"}, ["train.device", "'cuda:63' asked for"]),
    "not a device": ({"train.device": "gpu"}, ["train.device", "'gpu' is not a device"]),
    "tuning set too big": ({"data.tune_size": 100000}, ["data.tune_size", "holds out 100000"]),
    "too many labeled": ({"data.num_labeled": 100000}, ["data.num_labeled", "asks for 100000"]),
    "unknown encoder": ({"model.encoder": "resnet999"}, ["model.encoder", "'resnet999'"]),
    "root is a file": ({"data.root": __file__}, ["data.root", "is a file, not a folder"]),
    "output_dir is a file": ({"output_dir": __file__}, ["output_dir", "is a file, not a folder"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_no_run(case: str, cache_dir: Path, tmp_path: Path) -> None:
    over, fragments = BAD_CASES[case]
    tree = tiny_tree(cache_dir, **{"tracking.enabled": True, **over})
    cfg = write_config(tmp_path / "bad.yaml", tree)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # One case through a real process (a refusal there is the same code path); the rest here.
    run = segsweep if case == "unknown method" else segsweep_here
    proc = run("run", str(cfg), "--tracking-uri", uri, cwd=tmp_path)
    assert_user_error(proc, *fragments)
    assert len(proc.stderr) < 400  # one readable line (smp's encoder error listed 1.4 KB of names)
    assert not (tmp_path / "mlflow.db").exists() or runs_in(uri) == []
    assert not (tmp_path / "runs").exists()


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    assert_user_error(segsweep("run", "nope.yaml", cwd=tmp_path), "nope.yaml", "not found")
    (tmp_path / "broken.yaml").write_text("method: [fixmatch\n")
    assert_user_error(segsweep_here("run", "broken.yaml", cwd=tmp_path), "broken.yaml", "not valid YAML")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert_user_error(segsweep_here("run", "list.yaml", cwd=tmp_path), "list.yaml", "mapping")
    (tmp_path / "twice.yaml").write_text("method: supervised\ntrain:\n  steps: 3\nmethod: fixmatch\n")
    assert_user_error(
        segsweep_here("run", "twice.yaml", cwd=tmp_path), "twice.yaml", "key 'method' given twice (line 4)"
    )
    (tmp_path / "ok.yaml").write_text("method: supervised\n")
    assert_user_error(segsweep_here("run", "ok.yaml", "--set", "novalue", cwd=tmp_path), "--set", "key=value")
    assert_user_error(segsweep_here("run", "--bogus", cwd=tmp_path), "unrecognized arguments")


def folder_run(tmp_path: Path, cache_dir: Path) -> tuple[Path, str]:
    root = write_folder(tmp_path / "data", n_masked=12, n_unlabeled=2)
    tree = tiny_tree(
        cache_dir,
        **{
            "data.name": "folder",
            "data.root": str(root),
            "data.tune_size": 0,
            "data.label_ratio": 0.5,
            "tracking.enabled": True,
            "train.batch_size": 2,
            "eval.batch_size": 1,
        },
    )
    return write_config(tmp_path / "run.yaml", tree), f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.slow
def test_unreadable_image_found_up_front_leaves_no_run(cache_dir: Path, tmp_path: Path) -> None:
    cfg, uri = folder_run(tmp_path, cache_dir)
    (tmp_path / "data/images/im00.png").write_bytes(b"\x89PNG truncated")  # the first val image
    proc = segsweep_here("run", str(cfg), "--tracking-uri", uri, cwd=tmp_path)
    assert_user_error(proc, "im00.png", "cannot read image")
    assert not (tmp_path / "mlflow.db").exists() or runs_in(uri) == []


@pytest.mark.slow
def test_bad_mask_met_during_training_fails_the_run_cleanly(cache_dir: Path, tmp_path: Path) -> None:
    from segsweep.config import load_run_config
    from segsweep.data import build_data

    cfg, uri = folder_run(tmp_path, cache_dir)
    labeled = build_data(load_run_config(cfg).data).split.labeled
    for sample in labeled[1:]:  # every labeled mask but the one read up front
        Image.fromarray(np.full((40, 40), 9, dtype=np.uint8), mode="L").save(tmp_path / "data" / sample.mask)
    proc = segsweep_here("run", str(cfg), "--tracking-uri", uri, cwd=tmp_path)
    assert "run " in proc.stdout  # the run had started: the bad mask was met while training
    assert_user_error(proc, ".png", "class id 9", "3 classes")
    statuses = [r.info.status for r in runs_in(uri)]
    assert statuses == ["FAILED"]  # the record of what happened stays in MLflow ...
    assert not (tmp_path / "runs").exists()  # ... but no folder without a checkpoint to resume


@pytest.mark.slow
def test_resuming_from_a_corrupt_checkpoint_leaves_the_finished_run_as_it_was(
    cache_dir: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = write_config(
        tmp_path / "run.yaml", tiny_tree(cache_dir, **{"tracking.enabled": True, "train.steps": 2})
    )
    assert segsweep_here("run", str(cfg), "--tracking-uri", uri, cwd=tmp_path).returncode == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    proc = segsweep_here("run", "--resume", str(run_dir), "--tracking-uri", uri, cwd=tmp_path)
    assert_user_error(proc, "last.pt", "not a readable checkpoint")
    [run] = runs_in(uri)
    assert run.info.status == "FINISHED" and run.data.tags["segsweep.status"] == "finished"


@pytest.mark.slow
def test_report_and_server_commands_name_their_bad_flag(tmp_path: Path) -> None:
    # a report never creates the store it was asked to read, nor writes into a file
    assert_user_error(
        segsweep("curve", "--experiment", "x", cwd=tmp_path), "the default store: no MLflow store at"
    )
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "afile").write_text("not a store")
    not_a_db = f"sqlite:///{tmp_path / 'afile'}"
    assert_user_error(
        segsweep("curve", "--experiment", "x", "--tracking-uri", not_a_db, cwd=tmp_path),
        "not an MLflow store",
    )
    assert_user_error(
        segsweep("dashboard", "--tracking-uri", not_a_db, cwd=tmp_path), "afile", "not an MLflow store"
    )
    assert_user_error(
        segsweep("curve", "--experiment", "x", "--out", "afile", cwd=tmp_path), "--out", "afile"
    )
    assert_user_error(segsweep("dashboard", "--port", "99999", cwd=tmp_path), "--port", "from 0 to 65535")
    assert_user_error(segsweep("check-data", "--max", "-1", cwd=tmp_path), "--max", "at least 1")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True])
def test_sigterm_ends_a_run_killed_with_one_line(cache_dir: Path, tmp_path: Path, checkpointed: bool) -> None:
    """A scheduler's or ``timeout``'s SIGTERM ends a run as Ctrl+C does: never left RUNNING."""
    import signal
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    every = 2 if checkpointed else 100_000
    tree = tiny_tree(
        cache_dir,
        **{
            "tracking.enabled": True,
            "train.steps": 100_000,
            "train.eval_every": every,
            "output_dir": str(tmp_path / "runs"),
        },
    )
    cfg = write_config(tmp_path / "run.yaml", tree)
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsweep.cli", "run", str(cfg), "--tracking-uri", uri],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # training has begun (and, if asked, checkpointed)
            if line.strip().startswith("step ") and (
                not checkpointed or list((tmp_path / "runs").glob("*/checkpoints/last.pt"))
            ):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    [run] = runs_in(uri)
    assert (run.info.status, run.data.tags["segsweep.status"]) == ("KILLED", "killed")
    if checkpointed:
        [run_dir] = (tmp_path / "runs").iterdir()
        assert line == f"error: run interrupted; continue it with: segsweep run --resume {run_dir}"
    else:  # nothing to resume: no folder suggests otherwise
        assert line.startswith("error: run interrupted before its first checkpoint: nothing was kept")
        assert not (tmp_path / "runs").exists()  # made by this run, removed with it
