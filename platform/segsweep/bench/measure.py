"""The bench's measurements: one run through the real trainer (tracked or not, its clocks),
the bare PyTorch loop it is compared with, loader throughput and FLOPs per step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from segsweep.config import RunConfig
from segsweep.data.loaders import hash_seed, stream_loader
from segsweep.models.network import build_model
from segsweep.primitives import poly_lr
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.protocol import NullTracker
from segsweep.training.devices import numerics_for, seed_everything, to_device
from segsweep.training.runner import prepare


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
