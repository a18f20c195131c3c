"""Bad input found by an audit of every command: each is one ``error:`` line naming the file or
field, a non-zero exit, no traceback, and nothing left behind. Run in process (``main``) for
speed; ``test_cli_run`` covers the same contract through a real subprocess."""

from __future__ import annotations

import errno
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from segsweep.cli import main
from segsweep.data.synthetic import cache_key
from segsweep.files import first_missing, make_folder, unmake_folder
from segsweep.sweep import ray_tune as sweep

from .conftest import tiny_tree
from .helpers import runs_in, tiny_spec, write_config, write_spec


def one_error(capsys: pytest.CaptureFixture, code: int, *fragments: str, expect: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expect, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_a_tracking_store_that_is_a_folder_or_cannot_be_made_is_named_and_leaves_no_run(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", tiny_tree(cache_dir, **{"tracking.enabled": True}))
    (tmp_path / "adir.db").mkdir()
    (tmp_path / "afile").write_text("")
    before = files_in(tmp_path)
    for uri, fragments in (
        (f"sqlite:///{tmp_path / 'adir.db'}", ["--tracking-uri", "adir.db", "is a folder"]),
        (f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}", ["--tracking-uri", "afile", "is a file"]),
    ):
        one_error(capsys, main(["run", str(cfg), "--tracking-uri", uri]), *fragments)
        assert files_in(tmp_path) == before  # no runs/ folder, no store
    for command in (["curve", "--experiment", "x"], ["dashboard"]):
        code = main([*command, "--tracking-uri", f"sqlite:///{tmp_path / 'adir.db'}"])
        one_error(capsys, code, "--tracking-uri", "adir.db", "is a folder")


def never_serve(*_args: object) -> None:
    raise AssertionError("the dashboard started serving")  # a regression fails, not hangs


def test_the_dashboard_never_creates_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import segsweep.reports.dashboard

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(segsweep.reports.dashboard, "serve", never_serve)
    # named for what gave the URI: no flag was given, so not --tracking-uri
    one_error(capsys, main(["dashboard", "--port", "0"]), "error: the default store: no MLflow store at")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nope.db'}")
    one_error(
        capsys,
        main(["dashboard", "--port", "0"]),
        "error: MLFLOW_TRACKING_URI: no MLflow store at",
        "nope.db",
    )
    one_error(
        capsys,
        main(["dashboard", "--port", "0", "--tracking-uri", "sqlite:///other.db"]),
        "error: --tracking-uri: no MLflow store at",
        "other.db",
    )
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize(
    ("error", "flag"),
    [
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), "--host 203.0.113.7"),
        (socket.gaierror(-2, "Name or service not known"), "--host 203.0.113.7"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "--port 8050"),
    ],
)
def test_a_dashboard_that_cannot_listen_blames_the_right_flag(
    error: OSError, flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import segsweep.reports.dashboard

    def refuse(*_args: object) -> None:
        raise error

    monkeypatch.setattr(segsweep.reports.dashboard, "ThreadingHTTPServer", refuse)
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"")  # an empty file is a new SQLite store, not a wrong file
    code = main(
        ["dashboard", "--tracking-uri", f"sqlite:///{store}", "--host", "203.0.113.7", "--port", "8050"]
    )
    one_error(capsys, code, flag, "cannot listen on 203.0.113.7:8050")


def test_cleaning_up_removes_only_what_the_command_made(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # the user's, empty
    path = Path("a/../runs/key")  # 'a' is never made: the path only passes through it
    made = first_missing(path)
    assert made is not None and made.resolve() == (tmp_path / "runs" / "key").resolve()
    make_folder(path, "output_dir")
    assert files_in(tmp_path) == {"runs", "runs/key"}
    unmake_folder(path, made)
    assert files_in(tmp_path) == {"runs"}  # the user's folder stays
    nested = Path("x/y/z")
    made = first_missing(nested)
    make_folder(nested, "output_dir")
    (tmp_path / "x" / "other").write_text("a second run's file")  # written meanwhile
    unmake_folder(nested, made)
    assert files_in(tmp_path) == {"runs", "x", "x/other"}


@pytest.mark.parametrize("command", [["bench", "--quick", "--only", "step"], ["probe", "x.pt"]])
def test_json_paths_that_cannot_be_written_are_refused_before_the_work(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    one_error(capsys, main([*command, "--json", "adir"]), "--json", "adir", "is a folder")
    one_error(capsys, main([*command, "--json", "afile/r.json"]), "--json", "afile", "is a file")
    assert capsys.readouterr().out == ""  # refused before any banner or measuring
    assert files_in(tmp_path) == {"adir", "afile"}


def test_curve_checks_every_output_before_writing_any(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rep" / "summary.csv").mkdir(parents=True)  # the second of the four files
    one_error(
        capsys, main(["curve", "--experiment", "x", "--out", "rep"]), "--out", "summary.csv", "is a folder"
    )
    assert files_in(tmp_path) == {"rep", "rep/summary.csv"}


@pytest.mark.parametrize(
    ("over", "fragments"),
    [
        ({"seed": 10**20}, ["seed", "less than or equal to"]),
        ({"data.augment.scale_max": float("inf")}, ["data", "scale_max", "finite number"]),
        ({"train.weight_decay": float("nan")}, ["train.weight_decay", "finite number"]),
        ({"data.root": ""}, ["data.root", "empty path"]),
        ({"data.name": "folder", "data.root": "~nosuchuser-segsweep/x"}, ["data.root", "cannot expand"]),
        ({"debug.fail_at_step": 1, "debug.fail_stage": "bogus"}, ["debug.fail_stage", "'bogus'", "train"]),
    ],
)
def test_config_values_that_used_to_pass_validation_and_crash(
    over: dict, fragments: list[str], cache_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", tiny_tree(cache_dir, **over))
    one_error(capsys, main(["run", str(cfg)]), *fragments)
    assert files_in(tmp_path) == {"c.yaml"}


def test_a_synthetic_cache_that_cannot_be_written_is_one_line(tmp_path: Path, capsys) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / f"synthetic-{cache_key(0, 32, 20, 8)}").write_text("in the way")
    sets = ["data.synthetic.image_size=32", "data.crop_size=32", "data.synthetic.num_train=20"]
    sets += ["data.synthetic.num_val=8", "data.tune_size=2", f"data.root={root}"]
    code = main(["check-data", *[a for s in sets for a in ("--set", s)]])
    one_error(capsys, code, "synthetic-", "cannot write the synthetic dataset's cache", "SEGSWEEP_CACHE")


def test_check_data_refuses_a_split_the_method_cannot_train_on(
    cache_dir: Path, tmp_path: Path, capsys
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", tiny_tree(cache_dir, method="fixmatch", **{"data.label_ratio": 1.0})
    )
    one_error(capsys, main(["check-data", str(cfg)]), "data.label_ratio", "no unlabeled images left")


def test_probe_refuses_a_hand_made_checkpoint(tmp_path: Path, capsys) -> None:
    for name, state in (("m.pt", {"method": 1, "config": {}}), ("c.pt", {"method": {}, "config": [1]})):
        torch.save(state, tmp_path / name)
        one_error(capsys, main(["probe", str(tmp_path / name)]), name, "not a segsweep checkpoint")
    (tmp_path / "adir.pt").mkdir()
    one_error(capsys, main(["probe", str(tmp_path / "adir.pt")]), "adir.pt", "a folder, not a file")


def test_resume_refuses_a_checkpoint_of_another_method(
    cache_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", tiny_tree(cache_dir, **{"train.steps": 2}))
    assert main(["run", str(cfg), "--quiet"]) == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["method"] = "fixmatch"  # same network, so its weights would load and train on
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    one_error(capsys, main(["run", "--resume", str(run_dir)]), "last.pt", "supervised", "fixmatch")
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_an_error_line_never_shows_a_uri_password(capsys: pytest.CaptureFixture) -> None:
    line = one_error(
        capsys,
        main(["curve", "--experiment", "x", "--tracking-uri", "ftp://alice:hunter2@host/x"]),
        "unsupported scheme 'ftp' in 'ftp://alice:***@host/x'",
    )
    assert "hunter2" not in line


@pytest.mark.slow
@pytest.mark.parametrize("device_error", ["cpu", "cuda"])
def test_a_run_out_of_memory_names_the_settings_that_size_it(
    cache_dir: Path, tmp_path: Path, monkeypatch, capsys, device_error: str
) -> None:
    """A batch that does not fit: one line naming the batch and crop settings and the size
    asked for, exit 2, the run FAILED with the line as its error. The CPU case is torch's own
    refusal of a too-large allocation; the CUDA one is torch's error type with CUDA's text."""
    import torch

    from segsweep.methods import METHODS
    from segsweep.tracking.tags import TAG_ERROR

    real_step = METHODS["supervised"].training_step

    def step_that_does_not_fit(self, batch, step):
        if step == 2:
            if device_error == "cpu":
                torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: refused at once, nothing held
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
        return real_step(self, batch, step)

    monkeypatch.setattr(METHODS["supervised"], "training_step", step_that_does_not_fit)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tree = tiny_tree(cache_dir, **{"train.steps": 3, "train.batch_size": 4, "tracking.enabled": True})
    cfg = write_config(tmp_path / "c.yaml", tree)
    size = "1048576.00 GiB" if device_error == "cpu" else "2.00 GiB"
    line = one_error(
        capsys,
        main(["run", str(cfg), "--tracking-uri", uri, "--quiet"]),
        "out of memory on cpu in stage 'train' at step 2",
        f"({size} more did not fit)",
        "train.batch_size (4)",
        "data.crop_size (",
    )
    [run] = runs_in(uri, "tests")
    assert run.info.status == "FAILED" and run.data.tags[TAG_ERROR] == line.removeprefix("error: ")


@pytest.mark.slow
def test_one_process_at_a_time_resumes_a_run_or_drives_a_sweep(
    cache_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A second process on a run's or a sweep's folder (another terminal, ``make demo`` twice)
    is refused in one line naming the first; once that one ends, the folder is free again."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", tiny_tree(cache_dir, **{"train.steps": 2}))
    assert main(["run", str(cfg), "--quiet"]) == 0
    [run_dir] = (tmp_path / "runs").iterdir()
    sweep_dir = tmp_path / "sweeps" / "held"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from segsweep.files import only_writer\n"
            "with only_writer(Path(sys.argv[1]), 'a'), only_writer(Path(sys.argv[2]), 'b'):\n"
            "    print('held', flush=True); time.sleep(120)",
            str(run_dir),
            str(sweep_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        fragments = ("is in use by another segsweep process on this machine", f"(pid {holder.pid})")
        one_error(
            capsys, main(["run", "--resume", str(run_dir), "--quiet"]), f"run folder {run_dir}", *fragments
        )
        write_spec(tmp_path, tiny_spec("held"))
        one_error(capsys, main(["sweep", "held.yaml"]), "sweep folder sweeps/held is in use", *fragments)
        assert not (tmp_path / "sweeps").exists()  # the refused sweep wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0  # free once the holder is gone

    # a run still training holds its folder: its --resume from another terminal is refused
    long = write_config(tmp_path / "long.yaml", tiny_tree(cache_dir, **{"train.steps": 5000}))
    training = subprocess.Popen([sys.executable, "-m", "segsweep.cli", "run", str(long), "--quiet"])
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not [
            p for p in (tmp_path / "runs").glob("*/checkpoints/last.pt") if p.parents[1] != run_dir
        ]:
            time.sleep(0.2)
        [new] = [p for p in (tmp_path / "runs").iterdir() if p != run_dir]
        capsys.readouterr()
        one_error(capsys, main(["run", "--resume", str(new), "--quiet"]), "in use", f"(pid {training.pid})")
    finally:
        training.kill()
        training.wait()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_a_real_gpu_out_of_memory_is_one_line(cache_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """CUDA's own out-of-memory error (a 64 TiB request), as torch words it on this GPU."""
    import torch

    from segsweep.methods import METHODS

    def step_that_does_not_fit(self, batch, step):
        torch.empty(1 << 46, dtype=torch.uint8, device="cuda")

    monkeypatch.setattr(METHODS["supervised"], "training_step", step_that_does_not_fit)
    monkeypatch.chdir(tmp_path)
    tree = tiny_tree(cache_dir, **{"train.steps": 2, "train.device": "cuda"})
    one_error(
        capsys,
        main(["run", str(write_config(tmp_path / "c.yaml", tree)), "--quiet"]),
        "out of memory on cuda",
        "in stage 'train' at step 1 (",
        " more did not fit): lower train.batch_size",
    )


def test_a_lock_released_late_never_frees_the_next_holders_lock(tmp_path: Path) -> None:
    """A holds; its lock file is removed (a clean-up of the cache); B takes a new one; A's
    release must leave B's file alone, so that C is still refused while B holds."""
    from segsweep.errors import ConfigError
    from segsweep.files import lock_path, only_writer

    folder = tmp_path / "sweep"
    a = only_writer(folder, "sweep folder")
    a.__enter__()
    lock_path(folder).unlink()
    b = only_writer(folder, "sweep folder")
    b.__enter__()
    a.__exit__(None, None, None)
    try:
        assert lock_path(folder).exists()
        with pytest.raises(ConfigError, match="is in use by another segsweep process"):
            with only_writer(folder, "sweep folder"):
                pass
    finally:
        b.__exit__(None, None, None)
    assert not lock_path(folder).exists()  # removed by its last holder
    with only_writer(folder, "sweep folder"):  # and free
        pass


def test_a_model_too_big_for_its_device_is_one_line(
    cache_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import torch

    from segsweep.methods import METHODS

    def does_not_fit(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ...")

    monkeypatch.setattr(METHODS["supervised"], "to", does_not_fit)
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", tiny_tree(cache_dir, **{"train.steps": 2}))
    one_error(
        capsys,
        main(["run", str(cfg), "--quiet"]),
        "out of memory on cpu placing the model (",
        "; 20.00 MiB more did not fit): choose a smaller model or another device",
    )
    assert not (tmp_path / "runs").exists()


def test_out_of_memory_sizes_read_in_their_unit() -> None:
    from segsweep.training.devices import allocation

    def cpu(n: int) -> RuntimeError:  # the CPU allocator's text, as torch 2.14 words it
        return RuntimeError(
            f"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
            f"allocate memory: you tried to allocate {n} bytes. Error code 12"
        )

    assert allocation(cpu(3 * 2**20)) == "3.00 MiB more did not fit"
    assert allocation(cpu(5 * 2**30 + 2**29)) == "5.50 GiB more did not fit"
    assert allocation(cpu(512)) == "512 bytes more did not fit"
    assert allocation(RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0")) == (
        "1.50 GiB more did not fit"
    )
    assert allocation(RuntimeError("CUDA error: out of memory\nmore")) == "CUDA error: out of memory"


@pytest.mark.slow
def test_a_sweep_waits_for_a_ray_head_that_is_starting(capsys: pytest.CaptureFixture) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def start_later() -> None:
        time.sleep(1.5)
        listener.listen()

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        sweep.await_ray_head(f"127.0.0.1:{port}", budget_s=20)
    finally:
        thread.join()
        listener.close()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"127.0.0.1:{port} does not answer" in notes[0]


def test_a_sweep_refuses_a_ray_address_nobody_answers_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "RAY_WAIT_S", 1.0)
    path = write_spec(tmp_path, tiny_spec("unreachable"))
    one_error(
        capsys, main(["sweep", str(path), "--ray-address", "127.0.0.1:1"]), "--ray-address", "nothing answers"
    )
    assert files_in(tmp_path) == {"unreachable.yaml"}


def test_a_local_sweep_asking_more_cpus_per_trial_than_it_may_use_is_refused_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from segsweep.training.devices import usable_cpus

    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, tiny_spec("greedy", resources={"cpus_per_trial": usable_cpus() + 1}))
    one_error(
        capsys,
        main(["sweep", str(path)]),
        f"resources.cpus_per_trial: {usable_cpus() + 1} CPUs per trial, but this process may use {usable_cpus()}",
    )
    assert files_in(tmp_path) == {"greedy.yaml"}


def test_a_sweep_whose_store_is_a_folder_leaves_no_sweep_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir.db").mkdir()
    path = write_spec(tmp_path, tiny_spec("nostore"))
    code = main(["sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'adir.db'}"])
    one_error(capsys, code, "adir.db", "is a folder")
    assert files_in(tmp_path) == {"nostore.yaml", "adir.db"}


def test_a_spec_whose_base_file_is_missing_names_the_spec(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "s.yaml"
    grid = {"method": ["supervised"], "data.label_ratio": [0.5], "seed": [0]}
    spec.write_text(yaml.safe_dump({"name": "s", "base": "nosuch.yaml", "grid": grid}))
    one_error(capsys, main(["sweep", str(spec)]), "s.yaml: base:", "nosuch.yaml", "not found")


def test_an_unforeseen_os_error_is_one_line_naming_the_file(monkeypatch, capsys) -> None:
    import segsweep.cli as cli

    def full_disk(_args) -> int:
        raise OSError(28, "No space left on device", "/data/runs/x/checkpoints/last.pt")

    monkeypatch.setattr(cli, "cmd_methods", full_disk)
    one_error(capsys, main(["methods"]), "last.pt", "No space left", expect=1)

    def our_bug(_args) -> int:  # a wrong path of ours is no user error: it keeps its traceback
        raise FileNotFoundError(2, "No such file or directory", "/segsweep/internal/missing.json")

    monkeypatch.setattr(cli, "cmd_methods", our_bug)
    with pytest.raises(FileNotFoundError):
        main(["methods"])
