"""One trial: the typed order the driver hands it, and the body that trains it in a worker.

The driver (or the searcher) writes a ``TrialOrder`` (which cell, which phase, its sample or
seed, the searched values) into the trial's config as plain data; the worker reads it back,
checks it, and builds the run config from the cell's tree and those values, validating it
once. No scheduler is imported here: the body talks to the one that runs it through a
``TrialSession`` (Ray Tune's is in ``ray_tune.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from segsweep.sweep.spec import Cell, run_config_of, trial_run_name
from segsweep.tracking.retries import authenticated
from segsweep.tracking.store import finished_run
from segsweep.tracking.tags import TAG_CELL, TAG_PHASE

PHASES = ("search", "final")


def _optional_int(value: Any, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"trial order: {name} must be a whole number, not {value!r}")
    return value


@dataclass(frozen=True)
class TrialOrder:
    """What one trial runs: a cell of the grid, in the search or the final phase, with its
    searched values. A search trial is the cell's ``sample``-th (and, where the cell has a
    search space, Optuna's trial ``optuna_trial``); a final run re-runs the best search
    trial's values (``sample``) with its own ``seed``."""

    cell: str
    phase: str
    params: dict[str, Any] = field(default_factory=dict)
    sample: int | None = None
    seed: int | None = None
    optuna_trial: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cell, str) or not self.cell:
            raise ValueError(f"trial order: cell must be a cell id, not {self.cell!r}")
        if self.phase not in PHASES:
            raise ValueError(f"trial order: phase must be one of {', '.join(PHASES)}, not {self.phase!r}")
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise ValueError(f"trial order: params must map dotted keys to values, not {self.params!r}")
        for name in ("sample", "seed", "optuna_trial"):
            _optional_int(getattr(self, name), name)
        if self.phase == "final" and self.seed is None:
            raise ValueError("trial order: a final run needs its seed")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialOrder:
        """The order as ``as_dict`` wrote it (a ValueError for anything else)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"trial order: expected a mapping, not {type(data).__name__}")
        unknown = set(data) - {"cell", "phase", "params", "sample", "seed", "optuna_trial"}
        if unknown:
            raise ValueError(f"trial order: unknown keys {sorted(unknown)}")
        return cls(
            cell=data.get("cell"),  # type: ignore[arg-type]
            phase=data.get("phase"),  # type: ignore[arg-type]
            params=dict(data.get("params") or {}),
            sample=data.get("sample"),
            seed=data.get("seed"),
            optuna_trial=data.get("optuna_trial"),
        )

    @classmethod
    def from_ray_config(cls, config: Mapping[str, Any]) -> TrialOrder:
        """The order in a trial's config: the searcher's suggestion is the order itself; the
        final phase's grid search puts each order under ``trial``."""
        return cls.from_dict(config.get("trial", config))

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for the scheduler's config (pickled and written as JSON by Ray)."""
        return {
            "cell": self.cell,
            "phase": self.phase,
            "params": dict(self.params),
            "sample": self.sample,
            "seed": self.seed,
            "optuna_trial": self.optuna_trial,
        }

    @property
    def index(self) -> int | None:
        """What tells the trials of one cell apart: the sample in the search, the seed after."""
        return self.sample if self.phase == "search" else self.seed

    def key(self, prefix: str) -> str:
        """A stable identity for the trial's MLflow run: the same across retries and --resume.
        ``prefix``: ``<sweep>@<instance>``, so a sweep started anew never reuses old runs."""
        cell = self.cell.replace("/", "_")
        if self.phase == "final":
            return f"{prefix}/final/{cell}/seed{self.seed}"
        return f"{prefix}/search/{cell}/{self.sample}"


@dataclass
class SweepContext:
    """What every trial of a sweep needs (shipped once through the scheduler's object store)."""

    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    cells: dict[str, Cell]
    cpus_per_trial: float
    sweep_dir: str
    #: "<name>@<instance>": a sweep started anew under an old name never reuses old runs.
    key_prefix: str = ""


@dataclass
class Outcome:
    """How a trial ended, as the driver counts it."""

    cell: str
    phase: str
    status: str  # finished | stopped_early | failed | diverged
    metric: float | None
    val: float | None
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    sample: int | None = None
    seed: int | None = None

    @classmethod
    def of(
        cls, order: TrialOrder, status: str, result: Mapping[str, Any], metric: str, prefix: str
    ) -> Outcome:
        """From a trial's last reported result; ``val`` its last evaluation's val/mIoU."""
        value = result.get(metric)
        val = result.get("val/mIoU_last", result.get("val/mIoU"))
        return cls(
            order.cell,
            order.phase,
            status,
            float(value) if value is not None else None,
            float(val) if val is not None else None,
            float(result.get("time_total_s", 0.0)),
            dict(order.params),
            order.key(prefix),
            order.sample,
            order.seed,
        )


def ended_status(result: Mapping[str, Any]) -> str:
    """How a trial that the scheduler reports as ended did end, from its last result."""
    if result.get("diverged"):
        return "diverged"
    return "finished" if result.get("final") else "stopped_early"


def trial_device(device: str, gpu_ids: list[Any]) -> str:
    """The device a trial trains on. Ray shows a trial given no GPU (``gpus_per_trial: 0``)
    every GPU of its node: ``auto`` would put it on cuda:0, unseen by Ray's accounting, beside
    as many such trials as there are CPUs. Such a trial runs on the CPU; a device named in the
    config is kept."""
    return "cpu" if device == "auto" and not gpu_ids else device


class TrialSession(Protocol):
    """What a trial's body needs from the scheduler that runs it."""

    def gpu_ids(self) -> list[Any]:
        """The GPUs the scheduler gave this trial."""
        ...

    def tags(self) -> dict[str, str]:
        """The scheduler's names for this trial and its machine, as MLflow tags."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Hand an evaluation's metrics (and the checkpoint folder) to the scheduler."""
        ...

    def restore_checkpoint(self, into: Path) -> bool:
        """A retry: copy the last reported checkpoint's weights into ``into``; False if none."""
        ...

    def stop_requested(self) -> bool:
        """Whether the scheduler asked this trial to stop."""
        ...


def run_trial(order: TrialOrder, ctx: SweepContext, session: TrialSession) -> None:
    """One trial, inside a worker: build the run, resume from the last checkpoint, train."""
    import torch

    from segsweep.training.runner import execute, make_tracker, prepare

    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    cell = ctx.cells[order.cell]
    cfg = run_config_of(cell, order.params, order.seed)
    cfg.tracking.uri = ctx.tracking_uri  # never the trial folder's own store
    authenticated(ctx.tracking_uri)  # the driver's login worked there: a 401 now is a hiccup
    cfg.train.device = trial_device(cfg.train.device, session.gpu_ids())
    key = order.key(ctx.key_prefix)
    run_dir = Path(ctx.sweep_dir) / "trials" / key.split("/", 1)[1]
    done = finished_run(ctx.tracking_uri, ctx.experiment, key)
    if done is not None:  # finished before the driver died: report it, do not run it again
        run_id, metrics = done
        kept = {k: v for k, v in metrics.items() if "/iou/" not in k}
        session.report({**kept, "step": cfg.train.steps, "final": True, "mlflow_run_id": run_id})
        return
    prepared = prepare(cfg)
    cfg = prepared.cfg  # train.epochs resolved to steps
    cfg.tracking.run_name = trial_run_name(cell.values, order.phase, order.index)
    tags = trial_tags(order, ctx, session)
    tracker = make_tracker(cfg, prepared.data, run_key=key, parent_run_id=ctx.parent_run_id, extra_tags=tags)
    resumed = session.restore_checkpoint(run_dir / "checkpoints")  # a retry continues from there
    resume_from = run_dir / "checkpoints" / "last.pt" if resumed else None
    execute(
        prepared, tracker, run_dir, reporter_for(session), resume_from, should_stop=session.stop_requested
    )


def trial_tags(order: TrialOrder, ctx: SweepContext, session: TrialSession) -> dict[str, str]:
    """The MLflow tags that tie a trial's run to its sweep, cell, phase and scheduler."""
    tags = {"segsweep.sweep": ctx.name, TAG_CELL: order.cell, TAG_PHASE: order.phase, **session.tags()}
    if order.optuna_trial is not None:
        tags["optuna.trial_number"] = str(order.optuna_trial)
    if order.phase == "final":  # which search trial's configuration this seed re-runs
        tags["segsweep.best_of"] = f"{order.cell} #{order.sample}"
    return tags


def reporter_for(session: TrialSession) -> Callable[[dict[str, Any], Path], None]:
    """The training loop's reporter: scalar metrics, with the checkpoint once there is one."""

    def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        session.report(clean, checkpoint_dir if (checkpoint_dir / "last.pt").exists() else None)

    return report
