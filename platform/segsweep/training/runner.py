"""One training run from a validated config to a closed MLflow run.

Used by ``segsweep run`` and by every sweep trial. The order matters: everything that can
fail on bad input (config, dataset root, split lists, first images, model) is checked before
the MLflow run is created, and once it exists every way out ends it: FINISHED, FAILED (with
the error as a tag and ``segsweep.status``) or KILLED. No run is ever left RUNNING.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segsweep.config import RunConfig, dump_yaml
from segsweep.data import Data, build_data
from segsweep.data.check import require_files, require_valid
from segsweep.errors import ConfigError, Diverged, Stopped, UserError, one_line
from segsweep.methods import Stage
from segsweep.sweep.spec import ratio_text
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.protocol import NullTracker, Tracker
from segsweep.tracking.retries import TrackingError
from segsweep.tracking.tags import STATUS_INTERRUPTED, TAG_ERROR, TAG_SPLIT_FAMILY, TAG_STATUS
from segsweep.training.budget import resolved
from segsweep.training.devices import Numerics
from segsweep.training.loop import Reporter, RunResult, Trainer


@dataclass
class Prepared:
    cfg: RunConfig
    data: Data
    trainer: Trainer


def prepare(cfg: RunConfig, echo: Callable[[str], None] | None = None, data: Data | None = None) -> Prepared:
    """Load data and build the model: raises UserError for any bad input, creates nothing.
    ``data``: ``cfg.data`` already built and its files checked (``DataCache.checked``)."""
    if data is None:
        data = build_data(cfg.data)
        # Every file the dataset or its split lists name must exist (cheap: one stat each);
        # ``data.verify`` decodes them all too (``segsweep check-data`` does the same).
        require_files(data)
        if cfg.data.verify:
            require_valid(data)
    # ``train.epochs`` becomes ``train.steps`` now that the split is known (budget.py).
    cfg = resolved(cfg, len(data.split.labeled), len(data.split.unlabeled))
    # Read one labeled image and one validation image now: a wrong root or an unreadable
    # file is reported before any run exists, not after minutes of set-up.
    if data.split.labeled:
        data.source.read_pair(data.split.labeled[0])
    if data.source.val:
        data.source.read_pair(data.source.val[0])
    trainer = Trainer(cfg, data, echo=echo)
    require_images_for(cfg, data, trainer.stages)
    return Prepared(cfg, data, trainer)


def require_images_for(cfg: RunConfig, data: Data, stages: list[Stage]) -> None:
    """Every stage has images to train on and the run has images to evaluate on: an empty set
    would fail mid-run (a sampler over nothing), or score nothing and call it finished."""
    field = "data.split" if cfg.data.split is not None else "data.label_ratio"
    batches = {s.batch for s in stages if s.steps > 0}
    if batches & {"labeled", "tags", "semi"} and not data.split.labeled:
        raise ConfigError(f"{field}: no labeled images in the split, and {cfg.method} trains on them")
    if "semi" in batches and not data.split.unlabeled:
        raise ConfigError(
            f"{field}: no unlabeled images left ({len(data.split.labeled)} labeled), and {cfg.method} "
            "trains on unlabeled images; lower the ratio, or use supervised for the fully labeled point"
        )
    if not data.source.val:
        raise ConfigError(f"data: the {cfg.data.name} dataset has no validation images to evaluate on")


def label_ratio_of(cfg: RunConfig, data: Data) -> float:
    """The ratio curves place a run at. A published split list or ``data.num_labeled``
    overrides ``data.label_ratio``: then it is what the split holds (of the images left after
    the tuning hold-out for a generated split, as ``label_ratio`` is; of all for a list)."""
    s = data.split
    if cfg.data.split is not None:
        return len(s.labeled) / max(1, len(s.labeled) + len(s.unlabeled) + len(s.tune))
    if cfg.data.num_labeled is not None:
        return len(s.labeled) / max(1, len(s.labeled) + len(s.unlabeled))
    return cfg.data.label_ratio


def run_params(cfg: RunConfig, data: Data) -> dict[str, object]:
    """What a run is, as MLflow params: the flat config plus the names the UI groups by. One
    name each for method, label ratio and seed: ``label_ratio`` (what the split holds) stands
    for ``data.label_ratio`` (as configured; config.yaml keeps it), never both side by side."""
    flat = {k: v for k, v in cfg.flat().items() if k != "data.label_ratio"}
    return {
        **flat,
        "dataset": cfg.data.name,
        "label_ratio": label_ratio_of(cfg, data),
        "n_labeled": len(data.split.labeled),
        "n_unlabeled": len(data.split.unlabeled),
        "n_tune": len(data.split.tune),
        "lr_scaled": cfg.train.scaled_lr(),
    }


def resolved_params(numerics: Numerics) -> dict[str, object]:
    """What ``auto`` and unset settings became on this machine (``train.device: auto`` is a
    GPU run with bf16 and loader workers on one machine, a CPU run on another)."""
    return {
        "resolved.device": str(numerics.device),
        "resolved.amp": str(numerics.amp_dtype).removeprefix("torch.") if numerics.amp_dtype else "off",
        "resolved.channels_last": numerics.channels_last,
        "resolved.num_workers": numerics.workers,
    }


def run_tags(cfg: RunConfig, data: Data) -> dict[str, str]:
    """Tags that decide whether two runs are comparable: same split family, same evaluation."""
    from segsweep.reports.curve import method_colour

    return {
        "mlflow.runColor": method_colour(cfg.method),  # one colour per method in the UI's charts
        "segsweep.method": cfg.method,
        "segsweep.dataset": cfg.data.name,
        TAG_SPLIT_FAMILY: data.split.family,
        "segsweep.eval_mode": cfg.eval.mode,
    }


def make_tracker(
    cfg: RunConfig,
    data: Data,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Tracker:
    t = cfg.tracking
    if not t.enabled:
        return NullTracker()
    name = t.run_name or f"{cfg.method} {ratio_text(label_ratio_of(cfg, data))} s{cfg.seed}"
    return RunTracker(
        t.uri,
        t.experiment,
        run_name=name,
        tags={**run_tags(cfg, data), **(extra_tags or {})},
        parent_run_id=parent_run_id,
        run_key=run_key,
        steps_once=True,
    )


def execute(
    prepared: Prepared,
    tracker: Tracker,
    run_dir: Path,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunResult:
    """Train and close the run, whatever happens. Diverged runs end FAILED, tagged
    ``segsweep.status=diverged``, and return normally (a retry would diverge again)."""
    cfg, data, trainer = prepared.cfg, prepared.data, prepared.trainer
    params = {**run_params(cfg, data), **resolved_params(trainer.numerics)}
    try:
        if not tracker.resumed:
            tracker.log_params(params)
        else:  # settings changed on resume are tagged (a param keeps its first value)
            tracker.log_resumed_params(params)
        # Again on a resume: an attempt lost before it was written (its node gone) leaves none.
        tracker.log_text(dump_yaml(cfg), "config.yaml")
        result = trainer.run(run_dir, tracker, reporter, resume_from, should_stop)
        tracker.log_metrics(
            {**result.metrics, "time/run_seconds": trainer.elapsed_seconds()}, cfg.train.steps
        )
        if cfg.tracking.log_checkpoints:
            for path in sorted(trainer.checkpoint_dir.glob("*.pt")):  # best, last, finished stages
                tracker.log_artifact(path, "checkpoints")
        tracker.finish("FINISHED", "finished")
    except Diverged as exc:
        tracker.set_tags({TAG_ERROR: str(exc)})
        tracker.finish("FAILED", "diverged")
        if reporter is not None:
            reporter(
                {"final": True, "diverged": True, "mlflow_run_id": tracker.run_id}, trainer.checkpoint_dir
            )
        return RunResult("diverged", {}, run_dir, str(exc))
    except Stopped:  # a sweep's scheduler asked this trial to stop: a normal end
        tracker.finish("FINISHED", "stopped_early", unless_marked=STATUS_INTERRUPTED)
        return RunResult("stopped", {}, run_dir, "stopped early by the scheduler")
    except SystemExit:
        # Ray ends a stopped trial's thread with SystemExit at its next report. It must
        # propagate once the run is closed: returning normally makes Ray's wrapper report once
        # more and wait for an answer that never comes, so the thread never ends and the
        # worker can serve no other trial.
        tracker.finish("FINISHED", "stopped_early", unless_marked=STATUS_INTERRUPTED)
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED", "killed")
        raise
    except TrackingError as exc:
        # The store failed (unreachable, unwritable, full): the work is not lost with it.
        last = trainer.checkpoint_dir / "last.pt"
        kept = f"; the last checkpoint stays on local disk at {last}" if last.exists() else ""
        try:
            tracker.finish("FAILED", "failed")
        except UserError:
            pass
        raise TrackingError(f"{one_line(exc)}{kept}") from None
    except BaseException as exc:
        message = one_line(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        tracker.set_tags({TAG_ERROR: message[:5000]})
        try:
            tracker.finish("FAILED", "failed")
        except UserError:
            pass  # the store itself is failing; the original error is the one to report
        raise
    # Reported last, once the run is closed: the sweep may stop the trial at this report.
    if reporter is not None:
        reporter(trainer.final_report, trainer.checkpoint_dir)
    return result


__all__ = ["TAG_STATUS", "Prepared", "execute", "make_tracker", "prepare", "run_params", "run_tags"]
