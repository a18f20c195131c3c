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

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from segsweep.bench.gpu import gpu_rows, packing_row, readback_row
from segsweep.bench.layers import curve_row, sweep_rows
from segsweep.bench.measure import bare_run, flops_per_step, loader_batches_per_second, trainer_step_seconds
from segsweep.bench.report import (
    SCHEMA,
    SECTIONS,
    Report,
    Row,
    base_config,
    check,
    check_sections,
    machine_info,
    median,
    overhead,
    speedup,
)
from segsweep.bench.tracked import tracking_rows
from segsweep.config import RunConfig, validate_run_config
from segsweep.data.loaders import stream_loader
from segsweep.data.transforms import strong_views
from segsweep.training.devices import numerics_for
from segsweep.training.runner import prepare


@dataclass(frozen=True)
class Setup:
    """What every section measures at: the bench's config (as a tree to vary, and validated),
    its numerics, the steps of a run and how many of the last are timed (past warm-up)."""

    tree: dict[str, Any]
    cfg: RunConfig
    numerics: Any
    steps: int
    measure: int
    quick: bool
    echo: Callable[[str], None]

    @property
    def on_gpu(self) -> bool:
        return self.numerics.device.type == "cuda"


def setup_of(
    quick: bool, device: str, overrides: dict[str, Any] | None, echo: Callable[[str], None]
) -> Setup:
    """The bench's config from ``base_config``, validated, with its measuring window."""
    tree = base_config(quick, device, overrides)
    cfg = validate_run_config(tree, "bench")
    steps = cfg.train.steps
    measure = max(2, steps - max(2, steps // 4))  # skip warm-up steps
    return Setup(tree, cfg, numerics_for(cfg), steps, measure, quick, echo)


def new_report(setup: Setup) -> Report:
    """An empty report, dated, naming the machine and the config every row measured."""
    cfg = setup.cfg
    return Report(
        SCHEMA,
        datetime.now(UTC).isoformat(timespec="seconds"),
        machine_info(),
        {
            "arch": cfg.model.arch,
            "encoder": cfg.model.encoder,
            "crop": cfg.data.crop_size,
            "batch_size": cfg.train.batch_size,
            "steps": setup.steps,
            "device": str(setup.numerics.device),
            "num_workers": setup.numerics.workers,
            "quick": setup.quick,
        },
    )


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
    setup = setup_of(quick, device, overrides, echo)
    cfg, tree, measure = setup.cfg, setup.tree, setup.measure
    report = new_report(setup)

    # 1. the bare loop and every method through the trainer
    names = (methods or list(METHODS)) if "step" in chosen else []
    bare, semi_rate = step_rows(report, setup, names)
    on_section(report)

    # 2.-4. tracking overhead, data loading against consumption, FLOPs and memory
    if "tracking" in chosen:
        tracking_rows(report, tree, setup.steps, quick, echo)
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
    gpu_sections(report, setup, chosen, on_section)

    # 6. the sweep layer and the report layer
    if "sweep" in chosen:
        sweep_rows(report, quick, echo)
        on_section(report)
    if "curve" in chosen:
        curve_row(report, 100 if quick else 1000, echo)
    report.complete = True
    on_section(report)
    return report


@dataclass
class StepRuns:
    """The bare loop's and the supervised trainer's seconds per step, run by run (they
    alternate, against a shared machine's drift), and the bare loop's GPU idle shares."""

    bare: list[float] = field(default_factory=list)
    gpu_idle: list[float] = field(default_factory=list)
    supervised: list[float] = field(default_factory=list)
    supervised_trainer: Any = None  # the last one: its data-wait clock


def alternate_runs(setup: Setup, names: list[str], repeats: int) -> StepRuns:
    """``repeats`` rounds of the bare loop, each followed by the supervised trainer where it is
    among ``names``."""
    runs = StepRuns()
    for _ in range(repeats):
        seconds, idle = bare_run(setup.cfg, setup.steps, setup.measure)
        runs.bare.append(seconds)
        if idle is not None:
            runs.gpu_idle.append(idle)
        if "supervised" in names:
            seconds, runs.supervised_trainer = trainer_step_seconds(
                validate_run_config({**setup.tree, "method": "supervised"}, "bench"), setup.measure
            )
            runs.supervised.append(seconds)
    return runs


def step_rows(report: Report, setup: Setup, names: list[str]) -> tuple[float, float | None]:
    """``step/bare`` and ``step/<method>`` for each of ``names``, the supervised step's overhead
    over the bare loop and its data wait. The bare loop and the supervised step alternate, each
    counted at its median. Returns the bare loop's seconds per step and the fastest
    semi-supervised step's labeled img/s (None without one)."""
    images, measure = setup.cfg.train.batch_size, setup.measure
    repeats = 1 if setup.quick or "supervised" not in names else 5
    runs = alternate_runs(setup, names, repeats)
    bare = median(runs.bare)
    report.add(
        Row(
            "step/bare",
            images / bare,
            "img/s",
            note=f"plain PyTorch loop, supervised step; median of {repeats}",
        )
    )
    setup.echo(f"  bare loop: {images / bare:.1f} img/s")
    if runs.gpu_idle:
        report.add(
            Row(
                f"data/gpu_idle_share_workers{setup.numerics.workers}",
                median(runs.gpu_idle),
                "fraction",
                target="~0",
                note=f"bare loop: share of GPU time waiting for the next batch (CUDA events); median of {repeats}",
            )
        )
    semi_rate: float | None = None  # the fastest semi-supervised step: the unlabeled loader's consumer
    for name in names:
        if name == "supervised":
            seconds, trainer = median(runs.supervised), runs.supervised_trainer
        else:
            seconds, trainer = trainer_step_seconds(
                validate_run_config({**setup.tree, "method": name}, "bench"), measure
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
        setup.echo(f"  {name}: {row.value:.1f} img/s")
        if name == "supervised":
            supervised_rows(report, setup, runs, trainer, seconds)
    return bare, semi_rate


def supervised_rows(report: Report, setup: Setup, runs: StepRuns, trainer: Any, seconds: float) -> None:
    """The platform's cost: segsweep's loop over the bare loop (the median of the pairs'
    ratios: a spike of the machine hits one run of a pair), and its wait for data."""
    repeats = len(runs.bare)
    cost = median([overhead(s, b) for s, b in zip(runs.supervised, runs.bare, strict=True)])
    report.add(
        Row(
            "overhead/supervised_vs_bare",
            cost,
            "fraction",
            median(runs.bare),
            1 + cost,
            "<= 0.03",
            check(cost, 0.03),
            f"extra time per step of segsweep's loop over the bare loop; median over {repeats} "
            "alternating pairs",
        )
    )
    waits = list(trainer.timing.data_wait)[-setup.measure :]
    share = sum(waits) / (seconds * len(waits))
    report.add(
        Row(
            f"data/wait_share_workers{setup.numerics.workers}",
            share,
            "fraction",
            target="~0",
            note="share of step time spent waiting for the next batch (default workers)",
        )
    )


def gpu_sections(
    report: Report, setup: Setup, chosen: set[str], on_section: Callable[[Report], None]
) -> None:
    """The ``gpu`` and ``packing`` sections on a GPU; on a CPU their rows, marked skipped."""
    rounds = 1 if setup.quick else 3
    if "gpu" in chosen and setup.on_gpu:
        gpu_rows(report, setup.tree, setup.measure, setup.echo, rounds)
        readback_row(report, setup.cfg, setup.steps, setup.measure, setup.echo, rounds)
        on_section(report)
    if "packing" in chosen and setup.on_gpu:
        packing_row(report, setup.tree, setup.measure, setup.echo)
    if not setup.on_gpu:
        switches = ["gpu/bf16", "gpu/channels_last", "gpu/compile", "gpu/readback_per_step"]
        skipped = switches if "gpu" in chosen else []
        for name in skipped + (["gpu/packing"] if "packing" in chosen else []):
            report.add(Row(name, None, "", note="skipped: no CUDA device on this machine"))


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
