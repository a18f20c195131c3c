"""The bench's own logic on a tiny CPU config: report schema and ratios (no time is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segsweep.bench.gpu import overlap_rate
from segsweep.bench.layers import steady_seconds_per_trial
from segsweep.bench.measure import gpu_idle_share
from segsweep.bench.report import base_config, check, format_table, overhead, speedup
from segsweep.bench.suite import run_bench
from segsweep.config import validate_run_config
from segsweep.data import transforms as T
from segsweep.errors import ConfigError
from segsweep.training.devices import numerics_for
from segsweep.training.runner import prepare

from .helpers import segsweep, segsweep_here, without_collector


def test_ratio_arithmetic() -> None:
    assert overhead(1.03, 1.0) == pytest.approx(0.03)
    assert overhead(0.5, 1.0) == pytest.approx(-0.5)
    assert speedup(30.0, 10.0) == 3.0
    assert check(0.02, 0.03) and not check(0.04, 0.03)
    assert check(2.5, 2.0, below=False) and not check(1.5, 2.0, below=False)


def test_the_command_line_does_not_import_the_bench() -> None:
    # The bench is a developer tool: every other command (and the CLI module itself) runs
    # without it; only ``segsweep bench`` imports it. A fresh interpreter, so nothing this
    # test session imported counts.
    probe = (
        "import segsweep.cli, sys\n"
        "segsweep.cli.build_parser()\n"
        "assert not any(m.startswith('segsweep.bench') for m in sys.modules), sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_gpu_idle_share_is_the_gap_before_each_batch_over_the_step() -> None:
    # steps end at 10, 20, 30, 40 ms; each next batch reached the GPU 1, 3 and 2 ms after
    # the previous step's work ended (the first step, warm-up, is not measured)
    done = [10.0, 20.0, 30.0, 40.0]
    ready = [0.0, 11.0, 23.0, 32.0]
    assert gpu_idle_share(ready, done, 3) == pytest.approx(6 / 30)
    assert gpu_idle_share(ready, done, 1) == pytest.approx(2 / 10)
    assert gpu_idle_share(ready, done, 9) == pytest.approx(6 / 30)  # never before the first step


def test_steady_state_ignores_the_start_up_before_the_first_trial_ends() -> None:
    # 2 slots; the first trial ends after a 30 s start-up, then one ends every 0.5 s: each
    # trial holds a slot for 1 s, however long the start-up was
    ends = [31.0, 30.0, 32.0, 30.5, 31.5]  # in any order
    assert steady_seconds_per_trial(ends, 2) == pytest.approx(1.0)
    assert steady_seconds_per_trial([5.0, 7.0], 1) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        steady_seconds_per_trial([1.0], 2)


@pytest.mark.slow
def test_report_schema_and_consistent_ratios(cache_dir: Path) -> None:
    with without_collector():  # its CPU would count as the writer's (bounded below)
        report = run_bench(
            quick=True, methods=["supervised", "fixmatch"], sweep=False, echo=lambda _m: None, peak_tflops=1.0
        )
    rows = {r.name: r for r in report.rows}
    for name in (
        "step/bare",
        "step/supervised",
        "step/fixmatch",
        "overhead/supervised_vs_bare",
        "overhead/tracking",
        "overhead/tracking_open_close",
        "overhead/tracking_whole_run",
        "overhead/tracking_writer_cpu",
        "overhead/tracking_cpu",
        "overhead/tracking_training_thread",
        "overhead/tracking_cpu_server",
        "overhead/tracking_server_cpu",
        "data/loader_workers0",
        "data/loader_workers2",
        "data/wait_share_workers0",
        "data/wait_share_workers2",
        "data/batch_bytes",
        "data/batch_bytes_unlabeled",
        "data/loader_unlabeled_workers0",
        "data/strong_views",
        "flops/per_step",
        "flops/achieved",
        "flops/mfu",
        "memory/peak_rss",
        "gpu/bf16",
        "gpu/compile",
        "gpu/readback_per_step",
        "gpu/packing",
        "report/curve_100_runs",
    ):
        assert name in rows, name
    bare, sup = rows["step/bare"].value, rows["step/supervised"].value
    assert rows["step/supervised"].ratio == pytest.approx(sup / bare)
    cost = rows["overhead/supervised_vs_bare"]
    assert cost.value == pytest.approx(bare / sup - 1, rel=1e-6)  # one pair (quick): from throughputs
    assert cost.ratio == pytest.approx(1 + cost.value)
    assert cost.passed == (cost.value <= 0.03)
    track = rows["overhead/tracking"]
    assert track.ratio == pytest.approx(1 + track.value) and track.passed == (track.value <= 0.02)
    assert rows["overhead/tracking_open_close"].value > 0  # an MLflow run costs something to open
    assert 0 < rows["overhead/tracking_writer_cpu"].value < 1  # the writer's CPU, per training second
    # one pair (quick): the noise-free row adds the training thread's share and the writer's
    thread, writer = (
        rows["overhead/tracking_training_thread"].value,
        rows["overhead/tracking_writer_cpu"].value,
    )
    assert thread > 0  # the tracked run renders its panels; the untracked one renders none
    assert rows["overhead/tracking_cpu"].value == pytest.approx(thread + writer)
    # the same run against an MLflow server process: both sides did work, the server's counted
    # apart (it is another machine's in the deployment)
    served = rows["overhead/tracking_cpu_server"]
    assert served.value > 0 and served.passed == (served.value <= 0.02)
    assert served.ratio == pytest.approx(1 + served.value)
    assert rows["overhead/tracking_server_cpu"].value is not None  # read from /proc, not skipped
    assert rows["flops/per_step"].value > 0 and 0 < rows["flops/mfu"].value
    assert rows["flops/achieved"].value == pytest.approx(rows["flops/per_step"].value * bare / 4, rel=1e-6)
    assert rows["gpu/bf16"].value is None and "no CUDA" in rows["gpu/bf16"].note  # never guessed
    # the loader hands over uint8 images and masks and float32 tags: per image, 3 + 1 bytes a
    # pixel and 4 a class (float32 images and int64 masks would be 20 bytes a pixel)
    cfg = validate_run_config(base_config(True, "cpu"), "bench")
    crop, classes = cfg.data.crop_size, prepare(cfg).data.source.num_classes
    expected = cfg.train.batch_size * (4 * crop * crop + 4 * classes)
    assert rows["data/batch_bytes"].value * 2**20 == pytest.approx(expected)
    # an unlabeled image: its weak view (3 bytes a pixel), CutMix box and valid area (4 int32
    # each, not masks) and the strong view's 11 float32 parameters, not a second image
    per_image = 3 * crop * crop + 4 * (4 + 4) + 4 * T.STRONG_PARAMS
    assert rows["data/batch_bytes_unlabeled"].value * 2**20 == pytest.approx(cfg.train.batch_size * per_image)
    # the unlabeled loader is held against the semi-supervised step's need (fixmatch's here)
    unlabeled = rows["data/loader_unlabeled_workers0"]
    assert unlabeled.baseline == pytest.approx(rows["step/fixmatch"].value)
    assert unlabeled.ratio == pytest.approx(unlabeled.value / unlabeled.baseline)
    assert unlabeled.passed == (unlabeled.ratio >= 1) and rows["data/strong_views"].value > 0
    payload = json.loads(report.to_json())
    assert payload["schema"] == 1 and payload["machine"]["cpu_count"] >= 1
    assert {"name", "value", "unit", "baseline", "ratio", "target", "passed", "note"} == set(
        payload["rows"][0]
    )
    assert "overhead/supervised_vs_bare" in format_table(report)


@pytest.mark.slow
def test_cli_writes_the_json_report(cache_dir: Path, tmp_path: Path) -> None:
    proc = segsweep(
        # one section: the schema of every section is test_report_schema_and_consistent_ratios'
        *("bench", "--quick", "--no-sweep", "--methods", "supervised", "--only", "step"),
        *("--json", "out/bench.json"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "out/bench.json").read_text())
    assert data["config"]["quick"] is True and any(r["name"] == "step/bare" for r in data["rows"])
    bad = segsweep_here("bench", "--methods", "mixmatch", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown method 'mixmatch'" in bad.stderr


def test_only_runs_the_chosen_sections_and_saves_after_each(cache_dir: Path) -> None:
    snapshots: list[tuple[bool, list[str]]] = []
    report = run_bench(
        quick=True,
        methods=["supervised"],
        echo=lambda _m: None,
        only={"step", "flops", "gpu"},
        on_section=lambda r: snapshots.append((r.complete, [row.name for row in r.rows])),
    )
    names = [r.name for r in report.rows]
    assert {"step/bare", "step/supervised", "flops/per_step", "gpu/bf16"} <= set(names)
    assert not any(n.startswith(("overhead/tracking", "data/loader", "sweep/", "report/")) for n in names)
    assert "gpu/packing" not in names  # a section of its own
    # every snapshot but the last is marked incomplete, and each holds the rows before it
    assert [c for c, _ in snapshots][-1] is True and not any(c for c, _ in snapshots[:-1])
    assert snapshots[-1][1] == names and len(snapshots[0][1]) < len(names)
    with pytest.raises(ConfigError, match=r"--only: unknown section\(s\) gpus"):
        run_bench(quick=True, methods=["supervised"], only={"gpus"}, echo=lambda _m: None)


def test_cli_rejects_an_unknown_section(tmp_path: Path) -> None:
    bad = segsweep_here("bench", "--quick", "--only", "step,gpus", "--json", "out/b.json", cwd=tmp_path)
    assert bad.returncode == 2 and "--only: unknown section(s) gpus" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "out").exists()


def test_cli_checks_set_before_it_starts_measuring(tmp_path: Path) -> None:
    bad = segsweep_here("bench", "--quick", "--set", "train.batch_size=0", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: bench: train.batch_size: Input should be greater than or equal to 1"
    ]
    assert bad.stdout == ""  # no "measuring..." banner before the error


def test_loader_workers_default_to_zero_on_cpu_and_to_the_threads_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    # the worker default of a GPU run, computed on any machine: one CUDA device is pretended
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current: list[int] = []  # below torch.cuda.set_device: its own argument checks run
    monkeypatch.setattr(torch._C, "_cuda_setDevice", current.append)
    # and a machine with the cores of a GPU node (a run's threads are capped by its CPUs)
    monkeypatch.setattr("segsweep.training.devices.usable_cpus", lambda: 64)

    def workers(**data: object) -> int:
        device = data.pop("device", "cpu")
        cfg = validate_run_config({"method": "supervised", "data": data, "train": {"device": device}}, "t")
        return numerics_for(cfg).workers

    assert workers() == 0  # on a CPU the workers would take the step's cores
    assert workers(num_workers=3) == 3 and workers(num_workers=3, device="cuda") == 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # a sweep trial with 2 CPUs
        assert workers(device="cuda") == 2
        torch.set_num_threads(16)
        assert workers(device="cuda") == 8
    finally:
        torch.set_num_threads(threads)
    # a run on cuda:1 makes it the current device (pinned memory, events, memory statistics);
    # "cuda" and "auto" leave the current one
    current.clear()
    workers(device="cuda:1")
    assert current == [1]
    current.clear()
    assert workers(device="cuda") == workers(device="auto") and current == []


def test_gpu_rows_take_the_median_of_interleaved_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU rows' arithmetic, on a CPU: the trainer is replaced by a clock that says how
    # long each setting's step took in each round (no time is measured).
    from segsweep.bench import gpu as bench

    seconds = {("off", False, False): [0.10, 0.30, 0.20], ("bf16", True, True): [0.05, 0.04, 0.20]}
    calls: list[tuple[str, bool, bool]] = []

    def fake_run(cfg: object, measure: int) -> tuple[float, None, dict[str, float]]:
        t = cfg.train  # type: ignore[attr-defined]
        key = (t.amp, bool(t.channels_last), bool(t.compile))
        calls.append(key)
        rounds = seconds.get(key, [0.08, 0.08, 0.08])
        return rounds[sum(1 for c in calls if c == key) - 1], None, {"val/mIoU_last": 0.5}

    monkeypatch.setattr(bench, "trainer_run", fake_run)
    monkeypatch.setattr(
        bench, "_packed_rate", lambda tree, measure, trials: ({1: 100.0, 4: 250.0}[trials], True)
    )
    report = bench.Report(1, "now", {}, {})
    tree = base_config(True, "cpu")
    bench.gpu_rows(report, tree, 4, lambda _m: None, rounds=3)
    bench.packing_row(report, tree, 4, lambda _m: None)
    rows = {r.name: r for r in report.rows}
    images = tree["train"]["batch_size"]
    assert rows["gpu/fp32"].value == pytest.approx(images / 0.20)  # median of 0.1, 0.3, 0.2
    compiled = rows["gpu/compile"]
    assert compiled.value == pytest.approx(images / 0.05) and compiled.ratio == pytest.approx(4.0)
    assert rows["gpu/bf16"].ratio == pytest.approx(0.20 / 0.08)
    # interleaved: every setting once per round, not one setting three times in a row
    assert len(calls) == 15 and calls[:5] == calls[5:10] == calls[10:]
    assert "median of 3" in compiled.note and "0.500" in compiled.note
    packing = rows["gpu/packing"]
    assert packing.value == pytest.approx(2.5) and packing.passed is True


def test_readback_row_is_the_median_overhead_of_alternating_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bare loop with and without a per-step read of the loss, replaced by a clock (no time
    # is measured): pairs (0.11, 0.10), (0.30, 0.10), (0.12, 0.10) cost +10%, +200%, +20%.
    from segsweep.bench import gpu as bench

    clock = iter([0.11, 0.10, 0.30, 0.10, 0.12, 0.10])
    modes: list[bool] = []

    def fake_bare(cfg: object, steps: int, measure: int, readback: bool = True) -> tuple[float, None]:
        modes.append(readback)
        return next(clock), None

    monkeypatch.setattr(bench, "bare_run", fake_bare)
    report = bench.Report(1, "now", {}, {})
    cfg = validate_run_config(base_config(True, "cpu"), "bench")
    bench.readback_row(report, cfg, 8, 4, lambda _m: None, rounds=3)
    (row,) = report.rows
    assert row.name == "gpu/readback_per_step" and modes == [True, False] * 3
    assert row.value == pytest.approx(0.20) and row.ratio == pytest.approx(1.20)
    assert row.baseline == pytest.approx(0.10)


def test_an_untracked_run_renders_no_panels_and_the_bench_times_the_tracker_calls(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Panels are rendered only for a tracker that keeps them, on the training thread: the
    # tracking overhead row then counts them, and untracked runs do not pay for them.
    from segsweep.bench.measure import TimedCalls
    from segsweep.tracking.protocol import NullTracker
    from segsweep.training import loop as engine

    rendered: list[int] = []
    real = engine.sample_panel
    monkeypatch.setattr(engine, "sample_panel", lambda *a: rendered.append(1) or real(*a))
    cfg = tiny(method="fixmatch")  # 4 steps, an evaluation (and a panel) every 2, one at the start
    untracked = prepare(cfg).trainer
    untracked.run(tmp_path / "untracked", NullTracker())
    assert rendered == []

    class Keeping(NullTracker):
        def __init__(self) -> None:
            self.images: list[tuple[object, str, int]] = []

        def log_image(self, image, key: str, step: int) -> None:  # type: ignore[override]
            self.images.append((image() if callable(image) else image, key, step))

    keeping = Keeping()
    calls = TimedCalls(keeping)
    tracked = prepare(cfg).trainer
    tracked.run(tmp_path / "tracked", calls)  # type: ignore[arg-type]
    # the panels' passes draw no randomness the training sees: both runs trained alike
    for a, b in zip(
        untracked.method.state_dict().values(), tracked.method.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    # before the first step (where MLflow's image slider starts), then at each evaluation
    assert len(rendered) == 3 and [(k, s) for _, k, s in keeping.images] == [
        ("panels/pseudo_masks", 0),
        ("panels/pseudo_masks", 2),
        ("panels/pseudo_masks", 4),
    ]
    assert keeping.images[0][0].ndim == 3  # type: ignore[union-attr]  # an RGB panel
    assert calls.seconds > 0 and calls.run_id is None  # calls timed; attributes passed through


def test_a_panel_reuses_the_pseudo_labels_of_the_diagnostic_pass(tiny) -> None:
    # The panel's images, pseudo masks and confidences are kept from the pass that scores the
    # pseudo masks (no second labelling); they must be what labelling those images gives.
    import torch

    from segsweep.data.loaders import eval_loader, to_model
    from segsweep.data.transforms import pad_to_multiple
    from segsweep.training.evaluation import pseudo_mask_quality, sample_panel

    cfg = tiny(method="fixmatch", **{"eval.batch_size": 2, "eval.panel_samples": 3})
    trainer = prepare(cfg).trainer
    method, numerics = trainer.method, trainer.numerics
    assert trainer.panel_samples == 3  # spans two diagnostic batches of 2
    _, held = pseudo_mask_quality(method, trainer.diag_loader, numerics, hold=3)
    # An untrained model is about equally unsure everywhere: a threshold at its median
    # confidence keeps some pixels and drops others.
    method.knobs.conf_threshold = float(held["conf"].median())
    scores, held = pseudo_mask_quality(method, trainer.diag_loader, numerics, hold=3)
    assert pseudo_mask_quality(method, trainer.diag_loader, numerics)[0] == scores
    assert 0 < scores["pseudo/kept_share"] < 1

    # The first three diagnostic images, labelled afresh in the pass's batches of two.
    samples = trainer._diagnostic_samples(cfg.eval.diag_samples)[:4]
    parts: dict[str, list[torch.Tensor]] = {}
    method.eval()
    for loaded in eval_loader(trainer.data.source, samples, 2, 0):
        b = to_model(loaded, numerics.device, channels_last=False)
        with torch.no_grad():
            padded, (h, w) = pad_to_multiple(b["image"])
            labels = (t[..., :h, :w] for t in method.pseudo_label(padded))
        for k, t in zip(
            ("image", "mask", "pseudo", "conf", "keep"), (b["image"], b["mask"], *labels), strict=True
        ):
            parts.setdefault(k, []).append(t)
    fresh = {k: torch.cat(v)[:3] for k, v in parts.items()}
    assert sorted(held) == sorted(fresh)
    for k, t in fresh.items():
        assert torch.equal(held[k], t), k
    assert 0 < int(fresh["keep"].sum()) < fresh["keep"].numel()

    def labelled_again(image_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise AssertionError("the panel labelled its images again")

    method.pseudo_label = labelled_again  # type: ignore[method-assign]
    panel = sample_panel(method, held, numerics)
    assert panel.ndim == 3 and panel.shape[0] > 3 * cfg.data.crop_size  # three rows of tiles


@pytest.mark.slow
def test_a_tracking_server_that_will_not_start_leaves_its_rows_unmeasured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SQLite rows stand; the server's say why they were not measured."""
    from contextlib import contextmanager

    from segsweep.bench import tracked as bench
    from segsweep.tracking.retries import TrackingError

    @contextmanager
    def no_server(_folder: Path):
        raise TrackingError("mlflow server exited at start (1): no module named uvicorn")
        yield  # pragma: no cover

    monkeypatch.setattr(bench, "local_server", no_server)
    said: list[str] = []
    report = bench.Report(schema=1, date="", machine={}, config={})
    bench.tracking_rows(report, base_config(True, "cpu"), 6, True, said.append)
    rows = {r.name: r for r in report.rows}
    assert rows["overhead/tracking_cpu"].value > 0  # measured against SQLite all the same
    for name in ("overhead/tracking_cpu_server", "overhead/tracking_server_cpu"):
        assert rows[name].value is None and "not measured: mlflow server exited" in rows[name].note
    assert "not measured" in said[-1]


def test_a_tracking_error_against_a_started_server_fails_the_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a server that will not start leaves rows unmeasured: a write that fails once it
    runs is a fault of the tracker, not of this machine, and must not hide as a skipped row."""
    from contextlib import contextmanager

    from segsweep.bench import tracked as bench
    from segsweep.tracking.retries import TrackingError

    @contextmanager
    def fake_server(_folder: Path):
        yield "http://127.0.0.1:9", 0

    def pairs(cfg, uri: str, count: int, server_cpu=lambda: None):
        if uri.startswith("http"):
            raise TrackingError("tracking: log metrics failed: 500")
        clock = bench.RunClock(0.0, 1.0, 0.0, 0.01, 0.0)
        return [(clock, clock)] * count

    monkeypatch.setattr(bench, "local_server", fake_server)
    monkeypatch.setattr(bench, "tracked_pairs", pairs)
    report = bench.Report(schema=1, date="", machine={}, config={})
    with pytest.raises(TrackingError, match="500"):
        bench.tracking_rows(report, base_config(True, "cpu"), 6, True, lambda _m: None)


def test_packed_throughput_counts_only_the_span_all_trials_shared() -> None:
    # trial A: a step every 1 s from t=0 to 10; trial B starts late (t=3) and steps every 2 s
    # to t=21. Past their first step, both train in (5, 10]: A ends 5 steps there, B 2
    a = [float(t) for t in range(0, 11)]
    b = [float(t) for t in range(3, 22, 2)]
    rate, shared = overlap_rate([a, b], images_per_step=4, skip=1)
    assert shared and rate == pytest.approx((5 + 2) * 4 / 5)
    # a per-trial sum would count B's tail, run alone, as packed: 4/1 + 4/2 = 6 img/s
    assert rate != pytest.approx(6.0)
    # one trial alone: its own rate after the skipped steps
    assert overlap_rate([a], 4, skip=2) == (pytest.approx(4.0), True)
    # trials that never overlapped: their own rates summed, and said
    assert overlap_rate([[0.0, 1.0, 2.0], [5.0, 7.0, 9.0]], 2, skip=0) == (pytest.approx(2 + 1), False)
