"""Faults injected on purpose: divergence, concurrent writers, an unwritable artifact store,
corrupt data, generated bad input, and secrets that must never be logged or printed."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from segsweep.cli import build_parser, main
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.uris import redact, safe_params

from .conftest import tiny_tree
from .fixtures import write_folder
from .helpers import assert_user_error, runs_in, segsweep, segsweep_here, without_collector, write_config
from .writer_process import write_metrics

# -- divergence -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_diverging_run_exits_1_with_one_line(cache_dir: Path, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "r.yaml", tiny_tree(cache_dir, **{"debug.nan_at_step": 2, "tracking.enabled": True})
    )
    proc = segsweep_here("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: loss 'loss' is nan at step 2")
    [run] = runs_in(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FAILED" and run.data.tags["segsweep.status"] == "diverged"


# -- concurrent writers ------------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path: Path) -> None:
    from segsweep.files import write_atomic

    target = tmp_path / "deep" / "sweep.json"
    write_atomic(target, '{"old": true}')
    assert target.read_text() == '{"old": true}'

    def half_then_fail(fh) -> None:  # a writer interrupted after its first bytes
        fh.write(b'{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_fail)
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in target.parent.iterdir()] == ["sweep.json"]  # no temporary left
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    # the same permissions as any file the user writes (a temporary file's 0600 would hide
    # checkpoints and reports from the rest of a team)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert target.stat().st_mode == plain.stat().st_mode
    # ... but a file that may hold a password is the user's alone, replacing a readable one
    write_atomic(target, '{"sets": ["a=http://u:pw@host"]}', private=True)
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_run_removes_the_temporary_a_killed_save_left_and_keeps_its_checkpoints(
    tiny, tmp_path: Path
) -> None:
    # A SIGKILL mid-save leaves `.last.pt.<pid>.<id>.tmp`; a sweep would copy it with every
    # checkpoint. The run that owns the folder removes it when it starts (or resumes).
    from segsweep.training.runner import prepare

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ".last.pt.4242.0a1b2c3d.tmp").write_bytes(b"half a checkpoint")
    prepare(tiny(**{"train.steps": 2})).trainer.run(tmp_path / "run")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]


def test_racing_writers_of_one_file_leave_one_whole_file(tmp_path: Path) -> None:
    # Two trials generating the same synthetic dataset race for the same cache files: each
    # writes its own temporary, and the file is always one writer's whole content.
    import threading

    from segsweep.files import write_atomic

    target = tmp_path / "train_images.npy"
    contents = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_atomic, args=(target, c)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["train_images.npy"]


@pytest.mark.slow
def test_a_tracking_server_that_does_not_answer_is_said_at_once_and_fails_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MLflow's own HTTP retries would keep a run silent for minutes; segsweep says at once
    # that it waits, and gives up at its budget with a one-line error
    import socket

    from segsweep.tracking.retries import TrackingError, await_server

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    # (4 s: the note comes only if the first refusal takes under the first wait's 1 s)
    with caplog.at_level("WARNING"), pytest.raises(TrackingError, match="did not answer within 4s"):
        await_server(f"http://user:secret@127.0.0.1:{port}", 4.0)
    assert time.monotonic() - start < 12
    [said] = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert f"127.0.0.1:{port}" in said and "secret" not in said
    await_server("sqlite:///anything.db", 0.0)  # not a server: nothing to wait for


@pytest.mark.slow
def test_eight_concurrent_writers_lose_no_metric(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    RunTracker(uri, "concurrent", run_name="init").finish()  # the store exists before the writers
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_metrics, args=(uri, i, 100)) for i in range(8)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
    finally:
        for p in procs:  # none left behind by a failed check
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * 8  # none failed with "database is locked"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = [r for r in runs_in(uri, "concurrent") if r.info.run_name != "init"]
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        for k in range(10):
            history = client.get_metric_history(r.info.run_id, f"m{k}")
            assert sorted(m.step for m in history) == list(range(100))


@pytest.mark.slow
def test_metrics_of_many_steps_go_out_in_few_writes_and_a_flush_waits_for_none(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, "batched", run_name="b")
    writes: list[int] = []
    write = tracker._write

    def counting(kind: str, payload: object) -> None:
        if kind == "metrics":
            writes.append(len(payload))  # type: ignore[arg-type]
        write(kind, payload)

    tracker._write = counting  # type: ignore[method-assign]
    for step in range(60):  # a step every 10 ms, as a training loop logs
        tracker.log_metrics({"loss": float(step), "lr": 0.1}, step)
        time.sleep(0.01)
    tracker.log_image(np.zeros((4, 4, 3), np.uint8), "panel", 59)  # ends the window at once
    tracker.flush()
    assert sum(writes) == 120 and len(writes) <= 2  # not one request per step
    tracker.finish("FINISHED", "finished")
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(60))


def test_a_flush_or_an_image_ends_the_metrics_window_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Metrics wait in the writer for a window; anything else queued must end the window at
    # once, or a sweep's flush at each evaluation would wait the window out. Also when the
    # writer has fallen behind and finds several things queued at once.
    import threading

    from segsweep.tracking import mlflow_writer as tracking

    monkeypatch.setattr(tracking, "METRIC_WINDOW_S", 3600.0)
    tracker = RunTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "window", run_name="w")
    writes: list[str] = []
    gate = threading.Event()  # holds the writer inside its first write, the text below
    write = tracker._write

    def recording(kind: str, payload: object) -> None:
        writes.append(kind)
        if kind == "text":
            gate.wait(60)
        write(kind, payload)

    tracker._write = recording  # type: ignore[method-assign]

    def finishes(call) -> bool:  # False if ``call`` is still waiting after a minute
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(timeout=60)
        return not thread.is_alive()

    def until(condition) -> bool:  # waits up to a minute for the writer thread
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        return condition()

    tracker.log_text("held", "held.txt")
    assert until(lambda: writes.count("text") >= 1)
    # Queued while the writer is busy: it finds them all at once when it is let go.
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.log_image(np.zeros((4, 4, 3), np.uint8), "panel", 0)
    tracker.log_metrics({"loss": 2.0}, 1)
    flushing = threading.Thread(target=tracker.flush, daemon=True)
    flushing.start()
    until(lambda: tracker._queue.qsize() >= 4)  # the flush is queued too
    gate.set()
    flushing.join(timeout=60)
    assert not flushing.is_alive()
    assert writes == ["text", "metrics", "image", "metrics"]
    # Metrics, then an image and nothing after it: the image alone ends the window.
    tracker.log_metrics({"loss": 3.0}, 2)
    tracker.log_image(np.zeros((4, 4, 3), np.uint8), "panel", 2)
    assert until(lambda: writes.count("image") >= 2) and writes[-3:] == ["metrics", "metrics", "image"]
    assert finishes(tracker.finish)


def test_a_write_that_fails_outside_the_store_fails_the_run_not_the_writer(tmp_path: Path) -> None:
    # Encoding an image (or a full /tmp) can fail before anything reaches the store; the
    # writer must record it as the run's error, not die and let flush() report nothing.
    from mlflow.tracking import MlflowClient

    from segsweep.tracking.retries import TrackingError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, "broken-image", run_name="b")
    tracker.log_image(np.full((4, 4, 3), 300, np.int32), "panel", 0)  # not a picture
    with pytest.raises(TrackingError, match="writing image failed"):
        tracker.flush()
    assert tracker._thread.is_alive()
    with pytest.raises(TrackingError):
        tracker.finish()
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_stepped_images_are_laid_out_as_mlflow_lays_them_out(tmp_path: Path) -> None:
    # The tracker writes MLflow's stepped-image files itself (cheaper encodings, one upload,
    # one tag per run); the UI's image slider and segsweep's dashboard must read them as they
    # read what MlflowClient.log_image writes.
    import re

    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES

    from segsweep.tracking.store import image_artifacts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(0)
    panels = [rng.integers(0, 256, (40, 90, 3), dtype=np.uint8) for _ in range(2)]
    tracker = RunTracker(uri, "images", run_name="ours")
    for step, panel in enumerate(panels):
        tracker.log_image(panel, "panels/pseudo_masks", step)
    tracker.finish("FINISHED", "finished")
    client = MlflowClient(uri)
    theirs = client.create_run(tracker.experiment_id, run_name="theirs").info.run_id
    for step, panel in enumerate(panels):
        client.log_image(theirs, panel, key="panels/pseudo_masks", step=step, synchronous=True)

    def layout(run_id: str) -> list[str]:  # file names with their timestamps and uuids blanked
        names = [f.path for f in client.list_artifacts(run_id, "images")]
        return sorted(re.sub(r"timestamp\+\d+\+[0-9a-f-]{36}", "timestamp+T+U", n) for n in names)

    assert layout(tracker.run_id) == layout(theirs) and len(layout(theirs)) == 4
    for run_id in (tracker.run_id, theirs):
        assert client.get_run(run_id).data.tags[MLFLOW_LOGGED_IMAGES] == "True"
    found = image_artifacts(uri, tracker.run_id)
    assert [(f["key"], f["step"]) for f in found] == [("panels/pseudo_masks", 0), ("panels/pseudo_masks", 1)]
    for run_id in (tracker.run_id, theirs):  # same pictures (lossless), same thumbnail sizes
        folder = Path(client.download_artifacts(run_id, "images", str(tmp_path / run_id)))
        pictures = sorted(folder.glob("*+step+*.png"), key=lambda f: f.name.split("+")[2])
        for picture, panel in zip(pictures, panels, strict=True):
            assert np.array_equal(np.asarray(Image.open(picture)), panel)
        assert {Image.open(f).size for f in folder.glob("*.webp")} == {(256, 113)}


# -- the artifact store fails -----------------------------------------------------------------


@pytest.mark.slow
def test_an_unwritable_artifact_store_fails_the_run_and_keeps_the_checkpoint(
    cache_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "mlartifacts").write_text("a file where the artifact folder should be")
    cfg = write_config(
        tmp_path / "r.yaml",
        tiny_tree(
            cache_dir,
            **{"tracking.enabled": True, "method": "fixmatch", "output_dir": str(tmp_path / "runs")},
        ),
    )
    proc = segsweep_here("run", str(cfg), cwd=tmp_path)
    assert_user_error(proc, "tracking store:", "the last checkpoint stays on local disk at")
    path = Path(proc.stderr.split("stays on local disk at ")[1].strip())
    assert path.name == "last.pt" and path.is_file()
    [run] = runs_in(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FAILED"


def tracked_run(cache_dir: Path, tmp_path: Path):
    """A tiny run tracked in a SQLite store of its own: (prepared, tracker)."""
    from segsweep.config import validate_run_config
    from segsweep.training.runner import make_tracker, prepare

    tree = tiny_tree(
        cache_dir,
        **{
            "tracking.enabled": True,
            "tracking.uri": f"sqlite:///{tmp_path / 'x.db'}",
            "output_dir": str(tmp_path),
        },
    )
    prepared = prepare(validate_run_config(tree, "t"))
    return prepared, make_tracker(prepared.cfg, prepared.data, run_key="k1")


def test_checkpoints_that_cannot_be_uploaded_end_the_run_failed_and_say_why(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsweep.tracking.retries import TrackingError
    from segsweep.training.runner import execute

    prepared, tracker = tracked_run(cache_dir, tmp_path)
    upload = tracker.client.log_artifact

    def full_disk(run_id: str, path: str, artifact_path: str | None = None) -> None:
        if path.endswith(".pt"):  # the last writes, flushed as the run ends
            raise OSError(28, "No space left on device")
        upload(run_id, path, artifact_path)

    monkeypatch.setattr(tracker.client, "log_artifact", full_disk)
    with pytest.raises(TrackingError, match="No space left"):
        execute(prepared, tracker, tmp_path / "k1")
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["segsweep.status"] == "failed"  # not "finished" beside FAILED
    assert "No space left" in run.data.tags["segsweep.error"]


@pytest.mark.slow
def test_a_ctrl_c_while_a_run_ends_still_ends_it(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from segsweep.training.runner import execute

    prepared, tracker = tracked_run(cache_dir, tmp_path)
    write = type(tracker)._write

    def interrupted(self: RunTracker, kind: str, payload: object) -> None:
        if kind == "artifact" and not getattr(interrupted, "done", False):
            interrupted.done = True  # type: ignore[attr-defined]
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C while the checkpoints upload
            time.sleep(1)
        write(self, kind, payload)

    monkeypatch.setattr(type(tracker), "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(prepared, tracker, tmp_path / "k1")
    run = tracker.client.get_run(tracker.run_id)
    assert (run.info.status, run.data.tags["segsweep.status"]) == ("KILLED", "killed")  # never left RUNNING
    assert run.info.end_time


# -- corrupt data -----------------------------------------------------------------------------


@pytest.fixture
def broken_folder(tmp_path: Path) -> Path:
    root = write_folder(tmp_path / "data", n_masked=10, n_unlabeled=2)
    (root / "images" / "im02.png").write_bytes((root / "images" / "im02.png").read_bytes()[:60])  # truncated
    (root / "masks" / "im03.png").write_bytes(b"")  # empty mask
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(
        root / "masks" / "im04.png"
    )  # wrong size
    return root


def folder_config(cache_dir: Path, tmp_path: Path, root: Path, **over: object) -> Path:
    tree = tiny_tree(
        cache_dir,
        **{
            "data.name": "folder",
            "data.root": str(root),
            "data.tune_size": 0,
            "data.label_ratio": 0.8,
            "tracking.enabled": True,
            "eval.batch_size": 1,
            "train.batch_size": 2,
            **over,
        },
    )
    return write_config(tmp_path / "folder.yaml", tree)


@pytest.mark.slow
def test_check_data_names_every_broken_file(cache_dir: Path, tmp_path: Path, broken_folder: Path) -> None:
    cfg = folder_config(cache_dir, tmp_path, broken_folder)
    proc = segsweep("check-data", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "im02.png: cannot read image" in proc.stdout
    assert "im03.png: cannot read mask" in proc.stdout
    assert "im04.png: mask is 8x8 but its image is 40x40" in proc.stdout
    assert proc.stderr.strip() == "error: 3 problem(s) in 12 files checked"


@pytest.mark.slow
def test_a_run_with_data_verify_fails_before_training(
    cache_dir: Path, tmp_path: Path, broken_folder: Path
) -> None:
    cfg = folder_config(cache_dir, tmp_path, broken_folder, **{"data.verify": True})
    proc = segsweep_here("run", str(cfg), cwd=tmp_path)
    assert_user_error(proc, "(and 2 more problems; run segsweep check-data)")
    assert not (tmp_path / "mlflow.db").exists() or runs_in(f"sqlite:///{tmp_path / 'mlflow.db'}") == []


@pytest.mark.slow
def test_a_split_list_naming_a_missing_file_fails_before_training(cache_dir: Path, tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data", n_masked=10, n_unlabeled=0)
    split = tmp_path / "split"
    split.mkdir()
    (split / "labeled.txt").write_text("images/im02.png masks/im02.png\nimages/gone.png masks/gone.png\n")
    (split / "unlabeled.txt").write_text("images/im05.png masks/im05.png\nimages/adir.png masks/im05.png\n")
    (root / "images" / "adir.png").mkdir()  # a folder where a file is named: said as such
    cfg = folder_config(cache_dir, tmp_path, root, **{"data.split": str(split)})
    proc = segsweep_here("run", str(cfg), cwd=tmp_path)
    assert_user_error(proc, "images/gone.png: file not found", "(and 2 more missing files)")
    assert not (tmp_path / "mlflow.db").exists() or runs_in(f"sqlite:///{tmp_path / 'mlflow.db'}") == []
    # check-data names each missing file once (not once as missing, again as unreadable)
    check = segsweep_here("check-data", str(cfg), cwd=tmp_path)
    assert check.stdout.count("gone.png") == 2  # the image and its mask
    assert "images/adir.png: is a folder, not a file" in check.stdout
    assert check.stderr.strip().startswith("error: 3 problem(s)")


# -- generated bad input: one line and exit 2, or a run; never a traceback, never half a run --


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(0, 3), max_size=3),
)
#: The same examples on every run (CI included; derandomized, they are drawn from a hash of the
#: test's source): a rare draw that fails is found by the session that drew it, not by a later
#: submission.
GENERATED = {
    "max_examples": 40,
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture],
}
KEYS = st.sampled_from(
    [
        "method",
        "seed",
        "data.label_ratio",
        "data.num_labeled",
        "data.crop_size",
        "data.tune_size",
        "data.name",
        "data.root",
        "data.split",
        "model.arch",
        "model.encoder",
        "model.decoder_channels",
        "train.steps",
        "train.lr",
        "train.optimizer",
        "train.amp",
        "fixmatch.conf_threshold",
        "eval.mode",
        "tracking.experiment",
        "data.bogus",
        "nonsense",
        "data.augment.scale_min",
        "train.eval_every",
        "debug.fail_at_step",
    ]
)


@pytest.mark.slow
@settings(**GENERATED)
@given(overrides=st.dictionaries(KEYS, SCALARS, min_size=1, max_size=3))
def test_generated_run_configs_run_or_fail_in_one_line(
    overrides: dict, cache_dir: Path, tmp_path_factory, capsys: pytest.CaptureFixture
) -> None:
    from segsweep.config import load_run_config
    from segsweep.errors import UserError

    tmp = tmp_path_factory.mktemp("gen")
    tree = tiny_tree(
        cache_dir,
        **{
            "train.steps": 1,
            "train.eval_every": 1,
            "tracking.enabled": True,
            "output_dir": str(tmp / "runs"),
        },
    )
    cfg = write_config(tmp / "c.yaml", tree)
    sets = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in overrides.items()
    ]
    # A valid config runs for real: 800,000 steps (drawn once) held CI for the whole test
    # timeout, and a decoder 10,000 channels wide would take gigabytes. The point here is bad
    # input, so what validates must be a run a test can train. Read as the run reads it: a
    # string "9999999" is a number to pydantic.
    try:
        valid = load_run_config(cfg, sets)
    except UserError:
        pass
    else:
        assume(valid.train.steps <= 50 and valid.data.crop_size <= 128)
        assume((valid.model.decoder_channels or 0) <= 256 and (valid.data.num_labeled or 0) <= 1000)
    args = ["run", str(cfg), "--quiet", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    for s in sets:
        args += ["--set", s]
    cwd = os.getcwd()
    os.chdir(tmp)  # a generated relative path (a dataset root, a cache) lands here, not in the repo
    try:
        code = main(args)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err, err
    if code:  # 2: bad input; 1: the run failed (e.g. diverged); either way one line says why
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
    if (tmp / "mlflow.db").exists():
        runs = runs_in(f"sqlite:///{tmp / 'mlflow.db'}")
        assert all(r.info.status != "RUNNING" for r in runs)
        if code == 2:  # bad input found up front leaves nothing; found later, a FAILED run
            assert all(r.info.status == "FAILED" for r in runs)


SPEC_KEYS = st.sampled_from(
    [
        "name",
        "grid",
        "search",
        "num_samples",
        "early_stop",
        "resources",
        "final",
        "max_failures",
        "base",
        "tracking",
        "ray",
        "extra",
    ]
)


@settings(**{**GENERATED, "max_examples": 60})
@given(
    changes=st.dictionaries(
        SPEC_KEYS, st.one_of(SCALARS, st.dictionaries(st.text(max_size=8), SCALARS, max_size=2)), max_size=2
    )
)
def test_generated_sweep_specs_plan_or_fail_in_one_line(
    changes: dict, cache_dir: Path, tmp_path_factory
) -> None:
    from segsweep.errors import UserError
    from segsweep.sweep.spec import plan_sweep

    tmp = tmp_path_factory.mktemp("spec")
    spec = {
        "name": "g",
        "base": {"train": {"steps": 2}},
        "grid": {"method": ["supervised"], "data.label_ratio": [0.5], "seed": [0]},
    }
    spec.update(changes)
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        plan = plan_sweep(path, cwd=tmp)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert plan.cells and plan.total_trials >= 1
    assert sorted(p.name for p in tmp.iterdir()) == ["s.yaml"]  # planning writes nothing


# -- secrets ----------------------------------------------------------------------------------


def test_a_bad_tracking_uri_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from segsweep.errors import ConfigError
    from segsweep.tracking.uris import resolve_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_URI: 'file:///tmp/mlruns': file stores"):
        resolve_uri(None)
    with pytest.raises(ConfigError, match=r"^tracking.uri: unsupported scheme 'ftp'"):
        resolve_uri("ftp://host/x")


def test_secrets_never_become_params_and_uris_are_redacted() -> None:
    params = safe_params(
        {
            "tracking.uri": "http://alice:hunter2-long@mlflow:5000",
            "aws_secret_access_key": "x",
            "api_token": "y",
            "optuna_password": "z",
            "lr": 0.1,
        }
    )
    assert params == {"tracking.uri": "http://alice:***@mlflow:5000", "lr": "0.1"}
    assert (
        redact("postgresql+psycopg2://u:p4ss@db:5432/optuna") == "postgresql+psycopg2://u:***@db:5432/optuna"
    )
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    # quoted in a message; a raw "@" or "/" in the password; an empty user; an IPv6 host; a query
    hidden = {
        "error: http://a:pw@m:5000 did not answer": "error: http://a:***@m:5000 did not answer",
        "http://u:p@ss@host:5000/x": "http://u:***@host:5000/x",
        "postgresql://bob:Zm9v/YmFy@db.example/mlflow": "postgresql://bob:***@db.example/mlflow",
        "redis://:pw@cache:6379": "redis://:***@cache:6379",
        "http://u:pw@[::1]:5000": "http://u:***@[::1]:5000",
        # SQLAlchemy takes these raw: "#", "?", ",", digits only; a user with "@" (Azure)
        "postgresql://bob:Pa#ss?w,rd@db/m": "postgresql://bob:***@db/m",
        "postgresql://bob:20240917@db/m": "postgresql://bob:***@db/m",
        "postgresql://bob@srv:s3cret@srv.example.com/m": "postgresql://bob@srv:***@srv.example.com/m",
    }
    for text, shown in hidden.items():
        assert redact(text) == shown, text
    # no password: text after a URI is never taken for one
    for plain in (
        "http://user@host/x",
        "http://user@host:5000/x",
        "see http://host:5000 or a@b",
        '{"uri":"http://host:5000","mail":"a@b.c"}',
        "http://[::1]:5000?x=a@b",
    ):
        assert redact(plain) == plain, plain
    # an "@" in a URL's path reads as a password's end: shown less, never leaked
    assert redact("https://host:5000/a@b") == "https://host:***@b"


def test_a_tracking_stores_error_never_shows_its_password(caplog: pytest.LogCaptureFixture) -> None:
    """MLflow's own error text quotes the URL it called, userinfo included: the retry
    warnings and the one-line error both hide it."""
    from segsweep.tracking.retries import TrackingError, with_retries

    url = "http://bob:s3cret@mlflow:5000/api/2.0/mlflow/runs/get"
    calls = iter(
        [ConnectionError(f"API request to {url} failed"), ValueError(f"INVALID_PARAMETER_VALUE: {url}")]
    )

    def fails() -> None:
        raise next(calls)  # a retried error, then one that is not retried

    with caplog.at_level("WARNING"), pytest.raises(TrackingError) as err:
        with_retries(fails, "read run", 5.0)
    assert "bob:***@mlflow" in str(err.value) and "retrying" in caplog.text
    assert "s3cret" not in str(err.value) and "s3cret" not in caplog.text


def test_no_tag_holds_a_uri_password(tmp_path: Path) -> None:
    """Tags a run starts with, tags set later (an error line may quote a URI), and tags the
    sweep's driver writes when it ends a trial's run: every one redacted."""
    from segsweep.tracking.mlflow_writer import RunTracker
    from segsweep.tracking.store import client_for, end_run

    uri, secret = f"sqlite:///{tmp_path / 'm.db'}", "http://alice:hunter2-long@mlflow:5000"
    tracker = RunTracker(uri, "x", run_name="r", tags={"origin": secret})
    tracker.set_tags({"segsweep.error": f"tracking store: {secret} did not answer"})
    tracker.finish("FAILED", "failed")
    client = client_for(uri)
    other = client.create_run(tracker.experiment_id).info.run_id
    end_run(client, other, "KILLED", {"segsweep.error": secret}, 5.0)
    for run_id in (tracker.run_id, other):
        tags = client.get_run(run_id).data.tags
        assert not [v for v in tags.values() if "hunter2" in v], tags
    assert client.get_run(tracker.run_id).data.tags["origin"] == "http://alice:***@mlflow:5000"
    assert client.get_run(other).info.status == "KILLED"


def test_services_listen_on_loopback_by_default() -> None:
    args = build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1"


def test_a_race_on_one_tag_is_retried_but_a_rejected_request_is_not() -> None:
    from segsweep.tracking.retries import is_transient

    race = Exception("(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid")
    assert is_transient(race)  # a worker and the driver set the same tag at once
    assert not is_transient(Exception("UNIQUE constraint failed: metrics.key"))
    assert not is_transient(Exception("INVALID_PARAMETER_VALUE: param changed"))


@pytest.mark.slow
def test_the_tracker_counts_its_writer_threads_cpu(tmp_path: Path) -> None:
    """``writer_cpu_s``: CPU seconds of the writer thread alone (the bench's measure of what
    tracking costs the machine); the producer's own work is not in it."""
    tracker = RunTracker(f"sqlite:///{tmp_path}/mlflow.db", "cpu", run_name="cpu")
    assert tracker.writer_cpu_s == 0.0
    with without_collector():  # its CPU would count as the writer's
        busy_until = time.thread_time() + 0.5
        while time.thread_time() < busy_until:  # the caller's CPU, which must not be counted
            pass
        for step in range(20):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        tracker.finish()
    assert 0 < tracker.writer_cpu_s < 0.5


def test_a_worker_closing_late_leaves_the_drivers_interrupted_mark(tmp_path: Path) -> None:
    """After an interrupt the driver marks the runs it cut short KILLED / ``interrupted``. A
    worker that closes its run after that ("stopped early") must leave the mark; once the run
    is reopened by ``--resume`` the old mark no longer holds and the run closes normally."""
    from mlflow.tracking import MlflowClient

    from segsweep.tracking.tags import STATUS_INTERRUPTED, TAG_STATUS

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    tracker = RunTracker(uri, "late", run_name="trial", run_key="sweep:late/trial")
    tracker.log_metrics({"loss": 1.0}, 0)
    client.set_tag(tracker.run_id, TAG_STATUS, STATUS_INTERRUPTED)  # the driver's mark
    client.set_terminated(tracker.run_id, "KILLED")
    tracker.finish("FINISHED", "stopped_early", unless_marked=STATUS_INTERRUPTED)
    run = client.get_run(tracker.run_id)
    assert (run.info.status, run.data.tags[TAG_STATUS]) == ("KILLED", STATUS_INTERRUPTED)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0]  # flushed

    again = RunTracker(uri, "late", run_name="trial", run_key="sweep:late/trial")  # --resume
    assert again.run_id == tracker.run_id
    assert client.get_run(again.run_id).data.tags[TAG_STATUS] == "running"
    again.finish("FINISHED", "stopped_early", unless_marked=STATUS_INTERRUPTED)
    run = client.get_run(again.run_id)
    assert (run.info.status, run.data.tags[TAG_STATUS]) == ("FINISHED", "stopped_early")


@pytest.mark.slow
def test_a_local_server_takes_runs_over_http_and_leaves_no_process(tmp_path: Path) -> None:
    """The bench's MLflow server: a run written through it lands in its own store, its
    processes are found by session, and leaving the block ends every one of them."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from segsweep.tracking.local_server import local_server, session_members, session_running

    with local_server(tmp_path / "server") as (uri, pid):
        assert uri.startswith("http://127.0.0.1:") and pid in session_running(pid)
        tracker = RunTracker(uri, "served", run_name="served")
        tracker.log_metrics({"loss": 0.5}, 3)
        tracker.finish()
    assert session_running(pid) == []  # no process of its session is left
    direct = MlflowClient(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}")
    history = direct.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]

    # a process's CPU counts in its own session and in no other
    spin = "import time\nt = time.process_time() + 0.3\nwhile time.process_time() < t: pass\nprint(1, flush=True)\ntime.sleep(30)"
    busy = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert busy.stdout is not None and busy.stdout.readline().strip() == b"1"
        members = session_members(busy.pid) or []
        assert [m.pid for m in members] == [busy.pid] and members[0].cpu_s >= 0.29
        assert session_running(pid) == []
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.slow
def test_a_sigterm_still_stops_the_local_server_and_zombies_are_told_apart(tmp_path: Path) -> None:
    """Python's default SIGTERM skips ``finally``: ``local_server`` turns it into an exit, so
    a bench stopped by a time limit leaves no server behind. ``session_members`` marks an
    ended, unreaped process "Z", which ``stop_session`` does not wait for."""
    import signal
    import subprocess
    import sys

    from segsweep.tracking.local_server import session_members, session_running

    script = (
        "import sys, time\nfrom pathlib import Path\nfrom segsweep.tracking.local_server import local_server\n"
        "with local_server(Path(sys.argv[1])) as (uri, pid):\n    print(pid, flush=True)\n    time.sleep(300)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s")], stdout=subprocess.PIPE)
    server = 0
    try:
        assert holder.stdout is not None
        server = int(holder.stdout.readline())
        assert session_running(server)
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=60) == 128 + signal.SIGTERM
        assert session_running(server) == []
    finally:
        holder.kill()
        holder.wait()
        for pid in (
            session_running(server) or [] if server else []
        ):  # a failed check leaves nothing behind either
            os.kill(pid, signal.SIGKILL)

    # a child that ended and that its parent has not reaped is a zombie of the same session
    # (the Popen kept: dropped, its finalizer may reap the child before it is seen as a zombie)
    parent = (
        "import subprocess, time\nchild = subprocess.Popen(['true'])\nprint(1, flush=True)\ntime.sleep(30)"
    )
    leader = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == b"1"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            m.state == "Z" for m in session_members(leader.pid) or []
        ):
            time.sleep(0.05)
        states = {m.pid: m.state for m in session_members(leader.pid) or []}
        assert states.pop(leader.pid) != "Z" and list(states.values()) == ["Z"]
    finally:
        leader.kill()
        leader.wait()


def test_status_codes_count_only_as_whole_numbers_never_inside_a_run_id() -> None:
    from segsweep.tracking.retries import is_transient

    # MLflow's refusal quotes the run ID; this one holds "504" and "403" among its hex digits.
    refused = Exception(
        "Changing param values is not allowed. ... for run ID='435f4deb86214603808c389e14e01504'."
    )
    assert not is_transient(refused)
    assert is_transient(Exception("API request failed with error code 504 != 200"))
    assert is_transient(Exception("HTTPError: 503 Server Error: Service Unavailable"))
    assert not is_transient(Exception("API request failed with error code 403 != 200: connection ok"))


def test_a_refusal_from_a_server_that_took_our_login_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's basic-auth app answers 401 to every request while its database restarts: from
    a server this process (or its sweep's driver) has used, that is retried; from any other
    it is a wrong login, said at once."""
    from segsweep.tracking import retries

    monkeypatch.setattr(retries, "AUTHENTICATED", set())
    refused = Exception(
        "401 Client Error: Unauthorized for url: http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/x"
    )
    elsewhere = Exception(
        "401 Client Error: Unauthorized for url: http://127.0.0.1:5001/api/2.0/mlflow/runs/get"
    )
    assert not retries.is_transient(refused)
    retries.authenticated("http://admin:secret@127.0.0.1:5000")  # the login worked there
    assert retries.is_transient(refused) and not retries.is_transient(elsewhere)
    retries.authenticated("sqlite:///mlflow.db")  # not a server: nothing remembered
    assert retries.AUTHENTICATED == {"http://127.0.0.1:5000"}


def test_rays_traceback_for_a_checkpoint_already_gone_is_dropped_and_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ray resumed on a new head may delete again a checkpoint the lost driver had deleted:
    that FileNotFoundError's traceback is dropped; any other error handling a checkpoint, or
    a FileNotFoundError elsewhere, is kept."""
    import logging

    from segsweep.sweep.ray_tune import GoneCheckpointFilter

    log = logging.getLogger("segsweep.test.gone_checkpoint")
    log.addFilter(GoneCheckpointFilter())
    cases = [
        (
            FileNotFoundError("Path not found: .../checkpoint_000002"),
            "Trial %s: Error handling checkpoint %s",
        ),
        (OSError("No space left on device"), "Trial %s: Error handling checkpoint %s"),
        (FileNotFoundError("spec.yaml"), "Trial %s: could not read %s"),
    ]
    with caplog.at_level(logging.ERROR, logger=log.name):
        for error, message in cases:
            try:
                raise error
            except OSError:
                log.exception(message, "t1", "c")
    kept = [(type(r.exc_info[1]), r.msg) for r in caplog.records if r.name == log.name]
    assert kept == [(OSError, cases[1][1]), (FileNotFoundError, cases[2][1])]
