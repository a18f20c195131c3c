"""``segsweep bench``: what the platform costs, measured side by side on one machine.

Rows (each with its value, the baseline it is compared with, the ratio and the target):

* ``step/<method>``: training throughput of every method through the real trainer, and
  ``step/bare``: a bare PyTorch loop (same model, batch, data loader, AdamW, poly LR,
  cross-entropy). ``overhead/supervised_vs_bare`` is the platform's cost (target <= 3%).
* ``overhead/tracking``: a run with MLflow logging (metrics every step, sample panels at each
  evaluation) against the same run untracked: the training time (target <= 2%); the same
  cost without the run-to-run noise, the training thread's time in tracker calls plus the writer
  thread's CPU (target <= 2%); apart from it the seconds per run to open and close the MLflow
  run, and the whole-run share. The same CPU row again with the store behind an MLflow server
  started on this machine (training talks HTTP to it, as to the compose deployment's server),
  and the server's own CPU.
* ``data/*``: loader throughput alone (labeled images against the bare step's need,
  unlabeled ones against the fastest semi-supervised step's), the share of step time spent
  waiting for a batch at 0 and 2 workers (target: no waiting at the default worker count),
  the bytes of one labeled and one unlabeled batch as the loader hands them over (what worker
  processes, pinning and the copy to the GPU move per step), the strong views per second
  made on the run's device, and on a GPU the share of the bare loop's GPU time with no work
  queued while the next batch comes (CUDA events: what the host's wait cannot tell).
* ``sweep/*``: Ray Tune start, and seconds of scheduling + tracking per trivial trial at
  steady state (target < 1 s).
* ``flops/*``, ``memory/*``: FLOPs per step, achieved FLOP/s (model FLOPs utilisation
  against ``--peak-tflops`` on a GPU), peak memory of a trial.
* ``gpu/*`` (CUDA only): bf16 autocast, channels_last and torch.compile switched one at a
  time (median of 3 interleaved rounds); the cost of reading the loss back every step (the
  bare loop with and without); and, as the ``packing`` section, several small trials sharing
  one GPU against one alone (target >= 2x).

On a CPU the GPU rows are reported as skipped, never guessed. ``only`` (``--only``) runs some
sections; the report is handed to ``on_section`` after each, so a bench cut short keeps what
it measured (the CLI rewrites its JSON each time, ``"complete": false`` until the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from segsweep.config import RunConfig, set_dotted, validate_run_config
from segsweep.data.loaders import hash_seed, stream_loader
from segsweep.data.transforms import strong_views
from segsweep.errors import ConfigError
from segsweep.models.network import build_model
from segsweep.primitives import poly_lr
from segsweep.tracking.mlflow_writer import (
    NullTracker,
    RunTracker,
    TrackingError,
    local_server,
    session_members,
)
from segsweep.training.loop import numerics_for, seed_everything, to_device, usable_cpus
from segsweep.training.runner import prepare

SCHEMA = 1

# The report's sections, in the order they run. ``--only`` picks some: a GPU machine without
# MLflow or Ray installed can still run the rows that need neither ("step,data,flops,gpu").
SECTIONS = ("step", "tracking", "data", "flops", "gpu", "packing", "sweep", "curve")


def check_sections(only: set[str] | None) -> None:
    """``--only``'s names must be sections: one line naming the unknown ones, before anything
    is measured."""
    unknown = set(only or ()) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"--only: unknown section(s) {', '.join(sorted(unknown))}; valid: {', '.join(SECTIONS)}"
        )


@dataclass
class Row:
    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""


@dataclass
class Report:
    schema: int
    date: str
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    complete: bool = False  # False while sections are still to run (or were cut short)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rows": [asdict(r) for r in self.rows]}, indent=2)


def overhead(measured: float, baseline: float) -> float:
    """Relative extra cost of ``measured`` over ``baseline`` (0.03 = 3% slower)."""
    return measured / baseline - 1.0


def speedup(measured: float, baseline: float) -> float:
    return measured / baseline


def check(value: float, limit: float, below: bool = True) -> bool:
    return value <= limit if below else value >= limit


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),  # the share this process may use (affinity, cgroup quota)
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():  # the bench's device: numerics_for made it the current one
        current = torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(current)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(current).total_memory / 2**30, 1)
    return info


# ---------------------------------------------------------------------------------------------
# Measurements


def _interval_mean(ends: list[float], count: int) -> float:
    """Mean seconds per step over the last ``count`` steps."""
    ends = list(ends)[-(count + 1) :]
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def trainer_step_seconds(cfg: RunConfig, measure: int) -> tuple[float, Any]:
    """Seconds per main-stage step through the real trainer (its own clocks); the trainer."""
    return trainer_run(cfg, measure)[:2]


def trainer_run(cfg: RunConfig, measure: int) -> tuple[float, Any, dict[str, float]]:
    """``trainer_step_seconds`` and the run's final metrics."""
    prepared = prepare(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        result = prepared.trainer.run(Path(tmp), NullTracker())
    return _interval_mean(prepared.trainer.timing.step_end, measure), prepared.trainer, result.metrics


@dataclass
class RunClock:
    """Wall seconds of one run: opening its tracking run, training (evaluations and panels
    included), and closing it (the last writes and the run's end)."""

    start: float
    train: float
    close: float
    writer_cpu: float = 0.0  # CPU seconds of the tracker's writer thread over the run
    caller: float = 0.0  # seconds the training thread spent in tracker calls (panels rendered included)
    server_cpu: float | None = None  # CPU seconds of a tracking server's processes over the run

    @property
    def total(self) -> float:
        return self.start + self.train + self.close


def tracking_share(untracked: RunClock, tracked: RunClock) -> float:
    """What tracking took from a run, per second of untracked training: the training
    thread's extra time in tracker calls (panels rendered included) plus the writer's CPU."""
    return (tracked.caller - untracked.caller + tracked.writer_cpu) / untracked.train


class TimedCalls:
    """A tracker as the trainer sees it, adding up the seconds its calls take on the calling
    (training) thread: queueing metrics, rendering the panels it asks for."""

    def __init__(self, inner: RunTracker | NullTracker) -> None:
        self._inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def timed_run(
    cfg: RunConfig, tracker_uri: str | None, server_cpu: Callable[[], float | None] = lambda: None
) -> RunClock:
    """One whole run, tracked (an MLflow run at ``tracker_uri``) or not; ``server_cpu`` reads
    a tracking server's CPU seconds so far (None: none is measured), before and after."""
    prepared = prepare(cfg)
    server_before = server_cpu()
    clock = time.perf_counter()
    tracker = (
        RunTracker(tracker_uri, cfg.tracking.experiment, run_name="bench-tracking")
        if tracker_uri
        else NullTracker()
    )
    opened = time.perf_counter()
    calls = TimedCalls(tracker)
    with tempfile.TemporaryDirectory() as tmp:
        prepared.trainer.run(Path(tmp), calls)  # type: ignore[arg-type]  # the tracker, timed
        trained = time.perf_counter()
        tracker.finish()
    closed, server_after = time.perf_counter(), server_cpu()
    return RunClock(
        opened - clock,
        trained - opened,
        closed - trained,
        tracker.writer_cpu_s,
        calls.seconds,
        None if server_before is None or server_after is None else server_after - server_before,
    )


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def gpu_idle_share(ready: list[float], done: list[float], measure: int) -> float:
    """Share of the GPU's time over the last ``measure`` steps in which no training work was
    queued: from the end of a step's work (``done``) to its next batch on the device
    (``ready``: copied and normalised), over the time from one step's end to the next.
    Timestamps in ms on the GPU's clock (CUDA events), one of each per step."""
    steps = range(max(1, len(done) - measure), len(done))
    gaps = [ready[i] - done[i - 1] for i in steps]
    spans = [done[i] - done[i - 1] for i in steps]
    return sum(gaps) / sum(spans)


def bare_run(cfg: RunConfig, steps: int, measure: int, readback: bool = True) -> tuple[float, float | None]:
    """The same model, data, optimizer and schedule in a plain loop: the floor to compare with.
    Seconds per step and, on a GPU, the share of its time spent waiting for the next batch
    (``gpu_idle_share``; the host's wait overstates it when the GPU still has work queued).

    ``readback``: read the loss back every step, as the trainer reads a method's float logs
    (on a GPU a sync: the host cannot queue the next step before this one ends). Without it
    the host runs ahead, so on a GPU the steps are timed on the GPU's clock."""
    data = prepare(cfg).data
    numerics = numerics_for(cfg)
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model.arch, cfg.model.encoder, data.source.num_classes, None, cfg.model.decoder_channels
    ).to(numerics.device)
    if numerics.channels_last:
        model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.scaled_lr(), weight_decay=t.weight_decay)
    loader = stream_loader(
        data.labeled(),
        t.batch_size,
        hash_seed(cfg.seed, 0),
        0,
        numerics.workers,
        numerics.device.type == "cuda",
    )
    model.train()
    cuda = numerics.device.type == "cuda"
    ready: list[Any] = []  # CUDA events: the batch on the device, the step's work queued
    done: list[Any] = []
    ends = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = poly_lr(t.scaled_lr(), step, steps, t.poly_power)
        batch = to_device(next(loader), numerics)
        if cuda:
            ready.append(torch.cuda.Event(enable_timing=True))
            ready[-1].record()
        with numerics.autocast():
            loss = F.cross_entropy(model(batch["image_l"]).float(), batch["mask_l"], ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            done.append(torch.cuda.Event(enable_timing=True))
            done[-1].record()
        if readback:
            loss.item()  # the trainer also reads its logs back once per step
        ends.append(time.perf_counter())
    idle = None
    if cuda:
        torch.cuda.synchronize()
        idle = gpu_idle_share(
            [ready[0].elapsed_time(e) for e in ready], [ready[0].elapsed_time(e) for e in done], measure
        )
        if not readback:  # the host's clock shows how fast it queued, not how fast steps ran
            count = min(measure, len(done) - 1)
            return done[-1 - count].elapsed_time(done[-1]) / 1000 / count, idle
    return _interval_mean(ends, measure), idle


def loader_batches_per_second(dataset: Any, batch_size: int, batches: int, workers: int) -> float:
    loader = stream_loader(dataset, batch_size, 1, 0, workers, False)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches / (time.perf_counter() - start)


def flops_per_step(cfg: RunConfig) -> float:
    """Forward + backward FLOPs of one supervised step (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    data = prepare(cfg).data
    numerics = numerics_for(cfg)
    model = build_model(
        cfg.model.arch, cfg.model.encoder, data.source.num_classes, None, cfg.model.decoder_channels
    ).to(numerics.device)
    crop = cfg.data.crop_size
    x = torch.randn(cfg.train.batch_size, 3, crop, crop, device=numerics.device)
    y = torch.randint(0, data.source.num_classes, (cfg.train.batch_size, crop, crop), device=numerics.device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# The report


def base_config(quick: bool, device: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "method": "supervised",
        "data": {"label_ratio": 0.25, "tune_size": 16, "synthetic": {"num_train": 400, "num_val": 32}},
        "train": {"steps": 40, "batch_size": 16, "eval_every": 10_000, "log_every": 10, "device": device},
        "eval": {"diag_samples": 16, "panel_samples": 4},
        "tracking": {"enabled": False, "experiment": "bench"},
        "hfpl": {"cam_steps": 2},
        "mixandmatch": {"proxy_steps": 2, "mm_steps": 2},
    }
    if quick:
        tree["data"]["synthetic"] = {"num_train": 64, "num_val": 8}
        tree["data"]["tune_size"] = 4
        tree["train"].update(steps=6, batch_size=4)
        tree["model"] = {"decoder_channels": 16}
        tree["eval"] = {"diag_samples": 4, "panel_samples": 2}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return tree


def run_bench(
    quick: bool = False,
    methods: list[str] | None = None,
    device: str = "auto",
    sweep: bool = True,
    peak_tflops: float | None = None,
    echo: Callable[[str], None] = print,
    overrides: dict[str, Any] | None = None,
    only: set[str] | None = None,
    on_section: Callable[[Report], None] = lambda _report: None,
) -> Report:
    """Every section of the module docstring, or those in ``only`` (names from ``SECTIONS``;
    the bare loop, the baseline of most rows, always runs). ``on_section`` sees the report
    after each section, so a bench cut short still leaves what it measured."""
    from segsweep.methods import METHODS

    check_sections(only)
    chosen = set(SECTIONS) if only is None else set(only)
    if not sweep:
        chosen.discard("sweep")
    tree = base_config(quick, device, overrides)
    cfg = validate_run_config(tree, "bench")
    numerics = numerics_for(cfg)
    steps = cfg.train.steps
    measure = max(2, steps - max(2, steps // 4))  # skip warm-up steps
    report = Report(
        SCHEMA,
        datetime.now(UTC).isoformat(timespec="seconds"),
        machine_info(),
        {
            "arch": cfg.model.arch,
            "encoder": cfg.model.encoder,
            "crop": cfg.data.crop_size,
            "batch_size": cfg.train.batch_size,
            "steps": steps,
            "device": str(numerics.device),
            "num_workers": numerics.workers,
            "quick": quick,
        },
    )
    images = cfg.train.batch_size

    # 1. the bare loop and every method through the trainer. The bare loop and the supervised
    # step alternate (against a shared machine's drift), each counted at its median.
    names = (methods or list(METHODS)) if "step" in chosen else []
    repeats = 1 if quick or "supervised" not in names else 5
    bare_runs: list[float] = []
    gpu_idle: list[float] = []
    supervised_runs: list[float] = []
    supervised_trainer: Any = None  # the last one: its data-wait clock
    for _ in range(repeats):
        seconds, idle = bare_run(cfg, steps, measure)
        bare_runs.append(seconds)
        if idle is not None:
            gpu_idle.append(idle)
        if "supervised" in names:
            seconds, supervised_trainer = trainer_step_seconds(
                validate_run_config({**tree, "method": "supervised"}, "bench"), measure
            )
            supervised_runs.append(seconds)
    bare = median(bare_runs)
    report.add(
        Row(
            "step/bare",
            images / bare,
            "img/s",
            note=f"plain PyTorch loop, supervised step; median of {repeats}",
        )
    )
    echo(f"  bare loop: {images / bare:.1f} img/s")
    if gpu_idle:
        report.add(
            Row(
                f"data/gpu_idle_share_workers{numerics.workers}",
                median(gpu_idle),
                "fraction",
                target="~0",
                note=f"bare loop: share of GPU time waiting for the next batch (CUDA events); median of {repeats}",
            )
        )
    semi_rate: float | None = None  # the fastest semi-supervised step: the unlabeled loader's consumer
    for name in names:
        if name == "supervised":
            seconds, trainer = median(supervised_runs), supervised_trainer
        else:
            seconds, trainer = trainer_step_seconds(
                validate_run_config({**tree, "method": name}, "bench"), measure
            )
        if trainer.method.uses_unlabeled:
            semi_rate = max(semi_rate or 0.0, images / seconds)
        row = report.add(
            Row(
                f"step/{name}",
                images / seconds,
                "img/s (labeled)",
                images / bare,
                speedup(images / seconds, images / bare),
                note="unlabeled views too" if trainer.method.uses_unlabeled else "",
            )
        )
        echo(f"  {name}: {row.value:.1f} img/s")
        if name == "supervised":
            # The median of the pairs' ratios: a spike of the machine hits one run of a pair.
            cost = median([overhead(s, b) for s, b in zip(supervised_runs, bare_runs, strict=True)])
            report.add(
                Row(
                    "overhead/supervised_vs_bare",
                    cost,
                    "fraction",
                    bare,
                    1 + cost,
                    "<= 0.03",
                    check(cost, 0.03),
                    f"extra time per step of segsweep's loop over the bare loop; median over {repeats} "
                    "alternating pairs",
                )
            )
            waits = list(trainer.timing.data_wait)[-measure:]
            share = sum(waits) / (seconds * len(waits))
            report.add(
                Row(
                    f"data/wait_share_workers{numerics.workers}",
                    share,
                    "fraction",
                    target="~0",
                    note="share of step time spent waiting for the next batch (default workers)",
                )
            )

    on_section(report)

    # 2.-4. tracking overhead, data loading against consumption, FLOPs and memory
    if "tracking" in chosen:
        tracking_rows(report, tree, steps, quick, echo)
        on_section(report)
    if "data" in chosen:
        data_rows(report, cfg, tree, bare, measure, quick, semi_rate)
        on_section(report)
    if "flops" in chosen:
        flops_rows(report, cfg, tree, bare, measure, peak_tflops)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    report.add(Row("memory/peak_rss", peak_rss, "MiB", note="this process, every section so far"))
    on_section(report)

    # 5. GPU switches and packing (reported as skipped on a CPU, never guessed)
    on_gpu = numerics.device.type == "cuda"
    if "gpu" in chosen and on_gpu:
        gpu_rows(report, tree, measure, echo, 1 if quick else 3)
        readback_row(report, cfg, steps, measure, echo, 1 if quick else 3)
        on_section(report)
    if "packing" in chosen and on_gpu:
        packing_row(report, tree, measure, echo)
    if not on_gpu:
        switches = ["gpu/bf16", "gpu/channels_last", "gpu/compile", "gpu/readback_per_step"]
        skipped = switches if "gpu" in chosen else []
        for name in skipped + (["gpu/packing"] if "packing" in chosen else []):
            report.add(Row(name, None, "", note="skipped: no CUDA device on this machine"))

    # 6. the sweep layer and the report layer
    if "sweep" in chosen:
        sweep_rows(report, quick, echo)
        on_section(report)
    if "curve" in chosen:
        curve_row(report, 100 if quick else 1000, echo)
    report.complete = True
    on_section(report)
    return report


def tracking_rows(
    report: Report, tree: dict[str, Any], steps: int, quick: bool, echo: Callable[[str], None]
) -> None:
    """Metrics every step, panels at each evaluation, against the same run untracked: with
    MLflow's SQLite store in this process, then with the store behind an MLflow server started
    on this machine (training talks HTTP to it, as to the compose deployment's server).
    Untracked and tracked runs alternate (pairs against drift of a shared machine); the
    median pair counts."""
    track_tree = {**tree, "method": "fixmatch"}
    track_tree["train"] = {**tree["train"], "log_every": 1, "eval_every": max(1, steps // 2)}
    track_tree["tracking"] = {"enabled": True, "experiment": "bench"}
    cfg = validate_run_config(track_tree, "bench")
    count = 1 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        pairs = tracked_pairs(cfg, f"sqlite:///{tmp}/mlflow.db", count)
    # Then against a server, started only now: idle, it still wakes ten times a second, which
    # the SQLite pairs above should not share their cores with.
    served: list[tuple[RunClock, RunClock]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        try:
            uri, pid = stack.enter_context(local_server(Path(tmp)))
        except TrackingError as exc:  # no server here: its rows say why; the others stand
            why = str(exc)
        else:
            why = ""

            def server_cpu() -> float | None:
                members = session_members(pid)
                return None if members is None else sum(m.cpu_s for m in members)

            served = tracked_pairs(cfg, uri, count, server_cpu)
    loop_cost = median([overhead(t.train, u.train) for u, t in pairs])
    fixed = median([t.start + t.close - u.start - u.close for u, t in pairs])
    whole = median([overhead(t.total, u.total) for u, t in pairs])
    untracked_train = median([u.train for u, _ in pairs])
    report.add(
        Row(
            "overhead/tracking",
            loop_cost,
            "fraction",
            untracked_train,
            1 + loop_cost,
            "<= 0.02",
            check(loop_cost, 0.02),
            f"training time of a fixmatch run, metrics every step + panels per evaluation, "
            f"SQLite store; median of {len(pairs)} alternating pairs",
        )
    )
    writer_share = median([t.writer_cpu / u.train for u, t in pairs])
    caller_share = median([(t.caller - u.caller) / u.train for u, t in pairs])
    cpu_share = median([tracking_share(u, t) for u, t in pairs])
    report.add(
        Row(
            "overhead/tracking_cpu",
            cpu_share,
            "fraction",
            untracked_train,
            1 + cpu_share,
            "<= 0.02",
            check(cpu_share, 0.02),
            "the time tracking takes, without the run-to-run noise of the row above: the "
            "training thread's wall time inside tracker calls (panels rendered included) plus "
            "the writer thread's CPU, per second of untracked training (the cost when every "
            "core is busy training; the GIL waits of the training thread outside those calls "
            f"are not in it); median of {len(pairs)} pairs",
        )
    )
    report.add(
        Row(
            "overhead/tracking_training_thread",
            caller_share,
            "fraction",
            note="of it, the training thread's own: queueing metrics and rendering the panels",
        )
    )
    report.add(
        Row(
            "overhead/tracking_writer_cpu",
            writer_share,
            "fraction",
            note="CPU seconds of the tracker's writer thread per second of untracked training: "
            "what tracking costs the machine, free of the wall-clock noise of the row above "
            "(which adds contention for the GIL and the cores)",
        )
    )
    report.add(
        Row(
            "overhead/tracking_open_close",
            fixed,
            "s per run",
            note="opening the MLflow run and writing its last records, once per run",
        )
    )
    report.add(
        Row(
            "overhead/tracking_whole_run",
            whole,
            "fraction",
            median([u.total for u, _ in pairs]),
            1 + whole,
            note=f"the same, opening and closing included, for this {steps}-step run; the fixed "
            "part shrinks as runs get longer",
        )
    )
    echo(
        f"  tracking overhead: {100 * loop_cost:+.1f}% of training time (its time on the training "
        f"thread and the writer's CPU: {100 * cpu_share:.1f}%), plus {fixed:.2f} s per run "
        f"to open and close it ({100 * whole:+.1f}% of this {steps}-step run)"
    )

    served_rows(report, served, why, echo)


def tracked_pairs(
    cfg: RunConfig, uri: str, count: int, server_cpu: Callable[[], float | None] = lambda: None
) -> list[tuple[RunClock, RunClock]]:
    """``count`` pairs of the run untracked, then tracked at ``uri`` (taking turns against the
    drift of a shared machine); ``server_cpu`` as for ``timed_run``, over both runs (the
    untracked run's reading is the server's idle baseline)."""
    RunTracker(uri, "bench", run_name="warm-up").finish()  # store creation is not the runs' cost
    return [(timed_run(cfg, None, server_cpu), timed_run(cfg, uri, server_cpu)) for _ in range(count)]


def served_rows(
    report: Report, served: list[tuple[RunClock, RunClock]], why: str, echo: Callable[[str], None]
) -> None:
    """``overhead/tracking_cpu`` against the MLflow server, and the server's own CPU (another
    machine's in a deployment, so counted apart); ``why`` the server could not be measured."""
    if not served:
        for name in ("overhead/tracking_cpu_server", "overhead/tracking_server_cpu"):
            report.add(Row(name, None, "fraction", note=f"not measured: {why}"))
        echo(f"  against an MLflow server: not measured ({why})")
        return
    share = median([tracking_share(u, t) for u, t in served])
    report.add(
        Row(
            "overhead/tracking_cpu_server",
            share,
            "fraction",
            median([u.train for u, _ in served]),
            1 + share,
            "<= 0.02",
            check(share, 0.02),
            "as overhead/tracking_cpu, with the store behind an MLflow server on this machine "
            "(no auth, SQLite, local artifacts, 1 worker): the training process sends HTTP "
            f"requests and the store's work is the server's; median of {len(served)} pairs",
        )
    )
    server = [
        (t.server_cpu - u.server_cpu) / u.train
        for u, t in served
        if t.server_cpu is not None and u.server_cpu is not None
    ]
    report.add(
        Row(
            "overhead/tracking_server_cpu",
            median(server) if server else None,
            "fraction",
            note="the server's CPU seconds over a tracked run (opening and closing it included), "
            "less its CPU over the untracked run before it, per second of untracked training: "
            "another machine's in a deployment, here sharing this one's cores"
            + ("" if server else " (not measured: no /proc on this system)"),
        )
    )
    echo(
        f"  the same against an MLflow server: {100 * share:.1f}% on the training side"
        + (f", and the server's CPU: {100 * median(server):.1f}%" if server else "")
    )


def data_rows(
    report: Report,
    cfg: RunConfig,
    tree: dict[str, Any],
    bare: float,
    measure: int,
    quick: bool,
    semi_rate: float | None,
) -> None:
    """Loader throughput alone against the step's consumption (labeled images: the bare step;
    unlabeled images: the fastest semi-supervised step measured, ``semi_rate`` labeled img/s),
    the wait at 2 workers, the bytes of a batch, and the strong views made on the device."""
    images = cfg.train.batch_size
    unlabeled = cfg.train.unlabeled_batch_size or images
    data = prepare(cfg).data
    batches = 10 if quick else 40
    streams = (  # (row suffix, dataset, batch size, images/s its consumer takes, the consumer)
        ("", data.labeled(), images, images / bare, "the bare step"),
        (
            "_unlabeled",
            data.unlabeled(),
            unlabeled,
            (semi_rate or images / bare) * unlabeled / images,
            "the fastest semi-supervised step" if semi_rate else "the bare step",
        ),
    )
    for name, dataset, size, need, consumer in streams:
        batch = next(stream_loader(dataset, size, 1, 0, 0, False))
        nbytes = sum(v.element_size() * v.nelement() for v in batch.values())
        kind = "unlabeled" if name else "labeled"
        report.add(
            Row(f"data/batch_bytes{name}", nbytes / 2**20, "MiB", note=f"one {kind} batch from the loader")
        )
        for workers in (0, 2) if not name else (0,):
            rate = loader_batches_per_second(dataset, size, batches, workers) * size
            report.add(
                Row(
                    f"data/loader{name}_workers{workers}",
                    rate,
                    "img/s",
                    need,
                    speedup(rate, need),
                    f">= 1 (keeps up with {consumer})",
                    check(rate / need, 1.0, below=False),
                )
            )
    report.add(strong_view_row(data, unlabeled, batches, numerics_for(cfg).device))
    w_tree = {**tree, "data": {**tree["data"], "num_workers": 2}}
    seconds, trainer = trainer_step_seconds(validate_run_config(w_tree, "bench"), measure)
    waits = list(trainer.timing.data_wait)[-measure:]
    report.add(Row("data/wait_share_workers2", sum(waits) / (seconds * len(waits)), "fraction", target="~0"))


def strong_view_row(data: Any, size: int, batches: int, device: torch.device) -> Row:
    """Strong views per second made from loader batches on the run's device, as ``to_model``
    makes them (the loader hands over their parameters only)."""
    loader = stream_loader(data.unlabeled(), size, 1, 0, 0, False)
    ready = [next(loader) for _ in range(min(batches, 8))]
    weak = [b["image_u_w"].to(device) for b in ready]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    strong_views(weak[0], ready[0]["strong_u"])  # warm-up
    sync()
    start = time.perf_counter()
    for image, batch in zip(weak, ready, strict=True):
        strong_views(image, batch["strong_u"])
    sync()
    rate = len(weak) * size / (time.perf_counter() - start)
    return Row("data/strong_views", rate, "img/s", note=f"made per batch on {device.type}, not in the loader")


def flops_rows(
    report: Report,
    cfg: RunConfig,
    tree: dict[str, Any],
    bare: float,
    measure: int,
    peak_tflops: float | None,
) -> None:
    """FLOPs per step, achieved FLOP/s (utilisation against ``peak_tflops``), GPU memory."""
    flops = flops_per_step(cfg)
    achieved = flops / bare
    util_note = ""
    util = None
    if peak_tflops:
        util = achieved / (peak_tflops * 1e12)
        util_note = f"model FLOPs utilisation vs {peak_tflops} TFLOP/s peak"
    report.add(Row("flops/per_step", flops / 1e9, "GFLOP", note="forward + backward, supervised step"))
    report.add(Row("flops/achieved", achieved / 1e9, "GFLOP/s", note="FLOPs per step / bare step time"))
    if util is not None:
        report.add(Row("flops/mfu", util, "fraction", note=util_note))
    if numerics_for(cfg).device.type == "cuda":
        # One supervised trial alone, at the default numerics: what a trial asks of a GPU
        # (the peak of the whole process would include the FLOP counter's fp32 pass).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trainer_step_seconds(validate_run_config({**tree, "method": "supervised"}, "bench"), measure)
        peak = torch.cuda.max_memory_allocated() / 2**30
        report.add(Row("memory/peak_gpu_trial", peak, "GiB", note="one supervised trial, default numerics"))


def curve_row(report: Report, count: int, echo: Callable[[str], None]) -> None:
    """Read ``count`` runs back from a SQLite store and draw the curve (bulk queries)."""
    from mlflow.entities import Metric, Param, RunTag

    from segsweep.reports import curve as curves
    from segsweep.tracking.mlflow_writer import (
        TAG_PHASE,
        TAG_STATUS,
        client_for,
        ensure_experiment,
        fetch_runs,
    )

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = client_for(uri)
        exp = ensure_experiment(client, "curve-bench", uri)
        for i in range(count):
            run = client.create_run(exp, tags={TAG_PHASE: "final"})
            method, ratio, seed = ("supervised", "fixmatch")[i % 2], (0.0625, 0.25, 0.5)[i // 2 % 3], i // 6
            client.log_batch(
                run.info.run_id,
                metrics=[Metric("val/mIoU_last", 0.3 + 0.1 * ratio + 0.01 * (i % 2), 0, 1)],
                params=[
                    Param("method", method),
                    Param("label_ratio", str(ratio)),
                    Param("seed", str(seed)),
                    Param("dataset", "synthetic"),
                ],
                tags=[RunTag(TAG_STATUS, "finished")],
            )
            client.set_terminated(run.info.run_id, "FINISHED")
        start = time.perf_counter()
        curve = curves.build_curve(fetch_runs(uri, "curve-bench"))
        curves.write_outputs(curve, Path(tmp) / "out", "bench")
        seconds = time.perf_counter() - start
    report.add(
        Row(
            f"report/curve_{count}_runs",
            seconds,
            "s",
            target="a few seconds",
            passed=seconds < 10,
            note="read every run in bulk, aggregate, paired differences, plot, CSVs",
        )
    )
    echo(f"  curve over {count} runs: {seconds:.2f} s")


def gpu_rows(
    report: Report, tree: dict[str, Any], measure: int, echo: Callable[[str], None], rounds: int = 3
) -> None:
    """Each switch against full precision, ``rounds`` interleaved rounds, median of each (one
    H200 run of the same setting swung by 35% at the quickstart size, more than the effects
    measured). The same seed and data for all, so the validation mIoU after the run (in each
    row's note) shows a switch that breaks training."""
    images = tree["train"]["batch_size"]
    settings = {
        "gpu/fp32": {"amp": "off", "channels_last": False, "compile": False},
        "gpu/bf16": {"amp": "bf16", "channels_last": False, "compile": False},
        "gpu/channels_last": {"amp": "off", "channels_last": True, "compile": False},
        "gpu/bf16+channels_last": {"amp": "bf16", "channels_last": True, "compile": False},
        "gpu/compile": {"amp": "bf16", "channels_last": True, "compile": True},
    }
    rates: dict[str, list[float]] = {name: [] for name in settings}
    mious: dict[str, float] = {}
    for round_ in range(rounds):
        for name, train in settings.items():
            t = {**tree, "train": {**tree["train"], **train}}
            seconds, _, metrics = trainer_run(validate_run_config(t, "bench"), measure)
            rates[name].append(images / seconds)
            # as it goes: a bench cut short by a time limit keeps these lines at least
            echo(f"    round {round_ + 1}/{rounds} {name}: {images / seconds:.1f} img/s")
            mious[name] = metrics.get("val/mIoU_last", float("nan"))  # the last round's
    fp32 = median(rates["gpu/fp32"])
    for name in settings:
        value = median(rates[name])
        note = f"median of {rounds}; val mIoU after the run {mious[name]:.3f}"
        if name == "gpu/fp32":
            report.add(Row(name, value, "img/s", note=note))
        else:
            note += f" (fp32 {mious['gpu/fp32']:.3f})"
            report.add(Row(name, value, "img/s", fp32, speedup(value, fp32), note=note))
        echo(f"  {name}: {value:.1f} img/s ({speedup(value, fp32):.2f}x fp32; {note})")


def readback_row(
    report: Report, cfg: RunConfig, steps: int, measure: int, echo: Callable[[str], None], rounds: int = 3
) -> None:
    """What reading the loss back every step costs a GPU (the method contract's float logs make
    the trainer do it): the bare loop with a per-step read against one that never waits,
    ``rounds`` alternating pairs, the median of the pairs' overheads. Measured to decide
    whether the contract should hand back tensors and the trainer read them once per log
    interval (as nanoGPT does)."""
    pairs = []
    for _ in range(rounds):
        synced, _ = bare_run(cfg, steps, measure, readback=True)
        free, _ = bare_run(cfg, steps, measure, readback=False)
        pairs.append((synced, free))
    cost = median([overhead(a, b) for a, b in pairs])
    free = median([b for _, b in pairs])
    report.add(
        Row(
            "gpu/readback_per_step",
            cost,
            "fraction",
            free,
            1 + cost,
            note=f"bare loop reading its loss back every step against never; median of {rounds} pairs",
        )
    )
    echo(f"  reading the loss back every step: {100 * cost:+.1f}% per step")


def packing_row(report: Report, tree: dict[str, Any], measure: int, echo: Callable[[str], None]) -> None:
    """Several quickstart-size trials on one GPU (fractional GPUs) against one alone."""
    alone, _ = _packed_rate(tree, measure, 1)
    packed, common = _packed_rate(tree, measure, 4)
    span = "over the span all four trained at once" if common else "summed (the trials never overlapped)"
    report.add(
        Row(
            "gpu/packing",
            packed / alone,
            "x aggregate",
            alone,
            packed / alone,
            ">= 2",
            check(packed / alone, 2.0, below=False),
            f"4 trials on one GPU vs 1, aggregate img/s {span}; each with its share of the CPU "
            "threads and loader workers, as a sweep trial",
        )
    )
    echo(f"  gpu/packing: 4 trials {packed:.0f} img/s vs 1 alone {alone:.0f} img/s ({packed / alone:.2f}x)")


def _trial_steps(tree: dict[str, Any], threads: int, start: Any, queue: Any) -> None:
    """One packed trial: its share of the CPU threads (a sweep trial gets ``cpus_per_trial``,
    and its loader workers follow the threads), built, then trained once all are built."""
    torch.set_num_threads(threads)
    prepared = prepare(validate_run_config(tree, "bench"))
    start.wait()
    with tempfile.TemporaryDirectory() as tmp:
        prepared.trainer.run(Path(tmp), NullTracker())
    queue.put(prepared.trainer.timing.step_end)


def _packed_rate(tree: dict[str, Any], measure: int, trials: int) -> tuple[float, bool]:
    """Aggregate img/s of ``trials`` processes training at once on the same GPU, and whether
    it was measured over a span they all shared (``overlap_rate``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(trials)
    threads = max(1, usable_cpus() // trials)
    procs = [ctx.Process(target=_trial_steps, args=(tree, threads, start, queue)) for _ in range(trials)]
    for p in procs:
        p.start()
    ends = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return overlap_rate(ends, tree["train"]["batch_size"], max(0, len(ends[0]) - measure - 1))


def overlap_rate(step_ends: list[list[float]], images_per_step: int, skip: int) -> tuple[float, bool]:
    """Aggregate images/s of concurrent trials from their step end times (one monotonic clock,
    shared by the processes of a machine): the steps every trial ended in the span where all
    were past their first ``skip`` steps and none had finished, over that span. A rate summed
    from each trial's own window would count a trial's tail, run alone, as packed. Where the
    trials never overlapped, the sum of their own rates, and False."""
    lo = max(ends[skip] for ends in step_ends)
    hi = min(ends[-1] for ends in step_ends)
    if hi > lo:
        steps = sum(sum(lo < t <= hi for t in ends) for ends in step_ends)
        return steps * images_per_step / (hi - lo), True
    rates = [(len(e) - 1 - skip) * images_per_step / max(e[-1] - e[skip], 1e-9) for e in step_ends]
    return sum(rates), False


def steady_seconds_per_trial(ends: list[float], concurrency: int) -> float:
    """Slot-seconds one trial occupies at steady state: with ``concurrency`` slots, trials end
    every (last end - first end) / (n - 1) seconds once the pipeline is full; the first end
    carries the one-off start (workers, imports) and is the origin, not an interval."""
    ends = sorted(ends)
    if len(ends) < 2:
        raise ValueError("at least two trial end times are needed")
    return (ends[-1] - ends[0]) / (len(ends) - 1) * concurrency


def sweep_rows(report: Report, quick: bool, echo: Callable[[str], None]) -> None:
    """Ray start, the first trial's start-up, and per-trial scheduling + tracking cost at
    steady state, from a sweep of trivial trials (1 step and 1 evaluation each)."""
    import yaml

    from segsweep.sweep.driver import run_sweep
    from segsweep.sweep.spec import plan_sweep
    from segsweep.tracking.mlflow_writer import TAG_KIND, fetch_runs

    n = 8 if quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        base = base_config(True, "cpu")
        base["train"].update(steps=1, eval_every=1)
        base.pop("tracking")
        spec = {
            "name": "bench",
            "base": base,
            "grid": {"method": ["supervised"], "data.label_ratio": [0.5], "seed": list(range(n))},
            "early_stop": {"enabled": False},
            "resources": {"cpus_per_trial": 1},
        }
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(spec))
        uri = f"sqlite:///{tmp}/mlflow.db"
        cwd = Path.cwd()
        os.chdir(tmp)
        try:
            plan = plan_sweep(path, tracking_uri=uri)
            began = time.time()
            result = run_sweep(plan, Path(tmp) / "sweeps", echo=lambda _m: None)
            trials = [r for r in fetch_runs(uri, "bench") if r.tags.get(TAG_KIND) != "sweep"]
            # One trivial trial's own work, untracked and unscheduled, in this process.
            cfg = validate_run_config({**plan.cells[0].tree, "tracking": {"enabled": False}}, "bench")
            start = time.perf_counter()
            prepared = prepare(cfg)
            prepared.trainer.run(Path(tmp) / "solo", NullTracker())
            compute = time.perf_counter() - start
        finally:
            os.chdir(cwd)
            import ray

            ray.shutdown()
    concurrency = max(1, min(n, usable_cpus()))
    per_trial = steady_seconds_per_trial([r.end_time / 1000 for r in trials], concurrency)
    cost = per_trial - compute
    first_start = min(r.start_time for r in trials) / 1000 - began - result.seconds["ray_init"]
    report.add(Row("sweep/ray_start", result.seconds["ray_init"], "s", note="local Ray, once per sweep"))
    report.add(
        Row(
            "sweep/first_trial_start",
            first_start,
            "s",
            note="once per worker: process start, imports (torch, Ray, MLflow), dataset, model",
        )
    )
    report.add(
        Row(
            "sweep/per_trial_overhead",
            cost,
            "s",
            compute,
            per_trial / compute,
            "< 1",
            check(cost, 1.0),
            f"{n} trivial trials, {concurrency} at once, steady state (from the first trial end to "
            "the last): slot-seconds per trial minus the trial's own compute (model build, 1 step, "
            "evaluation)",
        )
    )
    amortised = result.seconds["search"] * concurrency / n - compute
    report.add(
        Row(
            "sweep/per_trial_overhead_amortised",
            amortised,
            "s",
            note=f"the same over the whole search phase, start-up included, shared by {n} trials",
        )
    )
    echo(f"  sweep: {cost:.2f} s of scheduling + tracking per trial at steady state")


def format_table(report: Report) -> str:
    m = report.machine
    usable = m.get("usable_cpus", m["cpu_count"])  # absent from reports before it was kept
    cpus = f"{m['cpu_count']} CPUs" + (f", {usable} usable" if usable != m["cpu_count"] else "")
    lines = [
        f"segsweep bench, {report.date}, {m.get('gpu') or m['cpu']} ({cpus}), torch {m['torch']}",
        f"{'row':<34}{'value':>12} {'unit':<16}{'vs':>10}{'target':>16}  ok",
    ]
    for r in report.rows:
        value = "-" if r.value is None else f"{r.value:.4g}"
        ratio = "" if r.ratio is None else f"{r.ratio:.3f}x"
        ok = "" if r.passed is None else ("yes" if r.passed else "NO")
        lines.append(f"{r.name:<34}{value:>12} {r.unit:<16}{ratio:>10}{r.target:>16}  {ok}")
        if r.note and r.value is None:
            lines[-1] += f"  ({r.note})"
    return "\n".join(lines)


__all__ = ["Report", "Row", "check", "format_table", "overhead", "run_bench", "speedup"]
