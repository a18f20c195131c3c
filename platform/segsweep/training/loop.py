"""The trainer: one plain loop per stage. Methods plug in through ``training_step``; nothing
here branches on a method's name.

A run is a list of stages (``Method.stages``; one for single-loop methods). Each stage
builds its own optimizer, streams its batches, evaluates every ``train.eval_every`` steps
and at its end, and checkpoints at each evaluation (``checkpoints.py``: what a checkpoint
holds, and resuming from one). Devices and numerics are in ``devices.py``, scoring in
``evaluation.py``.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from segsweep.config import RunConfig, TrainConfig
from segsweep.data import Data
from segsweep.data.loaders import eval_loader, hash_seed, stream_loader
from segsweep.data.sources import Sample
from segsweep.errors import ConfigError, Diverged, InjectedFailure, Stopped
from segsweep.files import remove_leftovers
from segsweep.methods import Method, Stage, get_method
from segsweep.models.network import HeadOptions, build_model
from segsweep.primitives import masked_cross_entropy, ohem_cross_entropy, poly_lr
from segsweep.tracking.protocol import NullTracker, Tracker
from segsweep.training import checkpoints
from segsweep.training.checkpoints import Progress, rng_state, set_rng_state
from segsweep.training.devices import (
    allocation,
    numerics_for,
    out_of_memory_said,
    seed_everything,
    to_device,
)
from segsweep.training.evaluation import pseudo_mask_quality, sample_panel, score_models, summary_metrics

#: Called at each evaluation with the metrics and the folder of the checkpoint just written
#: (the sweep layer hands both to Ray Tune).
Reporter = Callable[[dict[str, Any], Path], None]


def build_method(cfg: RunConfig, num_classes: int) -> Method:
    """The run's model and method, initialised under its seed (every RNG seeded first), on
    the CPU: the trainer trains it, ``segsweep probe`` rebuilds a run's start with it."""
    seed_everything(cfg.seed)
    m = cfg.model
    head = HeadOptions(m.output_stride, m.aspp_rates, m.aspp_dropout, m.aspp_separable)
    model = build_model(
        m.arch, m.encoder, num_classes, m.encoder_weights, m.decoder_channels, head, m.weights_cache
    )
    method = get_method(cfg.method)(model, cfg.knobs(), num_classes)
    method.supervised_loss = supervised_loss_of(cfg.train)
    method.crop_size = cfg.data.crop_size
    return method


def supervised_loss_of(t: TrainConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss of labeled pixels that ``train.loss`` names (methods call it on their
    labeled logits and masks)."""
    if t.loss == "ohem":
        # min_kept counts over a step's batch; a micro-batch keeps its share of it (UniMatch:
        # 200,000 per GPU of 2 images, each GPU's loss its own)
        per_part = math.ceil(t.ohem_min_kept / t.accumulate)
        return functools.partial(ohem_cross_entropy, threshold=t.ohem_threshold, min_kept=per_part)
    return masked_cross_entropy


def micro_batches(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """``batch`` cut along its first dimension into ``parts`` batches (each key alike; the
    config makes the batch sizes multiples of ``parts``)."""
    if parts == 1:
        return [batch]
    pieces = {key: value.tensor_split(parts) for key, value in batch.items()}
    return [{key: pieces[key][i] for key in batch} for i in range(parts)]


@dataclass
class Timing:
    """Per-step clocks of the main loop (for ``segsweep bench``): when each step ended and
    how long it waited for its batch. Bounded, so a long run does not grow them."""

    step_end: deque = field(default_factory=lambda: deque(maxlen=100_000))
    data_wait: deque = field(default_factory=lambda: deque(maxlen=100_000))


@dataclass
class RunResult:
    status: str  # finished | diverged
    metrics: dict[str, float]
    run_dir: Path
    message: str = ""


class Trainer:
    """Trains one run of ``cfg`` on ``data``; tracking and sweep reporting are injected."""

    def __init__(self, cfg: RunConfig, data: Data, echo: Callable[[str], None] | None = None) -> None:
        """Build model, method and evaluation loaders; raises ConfigError before any run exists."""
        self.cfg, self.data = cfg, data
        self.run_dir = Path(cfg.output_dir)
        self.tracker: Tracker = NullTracker()
        self.reporter: Reporter | None = None
        self.should_stop: Callable[[], bool] | None = None
        self.echo = echo or (lambda _msg: None)
        self.numerics = numerics_for(cfg)
        self.method: Method = build_method(cfg, data.source.num_classes)
        self._place_method()
        self._check_micro_batches()
        self.stages = self.method.stages(cfg.train.steps)
        names = [s.name for s in self.stages]
        if cfg.debug.fail_at_step is not None and cfg.debug.fail_stage not in names:
            raise ConfigError(
                f"debug.fail_stage: '{cfg.debug.fail_stage}' is not a stage of {cfg.method}; "
                f"its stages: {', '.join(names)}"
            )
        self.progress = Progress()
        # This attempt's start, and what earlier attempts spent up to the checkpoint it
        # resumes from (steps redone after a resume are counted once).
        self._attempt_started, self._seconds_before = time.time(), 0.0
        self.timing = Timing()
        self.final_report: dict[str, Any] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(enabled=self.numerics.amp_dtype == torch.float16)
        # A resumed run's optimizer and RNG states, put back when its stage starts.
        self._pending_optimizer: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        e, workers = cfg.eval, self.numerics.workers
        self.val_loader = eval_loader(data.source, data.source.val, e.batch_size, workers)
        self.tune_loader = (
            eval_loader(data.source, data.split.tune, e.batch_size, workers) if data.split.tune else None
        )
        diag = self._diagnostic_samples(e.diag_samples)
        self.diag_loader = eval_loader(data.source, diag, e.batch_size, 0) if diag else None
        # Images in a sample panel (taken from the diagnostic pass); panels tile images of
        # one size, so none for datasets of mixed sizes.
        self.panel_samples = min(e.panel_samples, len(diag)) if data.source.fixed_size else 0

    def _place_method(self) -> None:
        """The method on the run's device, in its memory format, compiled if asked."""
        cfg, model = self.cfg, self.method.model
        with out_of_memory_said(  # a model too big for the device: the user's choice to fix
            lambda exc: (
                f"out of memory on {self.numerics.device} placing the model ({cfg.model.arch}, "
                f"{cfg.model.encoder}; {allocation(exc)}): choose a smaller model or another device"
            )
        ):
            self.method.to(self.numerics.device)
        if self.numerics.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # Compile the encoder and decoder in place: both ``model(x)`` and the methods'
            # ``forward_features`` run through the compiled graphs.
            model.net.encoder.compile()
            model.net.decoder.compile()

    def _check_micro_batches(self) -> None:
        """A ``train.accumulate`` that leaves a micro-batch too few unlabeled images is refused."""
        t, needs = self.cfg.train, self.method.unlabeled_per_micro_batch()
        per_part = (t.unlabeled_batch_size or t.batch_size) // t.accumulate
        if self.method.uses_unlabeled and per_part < needs:
            raise ConfigError(
                f"train.accumulate: {t.accumulate} micro-batches leave {per_part} unlabeled image(s) in "
                f"each, and {self.cfg.method} needs {needs} (its CutMix "
                "partner comes from the same micro-batch); accumulate less"
            )

    def _diagnostic_samples(self, count: int) -> list[Sample]:
        """A fixed sample of unlabeled images whose ground truth exists (never trained on)."""
        out = []
        for s in self.data.split.unlabeled:
            if len(out) == count:
                break
            if isinstance(s.mask, int) or (
                isinstance(s.mask, str) and (self.data.source.root / s.mask).is_file()
            ):
                out.append(s)
        return out

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def elapsed_seconds(self) -> float:
        """Wall seconds this run has trained, over every attempt (``time/run_seconds``)."""
        return self._seconds_before + time.time() - self._attempt_started

    def save_checkpoint(self, name: str) -> Path:
        """Everything needed to continue this run, as ``checkpoints/<name>``."""
        self.progress.seconds = self.elapsed_seconds()
        return checkpoints.save_run_state(
            self.checkpoint_dir / name,
            self.cfg,
            self.method,
            self.optimizer,
            self.scaler,
            self.progress,
            self.numerics.device,
            self.tracker.run_id,
        )

    def save_stage_weights(self, stage: Stage) -> Path:
        """A finished stage's weights, as ``checkpoints/<stage>.pt`` (``checkpoints.save_stage_weights``)."""
        path = self.checkpoint_dir / f"{stage.name}.pt"
        return checkpoints.save_stage_weights(path, self.cfg, self.method, stage.name)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from ``path`` (a ``last.pt``); a file that is not a whole checkpoint of
        this run's method and model is a one-line ``ConfigError`` naming it."""
        resumed = checkpoints.load_run_state(path, self.cfg, self.method, self.scaler)
        self.progress = resumed.progress
        self._pending_optimizer, self._pending_rng = resumed.optimizer, resumed.rng

    def _out_of_memory(self, exc: RuntimeError) -> str:
        """What did not fit, and the settings that size it (a user's fix, not a bug)."""
        cfg, stage = self.cfg, self.stages[self.progress.stage]
        return (
            f"out of memory on {self.numerics.device} in stage '{stage.name}' at step "
            f"{self.progress.step} ({allocation(exc)}): lower train.batch_size "
            f"({cfg.train.batch_size}), train.unlabeled_batch_size, eval.batch_size "
            f"({cfg.eval.batch_size}) or data.crop_size ({cfg.data.crop_size}); `segsweep bench` "
            "reports the peak memory of a run"
        )

    # -- the run -----------------------------------------------------------------------------
    def run(
        self,
        run_dir: Path,
        tracker: Tracker | None = None,
        reporter: Reporter | None = None,
        resume_from: Path | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RunResult:
        """Train every stage (from ``resume_from``'s stage and step when given).

        ``should_stop`` is polled every step: a sweep's scheduler may stop the trial between
        two reports, and the rest of the interval is then not trained for nothing.
        """
        self.run_dir = run_dir
        # A run killed mid-save left a temporary beside its checkpoints; a sweep would copy
        # it with every checkpoint it reports. This run is the folder's only writer.
        remove_leftovers(self.checkpoint_dir)
        self.should_stop = should_stop
        self.tracker = tracker or NullTracker()
        self.reporter = reporter
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._attempt_started, self._seconds_before = time.time(), self.progress.seconds
        self.echo(
            f"run {self.tracker.run_id or '(untracked)'}: {self.cfg.method} on "
            f"{self.data.source.name}, {len(self.data.split.labeled)} labeled / "
            f"{len(self.data.split.unlabeled)} unlabeled images, device {self.numerics.device}"
        )
        with out_of_memory_said(self._out_of_memory):
            for index in range(self.progress.stage, len(self.stages)):
                if index != self.progress.stage:  # entering a new stage from the previous one
                    self.progress.stage, self.progress.step = index, 0
                    self._pending_optimizer = None  # a resumed optimizer is its own stage's only
                self._run_stage(self.stages[index], last=index == len(self.stages) - 1)
                if index < len(self.stages) - 1:
                    self.save_stage_weights(self.stages[index])
        # Built from the checkpointed progress, so a run resumed at its very end reports too.
        self.final_report = {
            **{k: v for k, v in self.progress.last.items() if "/iou/" not in k},
            **summary_metrics(self.progress),
            "step": self.stages[-1].steps,
            "stage": self.stages[-1].name,
            "final": True,
            "mlflow_run_id": self.tracker.run_id,
        }
        return RunResult("finished", summary_metrics(self.progress), self.run_dir)

    def _prefix(self, stage: Stage) -> str:
        return "" if stage.name == "train" else f"{stage.name}/"

    def _run_stage(self, stage: Stage, last: bool) -> None:
        """Train one stage from ``progress.step`` to its budget: the loop itself."""
        t, debug = self.cfg.train, self.cfg.debug
        self.method.begin_stage(stage)
        if stage.steps == 0:  # a stage of pure computation (e.g. writing pseudo masks)
            self._compute_stage(stage)
            return
        next_batch = self._start_stage(stage)
        base_lr = t.scaled_lr()
        window: dict[str, list[float]] = {}  # logs since the last printed line
        tic, tic_step = time.perf_counter(), self.progress.step

        while self.progress.step < stage.steps:
            step = self.progress.step
            # a sweep's scheduler may stop the trial between two reports
            if self.should_stop is not None and self.should_stop():
                raise Stopped
            if debug.fail_at_step == step + 1 and debug.fail_stage == stage.name:
                self._inject_failure(step + 1)

            # the learning rate of this step (poly decay), scaled per parameter group
            lr = poly_lr(base_lr, step, stage.steps, t.poly_power)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]

            # the batch, and how long the step waited for it
            waited = time.perf_counter()
            batch = next_batch()
            self.timing.data_wait.append(time.perf_counter() - waited)

            # forward, backward and the optimizer step; then the method's own update (EMA)
            logs = self._train_step(batch, step, nan_loss=last and debug.nan_at_step == step + 1)
            self.method.after_step(step)
            self.progress.step = step = step + 1
            self.timing.step_end.append(time.perf_counter())

            # every log_every steps: the window's mean logs, tracked and printed
            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            if step % t.log_every == 0 or step == stage.steps:
                rate = (step - tic_step) / max(time.perf_counter() - tic, 1e-9)
                self._log_window(stage, step, window, lr, rate)
                window = {}

            # every eval_every steps and at the end: evaluate (or not) and checkpoint
            if step % t.eval_every == 0 or step == stage.steps:
                if stage.evaluate:
                    self._evaluate(stage, step)
                else:  # still checkpoint: a crash costs at most eval_every steps
                    self._checkpoint_and_report(stage, {})

    def _start_stage(self, stage: Stage) -> Callable[[], dict[str, Tensor]]:
        """The stage's optimizer (a resumed one's state loaded), its batch streams from the
        current step, the resumed RNG state, the panel before training; its next-batch function."""
        self.optimizer = self._optimizer()
        if self._pending_optimizer is not None:
            self.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None
        next_batch = self._streams(stage, self.progress.step)
        if self._pending_rng is not None:  # after the loaders exist: restore the exact random stream
            set_rng_state(self._pending_rng, self.numerics.device)
            self._pending_rng = None
        if not self.progress.step and stage.name == self.stages[-1].name:
            self._log_start_panel()
        self.method.train()
        return next_batch

    def _train_step(self, batch: dict[str, Tensor], step: int, nan_loss: bool = False) -> dict[str, float]:
        """One optimizer step on ``batch``; its logs, averaged over the micro-batches.

        The batch runs in ``train.accumulate`` micro-batches: each one's loss is divided by
        their count and back-propagated before the next runs, so the summed gradient is that
        of the whole batch (exactly, where batch norm is frozen) and only one micro-batch's
        activations are held at a time. ``nan_loss``: fault injection (``debug.nan_at_step``).
        """
        t, optimizer = self.cfg.train, self.optimizer
        assert optimizer is not None
        optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(batch, t.accumulate)
        logs: dict[str, float] = {}
        for part in parts:
            with self.numerics.autocast():
                loss, part_logs = self.method.training_step(part, step)
            if nan_loss:
                loss = loss * float("nan")
                part_logs["loss"] = float("nan")
            bad = next(
                (k for k, v in part_logs.items() if k.startswith("loss") and not math.isfinite(v)), None
            )
            if bad is not None:
                raise Diverged(step + 1, bad, part_logs[bad])
            self.scaler.scale(loss / len(parts)).backward()
            for k, v in part_logs.items():
                logs[k] = logs.get(k, 0.0) + v / len(parts)
        if t.grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), t.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        return logs

    def _log_window(
        self, stage: Stage, step: int, window: dict[str, list[float]], lr: float, rate: float
    ) -> None:
        """Track the means of the logs since the last line, and print one line."""
        prefix = self._prefix(stage)
        means = {f"{prefix}train/{k}": sum(v) / len(v) for k, v in window.items()}
        means[f"{prefix}lr"] = lr
        self.tracker.log_metrics(means, step)
        self.echo(
            f"  {prefix}step {step}/{stage.steps}  loss {means[f'{prefix}train/loss']:.4f}"
            f"  lr {lr:.2e}  {rate:.1f} it/s"
        )

    def _compute_stage(self, stage: Stage) -> None:
        """A stage without optimizer steps: the method's ``run_stage`` once, its floats
        tracked as metrics and its arrays as images, then a checkpoint."""
        if self.progress.step:  # done before a resume
            return
        prefix = self._prefix(stage)
        # No optimizer of its own: the previous stage's would be saved with this stage's
        # checkpoint and loaded into the next stage's (other parameters) on resume.
        self.optimizer = None
        out = self.method.run_stage(stage, self.data)
        self.progress.step = 1
        metrics = {f"{prefix}{k}": float(v) for k, v in out.items() if not isinstance(v, np.ndarray)}
        for key, image in out.items():
            if isinstance(image, np.ndarray):
                self.tracker.log_image(image, f"{prefix}{key}", 0)
        self.tracker.log_metrics(metrics, 0)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.echo(f"  stage {stage.name}: {shown}")
        self._checkpoint_and_report(stage, metrics)

    def _optimizer(self) -> torch.optim.Optimizer:
        """Encoder at the scaled lr, everything else (decoder, method heads) at lr x mult."""
        t = self.cfg.train
        encoder = {id(p) for module in self.method.encoders() for p in module.parameters()}
        params = [p for p in self.method.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) in encoder], "lr_mult": 1.0},
            {"params": [p for p in params if id(p) not in encoder], "lr_mult": t.decoder_lr_mult},
        ]
        groups = [g for g in groups if g["params"]]
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.scaled_lr(), momentum=t.momentum, weight_decay=t.weight_decay)
        return torch.optim.AdamW(groups, lr=t.scaled_lr(), weight_decay=t.weight_decay)

    def _streams(self, stage: Stage, start: int) -> Callable[[], dict[str, Tensor]]:
        """A function returning the next batch of this stage (labeled and/or unlabeled)."""
        t, d = self.cfg.train, self.data
        workers = self.numerics.workers
        accelerator = self.numerics.device.type == "cuda"
        ub = t.unlabeled_batch_size or t.batch_size
        seed = hash_seed(self.cfg.seed, self.progress.stage)
        iters: list[Iterator[dict[str, Tensor]]] = []
        if stage.batch in ("labeled", "tags", "semi"):
            labeled = d.labeled(self.method.training_masks())
            iters.append(
                stream_loader(labeled, t.batch_size, hash_seed(seed, 1), start, workers, accelerator)
            )
        if stage.batch == "semi":
            iters.append(stream_loader(d.unlabeled(), ub, hash_seed(seed, 2), start, workers, accelerator))
        if stage.batch == "all":
            iters.append(stream_loader(d.all_images(), ub, hash_seed(seed, 3), start, workers, accelerator))

        def next_batch() -> dict[str, Tensor]:
            batch: dict[str, Tensor] = {}
            for it in iters:
                batch.update(next(it))
            if stage.batch == "tags":  # weak supervision: image-level tags only, never masks
                del batch["mask_l"]
            if not self.method.uses_strong_view:  # its parameters only; the view is never made
                batch.pop("strong_u", None)
            return to_device(batch, self.numerics)

        return next_batch

    def _inject_failure(self, step: int) -> None:
        """Fault injection for retry tests: fail once per run folder, not again on the retry."""
        marker = self.run_dir / ".fault_injected"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise InjectedFailure(
            f"debug.fail_at_step: injected failure at step {step}; continue the run with "
            f"segsweep run --resume {self.run_dir}"
        )

    # -- evaluation --------------------------------------------------------------------------
    def _log_start_panel(self) -> None:
        """The pseudo masks before the main stage's first step, at step 0: the MLflow image
        grid's slider starts at the first logged step, and now shows where training began."""
        if (
            self.diag_loader is None
            or not self.method.uses_unlabeled
            or isinstance(self.tracker, NullTracker)
        ):
            return
        # The pass draws from the global generators (its loader): a tracked run must train
        # exactly as an untracked one, so they are put back as they were.
        state = rng_state(self.numerics.device)
        try:
            quality, held = pseudo_mask_quality(
                self.method, self.diag_loader, self.numerics, hold=self.panel_samples
            )
        finally:
            set_rng_state(state, self.numerics.device)
        self.tracker.log_metrics(quality, 0)
        if held:
            self.tracker.log_image(
                lambda: sample_panel(self.method, held, self.numerics), "panels/pseudo_masks", 0
            )

    def _evaluate(self, stage: Stage, step: int) -> None:
        """Score every eval model on val (reported) and tune (held out), log, checkpoint, report."""
        e, prefix = self.cfg.eval, self._prefix(stage)
        metrics = score_models(
            self.method,
            self.val_loader,
            self.tune_loader,
            self.data.source.class_names,
            self.numerics,
            e.mode,
            e.window,
            e.stride,
            prefix,
        )
        held: dict[str, Tensor] = {}  # a sample panel's images, pseudo labels and confidences
        if self.diag_loader is not None and self.method.uses_unlabeled and not prefix:
            quality, held = pseudo_mask_quality(
                self.method, self.diag_loader, self.numerics, hold=self.panel_samples
            )
            metrics.update(quality)
        # best/last bookkeeping concerns the reported (main) stage
        if not prefix and self.progress.record(metrics):
            self.save_checkpoint("best.pt")
        self.tracker.log_metrics(metrics, step)
        if held:  # rendered only by a tracker that keeps it
            self.tracker.log_image(
                lambda: sample_panel(self.method, held, self.numerics), "panels/pseudo_masks", step
            )
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("mIoU"))
        self.echo(f"  eval @ {prefix}step {step}: {shown}")
        self._checkpoint_and_report(stage, {**metrics, "step": step} if not prefix else metrics)

    def _checkpoint_and_report(self, stage: Stage, metrics: dict[str, float]) -> None:
        self.save_checkpoint("last.pt")
        if self.reporter is None:
            self.tracker.check()  # a failing store stops a plain run early, without waiting on it
            return
        # Everything logged so far reaches the store before the sweep may stop this trial.
        self.tracker.flush()
        report = {k: v for k, v in metrics.items() if "/iou/" not in k}
        report.update(stage=stage.name, stage_step=self.progress.step, mlflow_run_id=self.tracker.run_id)
        # The run's last report waits until its MLflow run is closed (``runner.execute``):
        # a scheduler may stop a trial at any report, and nothing after it would run.
        last = stage is self.stages[-1] and self.progress.step == stage.steps
        if not last:
            self.reporter(report, self.checkpoint_dir)
