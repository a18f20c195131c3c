"""The sweep's driver: ``run_sweep`` runs (or resumes) a plan in ``sweeps/<name>/``.

The sweep folder holds the spec as run, ``sweep.json`` (``state.py``), the Optuna storage by
default, Ray's experiment state (``ray/``) and each trial's run folder (``trials/``). The
search runs first (every cell's trials side by side, ``ray_tune.py``), then, where the spec
asks, each cell's best configuration again over the final seeds; the sweep's parent MLflow
run gets the summary (``summary.py``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segsweep.data import DataCache
from segsweep.errors import ConfigError, redact
from segsweep.files import new_folder, only_writer, require_writable_file, write_atomic
from segsweep.sweep import ray_tune
from segsweep.sweep.head_watch import watch_head
from segsweep.sweep.interrupt import INTERRUPT, SweepInterrupted, signals_caught
from segsweep.sweep.live import LiveView
from segsweep.sweep.reconcile import close_orphans, mark_interrupted
from segsweep.sweep.spec import Plan, run_config_of
from segsweep.sweep.state import resumable_state, write_state
from segsweep.sweep.studies import CellSearch
from segsweep.sweep.summary import best_per_cell, summarise
from segsweep.sweep.trial import Outcome, SweepContext, TrialOrder
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.store import existing_store
from segsweep.tracking.tags import TAG_KIND
from segsweep.tracking.uris import resolve_uri
from segsweep.training.budget import planned_steps


@dataclass
class SweepResult:
    outcomes: dict[str, Outcome]
    best: dict[str, Outcome]
    parent_run_id: str
    sweep_dir: Path
    tracking_uri: str
    experiment_id: str
    optuna_storage: str
    #: Wall-clock seconds: "ray_init", "search" (the Tuner's fit), "final".
    seconds: dict[str, float] = field(default_factory=dict)


def run_sweep(
    plan: Plan,
    sweep_root: Path,
    resume: bool = False,
    ray_address: str | None = None,
    echo: Callable[[str], None] = print,
    continue_with: str = "segsweep sweep SPEC --resume",
) -> SweepResult:
    """Run (or ``resume``) the sweep of ``plan`` in ``sweep_root/<name>``: one driver at a time.
    On a cluster whose head is lost, the driver ends in one line naming ``continue_with``."""
    with only_writer(sweep_root / plan.spec.name, "sweep folder"):
        return _run_sweep(plan, sweep_root, resume, ray_address, echo, continue_with)


@dataclass
class _Sweep:
    """One driver's sweep while it runs: the plan, where it writes, its parent run."""

    plan: Plan
    sweep_dir: Path
    ctx: SweepContext
    parent: RunTracker
    storage_url: str
    resume: bool
    echo: Callable[[str], None]
    concurrency: int = 1
    #: The datasets and splits the checks before starting read, for ASHA's horizons.
    data: DataCache = field(default_factory=DataCache)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ray_storage(self) -> str:
        return str(self.sweep_dir / "ray")


def _run_sweep(
    plan: Plan,
    sweep_root: Path,
    resume: bool,
    ray_address: str | None,
    echo: Callable[[str], None],
    continue_with: str,
) -> SweepResult:
    spec = plan.spec
    sweep_dir = (sweep_root / spec.name).resolve()
    # A resume goes on with the sweep's instance; a new sweep gets its own, which keys its runs
    # and names its Optuna studies: a sweep started anew under an old name reuses neither.
    state = resumable_state(plan, sweep_root, resume)
    instance = state["instance"] if state else uuid.uuid4().hex[:8]
    key_prefix = f"{spec.name}@{instance}"

    address = ray_address or spec.ray.address
    data = DataCache()
    storage_url = _check_before_starting(plan, sweep_dir, address, bool(ray_address), data)
    uri = resolve_uri(plan.tracking_uri)
    clock = time.perf_counter()
    ray_tune.ray_init(address, plan)
    seconds = {"ray_init": time.perf_counter() - clock}
    parent = _start_parent_run(plan, sweep_dir, uri, key_prefix, storage_url)
    write_state(sweep_dir / "sweep.json", plan, instance, key_prefix, parent.run_id, uri)

    cells = {c.id: c for c in plan.cells}
    ctx = SweepContext(
        spec.name,
        plan.experiment,
        uri,
        parent.run_id,
        cells,
        spec.resources.cpus_per_trial,
        str(sweep_dir),
        key_prefix,
    )
    sweep = _Sweep(plan, sweep_dir, ctx, parent, storage_url, resume, echo, data=data, seconds=seconds)
    _prepare_ray_storage(sweep)
    search = CellSearch(
        plan.cells, {c.id: plan.samples(c) for c in plan.cells}, storage_url, key_prefix, spec.early_stop.mode
    )
    # On a cluster, a lost head ends the driver in one line (head_watch.py).
    watch = watch_head(address, continue_with) if address else None
    try:
        with signals_caught():  # Ctrl+C and SIGTERM stop the sweep gracefully
            _search(sweep, search)
            if spec.final:
                _final(sweep)
    except KeyboardInterrupt:
        parent.finish("KILLED", "killed")
        raise SweepInterrupted(spec.name) from None
    finally:
        if watch is not None:
            watch.set()

    close_orphans(parent, sweep.outcomes, echo)
    best = best_per_cell(sweep.outcomes, spec.early_stop.mode)
    summarise(parent, plan, sweep.outcomes, best, echo, search.importances())
    parent.finish("FINISHED", "finished")
    return SweepResult(
        sweep.outcomes, best, parent.run_id, sweep_dir, uri, parent.experiment_id, storage_url, seconds
    )


def _check_before_starting(
    plan: Plan, sweep_dir: Path, address: str | None, named_by_flag: bool, data: DataCache
) -> str:
    """Where the sweep writes, its stores, the Ray head and every trial's dataset and model,
    checked before Ray starts; the Optuna storage it uses."""
    from segsweep.sweep.dry_run import check_trials

    require_writable_file(sweep_dir / "spec.yaml", "--dir")
    existing_store(plan.tracking_uri, must_exist=False, what=plan.tracking_origin)
    ray_tune.await_ray_head(address, named="--ray-address" if named_by_flag else "ray.address")
    check_trials(plan, on_cluster=bool(address), data=data)
    own_storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    storage_url = plan.spec.optuna_storage or os.environ.get("SEGSWEEP_OPTUNA_STORAGE") or own_storage
    if storage_url != own_storage:  # a database of its own: reachable before anything starts
        from segsweep.sweep.studies import check_storage

        try:
            check_storage(storage_url)
        except ConnectionError as exc:
            raise ConfigError(f"optuna_storage: cannot reach {redact(storage_url)}: {exc}") from None
    return storage_url


def _start_parent_run(plan: Plan, sweep_dir: Path, uri: str, key_prefix: str, storage_url: str) -> RunTracker:
    """The sweep's parent MLflow run (the same one on a resume), with the spec as run."""
    spec = plan.spec
    with new_folder(sweep_dir, "--dir"):  # a sweep that never started leaves no folder
        parent = RunTracker(
            uri,
            plan.experiment,
            run_name=spec.name,
            run_key=f"sweep:{key_prefix}",
            tags={
                TAG_KIND: "sweep",
                "segsweep.sweep": spec.name,
                "segsweep.optuna_storage": redact(storage_url),
            },
        )
    # The spec as run, a password in any URI hidden (optuna_storage: postgresql://user:pw@...):
    # the copy beside the sweep and the one logged, which every user of the store may read.
    spec_text = redact(plan.spec_text)
    write_atomic(sweep_dir / "spec.yaml", spec_text)
    if not parent.resumed:
        parent.log_params(
            {
                "cells": len(plan.cells),
                "num_samples": spec.num_samples,
                "total_trials": plan.total_trials,
                "early_stop.metric": spec.early_stop.metric,
                "final.seeds": spec.final.seeds if spec.final else "none",
            }
        )
        parent.log_text(spec_text, "sweep.yaml")
    return parent


def _prepare_ray_storage(sweep: _Sweep) -> None:
    """Ray's folder and settings; the header line."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # resume loses at most ~2 s of scheduling
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our live view instead of Ray's tables
    # A failed trial is one line of ours (its traceback stays in Ray's trial folder, error.txt).
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Reports of pipeline stages before the main one carry no tuning metric yet.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray pickles the searcher, the schedulers and the trials' configs in here (tuner.pkl,
    # its experiment state): a store's password in a URI among them. The user's alone.
    os.makedirs(sweep.ray_storage, mode=0o700, exist_ok=True)
    sweep.concurrency = ray_tune.concurrency(sweep.plan)
    # Ray lets a custom searcher keep one trial pending; cells should start side by side.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(sweep.concurrency))
    plan, spec = sweep.plan, sweep.plan.spec
    finals = f", then {len(plan.cells) * len(spec.final.seeds)} final runs" if spec.final else ""
    sweep.echo(
        f"sweep {spec.name}: {len(plan.cells)} cells, {plan.total_trials} search trials{finals}; "
        f"up to {sweep.concurrency} at once; MLflow experiment '{plan.experiment}' at {redact(sweep.parent.uri)}"
    )


def _search(sweep: _Sweep, search: CellSearch) -> None:
    """The search phase: every cell's trials, stopped early by per-cell ASHA."""
    plan, es = sweep.plan, sweep.plan.spec.early_stop
    scheduler = ray_tune.CellScheduler(
        {c.id: planned_steps(run_config_of(c, {}), sweep.data) for c in plan.cells},
        es.metric,
        es.mode,
        es.grace_period,
        es.reduction_factor,
        es.enabled,
    )
    callback = _callback(sweep, "search", plan.total_trials)
    tuner = ray_tune.make_tuner(
        "search",
        plan,
        sweep.ctx,
        sweep.ray_storage,
        callback,
        sweep.resume,
        search=search,
        scheduler=scheduler,
    )
    clock = time.perf_counter()
    _fit(sweep, tuner, callback)
    sweep.seconds["search"] = time.perf_counter() - clock


def _final(sweep: _Sweep) -> None:
    """The final phase: each cell's best search configuration again over the final seeds."""
    spec = sweep.plan.spec
    assert spec.final is not None
    best = best_per_cell(sweep.outcomes, spec.early_stop.mode)
    finals = []
    for cell in sweep.plan.cells:
        if cell.id not in best:
            sweep.echo(f"  no finished trial in cell {cell.id}: it has no final runs")
            continue
        for seed in spec.final.seeds:
            finals.append(
                TrialOrder(cell.id, "final", best[cell.id].params, sample=best[cell.id].sample, seed=seed)
            )
    if not finals:
        return
    sweep.echo(f"final: best configuration of each cell over seeds {spec.final.seeds}")
    callback = _callback(sweep, "final", len(finals))
    tuner = ray_tune.make_tuner(
        "final", sweep.plan, sweep.ctx, sweep.ray_storage, callback, sweep.resume, finals=finals
    )
    _fit(sweep, tuner, callback)


def _callback(sweep: _Sweep, phase: str, total: int) -> ray_tune.SweepCallback:
    view = LiveView(phase, total, sweep.echo, sweep.outcomes)
    return ray_tune.SweepCallback(sweep.ctx, sweep.plan.spec.early_stop.metric, view)


def _fit(sweep: _Sweep, tuner: Any, callback: ray_tune.SweepCallback) -> None:
    """Run one phase's Tuner and count its outcomes. An interrupt ends the sweep: the runs
    of the trials it cut short end KILLED (``--resume`` runs them again), nothing is counted."""
    phase = ray_tune.run_phase(tuner, callback)
    if INTERRUPT.is_set():
        mark_interrupted(sweep.parent, phase.cut_short)
    sweep.outcomes.update(phase.outcomes)
    if not phase.complete:
        raise KeyboardInterrupt
