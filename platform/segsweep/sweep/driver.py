"""Ray Tune at the edge: the only module that imports Ray.

``run_sweep`` schedules every cell of a plan through one Ray Tune experiment, so cells run in
parallel, not one after another:

* ``CellSearcher`` hands out trials round-robin over the cells; each cell with a search
  space has its own Optuna study (``studies.CellStudy``). Trials stopped early are told to
  Optuna as PRUNED, not COMPLETE with a truncated value.
* ``CellScheduler`` keeps one ASHA instance per cell: a trial is only ever compared with the
  trials of its own cell (a 1/16 trial is never stopped because 1/2 trials score higher).
* ``trial_main`` trains one run (``runner.execute``), reporting to Ray at each evaluation
  with its checkpoint; a crashed trial is retried from that checkpoint.
* ``SweepCallback`` closes the MLflow runs of trials that the scheduler stopped (a stopped
  trial runs no code after its last report), counts outcomes and prints the live view.

The sweep folder (``sweeps/<name>/``) holds the spec, the Optuna storage, Ray's experiment
state and each trial's run folder; ``--resume`` restores Ray's experiments from it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segsweep.errors import ConfigError, Interrupted, UserError, one_line
from segsweep.files import new_folder, only_writer, require_writable_file, write_atomic
from segsweep.sweep.spec import Cell, Plan, load_spec, run_config_of, trial_run_name
from segsweep.tracking.mlflow_writer import (
    STATUS_INTERRUPTED,
    TAG_CELL,
    TAG_KEY,
    TAG_KIND,
    TAG_PARENT,
    TAG_PHASE,
    TAG_STATUS,
    TAG_STOPPED_AT,
    RunTracker,
    end_run,
    existing_store,
    finished_run,
    redact,
    resolve_uri,
    runs_tagged,
    tag_run,
    with_retries,
)
from segsweep.training.budget import planned_steps
from segsweep.waiting import poll

log = logging.getLogger(__name__)

PHASES = ("search", "final")


# ---------------------------------------------------------------------------------------------
# What every trial needs (shipped once through Ray's object store)


@dataclass
class SweepContext:
    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    cells: dict[str, Cell]
    cpus_per_trial: float
    sweep_dir: str
    #: "<name>@<instance>": a sweep started anew under an old name never reuses old runs.
    key_prefix: str = ""


def trial_key(ctx_name: str, config: dict[str, Any]) -> str:
    """A stable identity for a trial's MLflow run: the same across retries and --resume."""
    cell = config["cell"].replace("/", "_")
    if config["phase"] == "final":
        return f"{ctx_name}/final/{cell}/seed{config['seed']}"
    return f"{ctx_name}/search/{cell}/{config['sample']}"


def trial_device(device: str, gpu_ids: list[Any]) -> str:
    """The device a trial trains on. Ray shows a trial given no GPU (``gpus_per_trial: 0``)
    every GPU of its node: ``auto`` would put it on cuda:0, unseen by Ray's accounting, beside
    as many such trials as there are CPUs. Such a trial runs on the CPU; a device named in the
    config is kept."""
    return "cpu" if device == "auto" and not gpu_ids else device


def trial_main(config: dict[str, Any], ctx: SweepContext) -> None:
    """One trial, inside a Ray worker: build the run, resume from Ray's checkpoint, train."""
    import ray
    import torch
    from ray import tune

    from segsweep.training.runner import execute, make_tracker, prepare

    config = config.get("trial", config)
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    cell = ctx.cells[config["cell"]]
    cfg = run_config_of(cell, config["params"], config.get("seed"))
    cfg.tracking.uri = ctx.tracking_uri  # never the trial folder's own store
    cfg.train.device = trial_device(cfg.train.device, ray.get_gpu_ids())
    key = trial_key(ctx.key_prefix, config)
    run_dir = Path(ctx.sweep_dir) / "trials" / key.split("/", 1)[1]
    done = finished_run(ctx.tracking_uri, ctx.experiment, key)
    if done is not None:  # finished before the driver died: report it, do not run it again
        run_id, metrics = done
        tune.report(
            {
                **{k: v for k, v in metrics.items() if "/iou/" not in k},
                "step": cfg.train.steps,
                "final": True,
                "mlflow_run_id": run_id,
            }
        )
        return
    prepared = prepare(cfg)
    cfg = prepared.cfg  # train.epochs resolved to steps
    tags = {
        "segsweep.sweep": ctx.name,
        TAG_CELL: cell.id,
        TAG_PHASE: config["phase"],
        "ray.trial_id": tune.get_context().get_trial_id(),
        "ray.node_id": _node_id(),
    }
    if config.get("optuna_trial") is not None:
        tags["optuna.trial_number"] = str(config["optuna_trial"])
    if config["phase"] == "final":  # which search trial's configuration this seed re-runs
        tags["segsweep.best_of"] = f"{cell.id} #{config.get('sample')}"
    index = config.get("sample") if config["phase"] == "search" else config.get("seed")
    cfg.tracking.run_name = trial_run_name(cell.values, config["phase"], index)
    tracker = make_tracker(cfg, prepared.data, run_key=key, parent_run_id=ctx.parent_run_id, extra_tags=tags)

    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry: continue from the last reported checkpoint
        with checkpoint.as_directory() as folder:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            for src in Path(folder).glob("*.pt"):  # last, best and finished stages' weights
                shutil.copy2(src, run_dir / "checkpoints" / src.name)
        resume_from = run_dir / "checkpoints" / "last.pt"

    def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if (checkpoint_dir / "last.pt").exists():
            tune.report(clean, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
        else:
            tune.report(clean)

    execute(prepared, tracker, run_dir, report, resume_from, should_stop=_stop_requested)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _stop_requested() -> bool:
    """Whether Ray asked this trial to stop (its session's stop event; Ray 2.60 internals)."""
    from ray.train._internal.session import get_session

    session = get_session()
    return bool(session is not None and session.stop_event.is_set())


# ---------------------------------------------------------------------------------------------
# Search: Optuna per cell, trials handed out round-robin across cells


def _searcher_base() -> type:
    from ray.tune.search import Searcher

    return Searcher


class CellSearcher(_searcher_base()):  # type: ignore[misc]
    """Suggests trials for every cell in turn; each cell with a search space asks its own
    Optuna study. Its state (which trial is which cell's sample) is saved with Ray's
    experiment state, so a restored sweep neither repeats nor loses a sample."""

    def __init__(self, plan: Plan, storage: str, sweep_name: str, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.cells = [c for c in plan.cells]
        self.samples = {c.id: plan.samples(c) for c in plan.cells}
        self.storage, self.sweep_name = storage, sweep_name
        self.started: dict[str, int] = {c.id: 0 for c in self.cells}
        self.assigned: dict[str, tuple[str, int | None]] = {}  # ray trial id -> (cell, optuna no.)
        self._studies: dict[str, Any] | None = None

    # Optuna studies hold a database engine: never pickled, reopened on demand.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_studies"] = None
        return state

    @property
    def studies(self) -> dict[str, Any]:
        if self._studies is None:
            from segsweep.sweep.studies import CellStudy

            self._studies = {
                c.id: CellStudy(
                    self.storage,
                    study_name(self.sweep_name, c),
                    c.space,
                    self.mode or "max",
                    seed=_stable_seed(c.id),
                )
                for c in self.cells
                if c.space
            }
        return self._studies

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        waiting = [c for c in self.cells if self.started[c.id] < self.samples[c.id]]
        if not waiting:
            return self.FINISHED
        cell = min(waiting, key=lambda c: self.started[c.id])  # stable: ties keep grid order
        number, params = self.studies[cell.id].ask() if cell.space else (None, {})
        sample = self.started[cell.id]
        self.started[cell.id] += 1
        self.assigned[trial_id] = (cell.id, number)
        return {
            "cell": cell.id,
            "phase": "search",
            "sample": sample,
            "params": params,
            "optuna_trial": number,
        }

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        cell, number = self.assigned.get(trial_id, (None, None))
        if number is not None and self.metric in result and "step" in result:
            self.studies[cell].report(number, float(result[self.metric]), int(result["step"]))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        cell, number = self.assigned.get(trial_id, (None, None))
        if number is None:
            return
        study = self.studies[cell]
        if error or not result or result.get("diverged"):
            study.tell(number, "fail")
        elif result.get("final") and self.metric in result:
            study.tell(number, "complete", float(result[self.metric]))
        else:  # stopped early by ASHA: a truncated value is not a final one
            study.tell(number, "pruned")

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump({"started": self.started, "assigned": self.assigned}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self.started, self.assigned = state["started"], state["assigned"]
        known: dict[str, set[int]] = {}
        for cell, number in self.assigned.values():
            if number is not None:
                known.setdefault(cell, set()).add(number)
        for cell_id, study in self.studies.items():
            study.fail_orphans(known.get(cell_id, set()))


def _stable_seed(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 2**31


def study_name(sweep: str, cell: Cell) -> str:
    """``sweep``: ``<name>@<instance>`` (a sweep started before studies were named by
    instance: ``<name>``, as recorded in its ``sweep.json``)."""
    return f"{sweep}:{cell.id}"


# ---------------------------------------------------------------------------------------------
# Early stopping: one ASHA per cell


def _fifo_base() -> type:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class CellScheduler(_fifo_base()):  # type: ignore[misc]
    """ASHA (asynchronous successive halving) with one bracket set per cell."""

    def __init__(
        self,
        max_steps: dict[str, int],
        metric: str,
        mode: str,
        grace: int,
        factor: float,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.max_steps, self.target, self.direction = max_steps, metric, mode
        self.grace, self.factor, self.enabled = grace, factor, enabled
        self._asha: dict[str, Any] = {}
        self.stopped: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _for(self, controller: Any, trial: Any) -> Any:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        cell = trial.config.get("cell") or trial.config.get("trial", {}).get("cell")
        if cell not in self._asha:
            max_t = self.max_steps.get(cell, 10**9)
            self._asha[cell] = AsyncHyperBandScheduler(
                time_attr="step",
                metric=self.target,
                mode=self.direction,
                max_t=max_t,
                grace_period=min(self.grace, max_t),
                reduction_factor=self.factor,
                brackets=1,
                stop_last_trials=False,
            )
        asha = self._asha[cell]
        if trial.trial_id not in asha._trial_info:  # e.g. after a restore
            asha.on_trial_add(controller, trial)
        return asha

    def on_trial_add(self, controller: Any, trial: Any) -> None:
        self._for(controller, trial)

    def on_trial_result(self, controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if not self.enabled or result.get("final"):
            return self.CONTINUE
        decision = self._for(controller, trial).on_trial_result(controller, trial, result)
        if decision == self.STOP:
            self.stopped.add(trial.trial_id)
        return decision

    def on_trial_complete(self, controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if result and "step" in result and self.target in result:
            self._for(controller, trial).on_trial_complete(controller, trial, result)

    def on_trial_remove(self, controller: Any, trial: Any) -> None:
        self._for(controller, trial).on_trial_remove(controller, trial)

    def on_trial_error(self, controller: Any, trial: Any) -> None:
        self._for(controller, trial).on_trial_error(controller, trial)

    def debug_string(self) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# Driver side: closing runs, counting outcomes, the live view


@dataclass
class Outcome:
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


#: Retry budget of the live view's run closings: they run in Ray's event loop, which must not
#: stall for long (the end of the sweep closes whatever they could not, with the full budget).
CALLBACK_RETRY_S = 10.0


def _callback_base() -> type:
    from ray.tune import Callback

    return Callback


class SweepCallback(_callback_base()):  # type: ignore[misc]
    """Ends the MLflow runs Ray stopped, records outcomes, and prints a compact live view."""

    def __init__(
        self,
        ctx: SweepContext,
        metric: str,
        mode: str,
        phase: str,
        total: int,
        concurrency: int,
        echo: Callable[[str], None],
        outcomes: dict[str, Outcome],
    ) -> None:
        self.ctx, self.metric, self.mode, self.phase = ctx, metric, mode, phase
        self.total, self.concurrency, self.echo = total, concurrency, echo
        self.outcomes = outcomes
        self.started_at = time.time()
        self.best: dict[str, float] = {}
        self.last_view = time.time() - 20  # the first view comes ~10 s in
        self.ended_here = 0  # trials this driver saw end (the ETA's rate; not restored ones)
        self.ended_before: set[str] | None = None  # trials that had ended when it restored them
        self.completed: set[str] = set()  # trials this driver saw end, by themselves
        self.forwarded = False
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from segsweep.tracking.mlflow_writer import client_for

            self._client = client_for(self.ctx.tracking_uri)
        return self._client

    def _config(self, trial: Any) -> dict[str, Any]:
        return trial.config.get("trial", trial.config)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.ended_before is None:
            self.ended_before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if INTERRUPT.is_set() and not self.forwarded:
            # Ray's own stop path (SIGUSR1 handler, installed by every fit()): it saves the
            # experiment state with the running trials as RUNNING, so --resume re-runs them.
            self.forwarded = True
            handler = signal.getsignal(signal.SIGUSR1)
            if callable(handler):
                handler(signal.SIGUSR1, None)
        self._view(trials)  # on a clock, not only on results: some stages report nothing for long

    def interrupted_trials(self, trials: list) -> list:
        """Trials an interrupt cut short: neither ended before this driver restored them nor
        seen to end normally. Ray marks the running ones TERMINATED without telling callbacks;
        others failed as the signal reached their workers (Ctrl+C reaches the whole process
        group) and are waiting for a retry. ``--resume`` runs all of them again."""
        before = self.ended_before or set()
        return [t for t in trials if t.trial_id not in before and t.trial_id not in self.completed]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        cell = self._config(trial)["cell"]
        if result.get("val/mIoU") is not None:  # shown only; selection uses the tuning split
            self.best[cell] = max(self.best.get(cell, 0.0), float(result["val/mIoU"]))
        self._view(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        status = _ended_status(result)
        self.ended_here += 1
        self.completed.add(trial.trial_id)
        run_id = result.get("mlflow_run_id")
        if status == "stopped_early" and run_id:
            # The trial was killed after its last report: its run is closed here (and again,
            # if this fails, when the sweep ends: _close_orphans).
            try:
                step = {TAG_STOPPED_AT: str(result.get("step", ""))}
                _end_run(self.client, run_id, "FINISHED", "stopped_early", CALLBACK_RETRY_S, tags=step)
            except UserError as exc:  # a tracking hiccup must not stop the sweep
                self.echo(f"  warning: could not close run {run_id}: {exc}")
        self._record(trial, status, result)
        self._line(trial, status, result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended_here += 1
        if not INTERRUPT.is_set():  # failed for good on its own: not one an interrupt cut short
            self.completed.add(trial.trial_id)
        self._record(trial, "failed", trial.last_result or {})
        self._line(trial, "failed", trial.last_result or {})
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        if run_id:  # normally closed FAILED by the trial; a killed worker could not
            try:
                run = with_retries(lambda: self.client.get_run(run_id), "read run", CALLBACK_RETRY_S)
                if run.info.status == "RUNNING":
                    _end_run(self.client, run_id, "FAILED", "failed", CALLBACK_RETRY_S)
            except UserError as exc:  # _close_orphans closes it when the sweep ends
                self.echo(f"  warning: could not close run {run_id}: {exc}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cfg = self._config(trial)
        self.echo(
            f"  retry  {cfg['cell']} ({cfg['phase']}): {_error_line(trial)}; "
            f"resuming from its last checkpoint"
        )

    def _record(self, trial: Any, status: str, result: dict[str, Any]) -> None:
        cfg = self._config(trial)
        metric = result.get(self.metric)
        val = result.get("val/mIoU_last", result.get("val/mIoU"))
        self.outcomes[trial.trial_id] = Outcome(
            cfg["cell"],
            cfg["phase"],
            status,
            float(metric) if metric is not None else None,
            float(val) if val is not None else None,
            float(result.get("time_total_s", 0.0)),
            dict(cfg.get("params", {})),
            trial_key(self.ctx.key_prefix, cfg),
            cfg.get("sample"),
            cfg.get("seed"),
        )

    def _line(self, trial: Any, status: str, result: dict[str, Any]) -> None:
        cfg = self._config(trial)
        mark = {"finished": "done", "stopped_early": "stop", "failed": "FAIL", "diverged": "NaN!"}[status]
        what = f"{cfg['cell']}"
        what += f" #{cfg['sample']}" if cfg["phase"] == "search" else f" seed={cfg['seed']}"
        params = ", ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in cfg.get("params", {}).items()
        )
        score = f"{self.metric} {result[self.metric]:.4f}" if self.metric in result else ""
        if status == "stopped_early":
            score += f" at step {result.get('step', '?')}"
        if status == "failed":
            score = _error_line(trial)
        self.echo(f"  {mark:<4} {what}{' (' + params + ')' if params else ''}  {score}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not INTERRUPT.is_set():
            self._view(trials, force=True)  # the phase's closing counts, however short it was

    def _view(self, trials: list, force: bool = False) -> None:
        """Every 30 s: trial counts, elapsed and remaining time, best val/mIoU per cell."""
        now = time.time()
        if now - self.last_view < 30 and not force:
            return
        self.last_view = now
        for t in trials:  # trials that ended before a --resume count too
            if t.trial_id not in self.outcomes and t.status in ("TERMINATED", "ERROR"):
                result = t.last_result or {}
                self._record(t, "failed" if t.status == "ERROR" else _ended_status(result), result)
                # Its best over training, as for trials seen running (not its last value).
                seen = (getattr(t, "metric_analysis", None) or {}).get("val/mIoU", {})
                best = seen.get("max", result.get("val/mIoU"))
                if best is not None:
                    cell = self._config(t)["cell"]
                    self.best[cell] = max(self.best.get(cell, 0.0), float(best))
        running = sum(t.status == "RUNNING" for t in trials)
        done = [o for o in self.outcomes.values() if o.phase == self.phase]
        elapsed = now - self.started_at
        left = self.total - len(done)
        # Trials end at a roughly steady rate once the pipeline is full.
        rate = self.ended_here / elapsed
        eta = f", ~{_fmt_s(left / rate)} left" if rate > 0 and left > 0 else ""
        stopped = sum(o.status == "stopped_early" for o in done)
        failed = sum(o.status in ("failed", "diverged") for o in done)
        self.echo(
            f"[{_fmt_s(elapsed)}] {self.phase}: {running} running, {len(done) - stopped - failed} finished, "
            f"{stopped} stopped, {failed} failed of {self.total}{eta}"
        )
        if self.best:
            shown = "  ".join(f"{_short(c)} {v:.3f}" for c, v in self.best.items())
            self.echo(f"        best val/mIoU so far: {shown}")


def _ended_status(result: dict[str, Any]) -> str:
    """How a trial that Tune reports as ended did end, from its last reported result."""
    if result.get("diverged"):
        return "diverged"
    return "finished" if result.get("final") else "stopped_early"


def _error_line(trial: Any) -> str:
    try:
        text = trial.error_file and Path(trial.error_file).read_text()
    except OSError:
        text = ""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    last = redact(lines[-1] if lines else "error")  # shown on the terminal: no URI password
    return last.split("Error: ", 1)[-1][:200] if "Error: " in last else last[:200]


def _short(cell_id: str) -> str:
    """'method=fixmatch,ratio=0.0625,seed=0' -> 'fixmatch@0.0625/s0'."""
    parts = dict(p.split("=", 1) for p in cell_id.split(","))
    text = f"{parts.pop('method', '?')}@{parts.pop('ratio', '?')}"
    seed = parts.pop("seed", None)
    extra = ",".join(f"{k.split('.')[-1]}={v}" for k, v in parts.items())
    return text + (f"[{extra}]" if extra else "") + (f"/s{seed}" if seed is not None else "")


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


# ---------------------------------------------------------------------------------------------
# The driver


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


#: Seconds a reused Ray worker waits for the previous trial's thread to end (Ray's default: 2).
TRIAL_THREAD_TIMEOUT_S = 300


#: Seconds a sweep waits for a Ray head given by address to accept connections (a cluster
#: brought up beside the driver may still be starting) before it gives up in one line.
RAY_WAIT_S = 60.0


def await_ray_head(address: str | None, budget_s: float | None = None, named: str = "--ray-address") -> None:
    """For a ``HOST:PORT`` (or ``ray://HOST:PORT``) address: wait until something listens
    there, saying so once on stderr. Without this, ``ray.init`` retries an address nobody
    answers on for many minutes, printing multi-line logs. ``auto`` and other forms are
    left to Ray."""
    import socket

    budget_s = RAY_WAIT_S if budget_s is None else budget_s
    text = (address or "").removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return

    def listens() -> str | None:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        return None

    def note(reason: str, _: float, waits: int) -> None:
        if waits == 0:
            print(
                f"note: Ray head {address} does not answer ({reason}); waiting up to {budget_s:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    reason = poll(listens, budget_s, on_wait=note)
    if reason is not None:
        raise ConfigError(f"{named} {address}: nothing answers there within {budget_s:.0f}s ({reason})")


def _ray_init(address: str | None, plan: Plan) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": True,
        # A worker is reused for the next trial only once the last one's thread has ended; Ray
        # waits 2 s by default, and a stopped trial still closing its MLflow run takes longer
        # on a busy machine: the next trial then fails with "Could not re-use actor".
        "runtime_env": {"env_vars": {"TUNE_FUNCTION_THREAD_TIMEOUT_S": str(TRIAL_THREAD_TIMEOUT_S)}},
    }
    if address:
        # Trials on other machines need the tracking server's credentials: they travel in the
        # job's runtime environment (the cluster is token-authenticated), never as params.
        from segsweep.tracking.mlflow_writer import CREDENTIAL_VARS

        secrets = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
        kwargs["runtime_env"]["env_vars"].update(secrets)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--ray-address {address}: cannot join the Ray cluster ({exc})") from None
    else:
        import torch

        from segsweep.training.loop import usable_cpus

        cpus = usable_cpus()  # a job's or container's share, not the host's cores
        if plan.spec.resources.cpus_per_trial > cpus:  # said before Ray takes seconds to start
            raise ConfigError(
                f"resources.cpus_per_trial: {plan.spec.resources.cpus_per_trial:g} CPUs per trial, but "
                f"this process may use {cpus} (its CPU affinity and quota)"
            )
        ray.init(
            address="local",  # a fresh instance, never some cluster left running on this machine
            num_cpus=cpus,
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            **kwargs,
        )
    res = ray.cluster_resources()
    need_gpu = plan.spec.resources.gpus_per_trial
    if need_gpu > res.get("GPU", 0):
        ray.shutdown()
        raise ConfigError(
            f"resources.gpus_per_trial: {need_gpu:g} GPU per trial but the Ray cluster has "
            f"{res.get('GPU', 0):g}"
        )
    if plan.spec.resources.cpus_per_trial > res.get("CPU", 0):
        ray.shutdown()
        raise ConfigError(
            f"resources.cpus_per_trial: {plan.spec.resources.cpus_per_trial:g} CPUs per trial but the "
            f"Ray cluster has {res.get('CPU', 0):g}"
        )


def _concurrency(plan: Plan) -> int:
    import ray

    r = plan.spec.resources
    res = ray.cluster_resources()
    fits = int(res.get("CPU", 1) // r.cpus_per_trial)
    if r.gpus_per_trial:
        fits = min(fits, int(res.get("GPU", 0) / r.gpus_per_trial + 1e-9))
    return max(1, min(fits, r.max_concurrent or fits))


def _tuner(
    phase: str,
    plan: Plan,
    ctx: SweepContext,
    storage: str,
    callback: SweepCallback,
    resume: bool,
    search_alg: Any = None,
    scheduler: Any = None,
    param_space: dict[str, Any] | None = None,
    num_samples: int = 1,
) -> Any:
    from ray import tune

    r = plan.spec.resources
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, ctx=ctx), {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}
    )
    path = os.path.join(storage, phase)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=param_space)
        # Callbacks hold driver objects: hand the fresh ones to the restored experiment. So
        # does the searcher: the pickled one was made when the sweep started (its state, the
        # trials it handed out, is restored from its own checkpoint when the fit starts), and
        # it would open the Optuna storage as it was named then (a password changed since, a
        # database moved to SEGSWEEP_OPTUNA_STORAGE).
        tuner._local_tuner._run_config.callbacks = [callback]
        if search_alg is not None:
            tuner._local_tuner._tune_config.search_alg = search_alg
        return tuner
    es = plan.spec.early_stop
    return tune.Tuner(
        trainable,
        param_space=param_space or {},
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=r.max_concurrent,
            metric=es.metric,
            mode=es.mode,
            # A worker serves trial after trial: a fresh one costs seconds to start (torch
            # import, model build). Ray reuses it once the previous trial's thread has ended;
            # ``runner.execute`` lets a stopped trial's SystemExit end it.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=phase,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=plan.spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[callback],
            verbose=0,
        ),
    )


def _best_per_cell(outcomes: dict[str, Outcome], mode: str, phase: str = "search") -> dict[str, Outcome]:
    best: dict[str, Outcome] = {}
    sign = 1 if mode == "max" else -1
    for o in outcomes.values():
        if o.phase != phase or o.status != "finished" or o.metric is None:
            continue
        if o.cell not in best or sign * o.metric > sign * best[o.cell].metric:  # type: ignore[operator]
            best[o.cell] = o
    return best


def _outcomes_from(result_grid: Any, ctx: SweepContext, metric: str) -> tuple[dict[str, Outcome], bool]:
    """Outcomes of every trial of a finished (or restored) experiment, from Ray's records,
    and whether every trial ended (False when the experiment was interrupted)."""
    statuses = {t.trial_id: t.status for t in result_grid._experiment_analysis.trials}
    out, complete = {}, True
    for r in result_grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or r.path
        ray_status = statuses.get(m.get("trial_id"), "TERMINATED" if m else "PENDING")
        if ray_status not in ("TERMINATED", "ERROR") or not r.config:
            complete = False  # still running, or never started (no config yet) when interrupted
            continue
        cfg = r.config.get("trial", r.config)
        status = "failed" if r.error is not None or ray_status == "ERROR" else _ended_status(m)
        val = m.get("val/mIoU_last", m.get("val/mIoU"))
        out[trial_id] = Outcome(
            cfg["cell"],
            cfg["phase"],
            status,
            float(m[metric]) if m.get(metric) is not None else None,
            float(val) if val is not None else None,
            float(m.get("time_total_s", 0.0)),
            dict(cfg.get("params", {})),
            trial_key(ctx.key_prefix, cfg),
            cfg.get("sample"),
            cfg.get("seed"),
        )
    return out, complete


def read_state(state_file: Path) -> dict[str, Any]:
    """A sweep's ``sweep.json``, or a one-line error naming it (edited or damaged by hand)."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{state_file}: unreadable sweep state ({one_line(exc)[:120]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), str):
        raise ConfigError(f"{state_file}: not a segsweep sweep state (expected its JSON object)")
    return state


def check_trials(plan: Plan, on_cluster: bool = False, download: bool = True) -> list[str]:
    """Build every distinct dataset and model of the plan once, before anything is started
    or written: a broken dataset or model is one line now, not a failed trial later.

    On a cluster the trials run on the workers: the driver may have no GPU of its own, so it
    builds the models on its CPU (a worker still checks its device when its trial starts).
    ``download`` False (``--dry-run``): ImageNet weights are not fetched, the models are built
    without them, and the notes returned name the encoders a run will fetch."""
    from segsweep.training.runner import prepare

    on_driver = {"train.device": "cpu"} if on_cluster else {}
    seen: set[str] = set()
    pretrained: set[str] = set()
    for cell in plan.cells:
        cfg = run_config_of(cell, on_driver)
        if not download and cfg.model.encoder_weights == "imagenet":
            pretrained.add(cfg.model.encoder)
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"encoder_weights": None})})
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.model.model_dump(mode="json"), cfg.method])
        if key not in seen:
            seen.add(key)
            prepare(cfg)
    return (
        [
            f"model.encoder_weights: imagenet: the weights of {', '.join(sorted(pretrained))} are loaded when "
            "the sweep starts (from the cache, or downloaded); `segsweep weights SPEC --cache DIR` fetches "
            "them beforehand for nodes without internet"
        ]
        if pretrained
        else []
    )


def describe_plan(plan: Plan) -> list[str]:
    """What a sweep would run, cell by cell (``segsweep sweep --dry-run``): trials and steps
    (``train.epochs`` counted over the cell's split), the published point the curve will set
    it beside, and what a trial costs on a GPU where that was measured."""
    from segsweep.reports.curve import published_point
    from segsweep.sweep.costs import describe_costs

    spec = plan.spec
    final = f", then {len(plan.cells) * len(spec.final.seeds)} final runs" if spec.final else ""
    lines = [
        f"sweep {spec.name}: {len(plan.cells)} cells, {plan.total_trials} search trials{final}; "
        f"MLflow experiment '{plan.experiment}' at {redact(plan.tracking_uri)}"
    ]
    width = max(len(c.id) for c in plan.cells)
    total, trials, published = 0, [], False
    for cell in plan.cells:
        cfg = run_config_of(cell, {})
        steps = planned_steps(cfg)
        total += plan.samples(cell) * steps
        epochs = f" ({cfg.train.epochs:g} epochs)" if cfg.train.epochs is not None else ""
        point = published_point(cfg)
        published = published or point is not None
        against = f"  published {point}" if point else ""
        lines.append(
            f"  {cell.id:<{width}}  {plan.samples(cell)} trial(s) x {steps:,} steps{epochs}{against}"
        )
        lines += [f"  {'':<{width}}    search {k}: {v.describe()}" for k, v in cell.space.items()]
        trials.append((cfg, steps))
    if spec.final:
        lines.append(f"  final: each cell's best configuration again with seeds {spec.final.seeds}")
    lines.append(f"{total:,} training steps in the search at most (early stopping cuts trials short)")
    if published:
        lines.append(
            "published: mIoU as the source's table reports it (the best evaluation over training); "
            "runs keep that number apart as val/mIoU_best, and the curve's value is the last evaluation"
        )
    lines += [f"gpu: {line}" for line in describe_costs(trials)]
    return lines


def resume_progress(plan: Plan, state: dict[str, Any]) -> str:
    """For a dry run of a resume: how far the sweep got, read from its trials' runs in the
    store the resume would use. Trials that failed run again (Ray resumes errored trials), as
    do those cut short; finished, stopped-early and diverged ones do not."""
    from segsweep.tracking.mlflow_writer import client_for

    parent = state.get("parent_run_id")
    if not parent:
        return "resume: the sweep had not started its parent run: every trial runs"
    uri = plan.tracking_uri
    try:
        existing_store(uri, what="the sweep's store")
        client = with_retries(lambda: client_for(uri), "connect", 10)
        experiment = with_retries(lambda: client.get_run(parent), "read run", 10).info.experiment_id
        kids = runs_tagged(client, experiment, TAG_PARENT, parent, 10)
    except UserError as exc:
        return f"resume: its runs could not be read ({one_line(exc)})"
    done: dict[str, dict[str, int]] = {"search": {}, "final": {}}
    for kid in kids:
        status = kid.data.tags.get(TAG_STATUS, "")
        if status in ("finished", "stopped_early", "diverged"):
            counts = done.setdefault(kid.data.tags.get(TAG_PHASE, "search"), {})
            counts[status] = counts.get(status, 0) + 1
    search = done["search"]
    text = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(search.items()))
    ran = sum(search.values())
    left = plan.total_trials - ran
    line = f"resume: {ran} of {plan.total_trials} search trials done{f' ({text})' if text else ''}"
    line += f", {left} to run (those failed or cut short again, from their last checkpoint)" if left else ""
    if plan.spec.final:
        planned = len(plan.cells) * len(plan.spec.final.seeds)
        line += f"; final runs: {sum(done['final'].values())} of up to {planned} done"
    return line


def started_sets(spec_path: Path, sweep_root: Path) -> list[str] | None:
    """The ``--set`` a sweep was started with, for a resume that gives none.

    None when there is no such sweep yet, or it was started before they were kept.
    """
    state_file = (sweep_root / load_spec(spec_path)[0].name).resolve() / "sweep.json"
    if not state_file.exists():
        return None
    sets = read_state(state_file).get("sets")
    return [str(s) for s in sets] if isinstance(sets, list) else None


def _why_not_the_same(state: dict[str, Any], plan: Plan) -> str:
    """What a resume would change in the sweep's trials, and the likeliest cause."""
    was, now = state.get("trials"), plan.trial_settings()
    sets = state.get("sets")
    if not isinstance(was, dict):  # started before the trials' settings were kept
        hint = "" if isinstance(sets, list) else "give the same --set it was started with, if any, or "
        return (
            "the spec's grid, search or base config changed since the sweep started; a resumed "
            f"sweep must run the same trials: {hint}give the sweep a new name"
        )
    added, removed = [c for c in now if c not in was], [c for c in was if c not in now]
    if added or removed:
        change = "; ".join(
            f"{what} {', '.join(cells[:3])}{f' and {len(cells) - 3} more' if len(cells) > 3 else ''}"
            for what, cells in (("added", added), ("removed", removed))
            if cells
        )
        return (
            f"this resume would change its cells ({change}); a resumed sweep runs the same cells "
            "(or give the sweep a new name)"
        )
    changed: dict[str, tuple[str, str]] = {}
    for cell, settings in now.items():
        for key in sorted(set(settings) | set(was[cell])):
            before, after = was[cell].get(key, "unset"), settings.get(key, "unset")
            if before != after:
                changed.setdefault(key, (before, after))
    shown = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(changed.items())[:3])
    shown += f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    started_in = state.get("cwd")
    if started_in and started_in != plan.cwd and any(started_in in a for a, _ in changed.values()):
        cause = f"it was started in {started_in}, where relative paths resolve: resume it from there"
    elif "tracking.uri" in changed:
        uri = redact(str(state.get("tracking_uri") or changed["tracking.uri"][0].strip('"')))
        cause = f"its runs are in {uri}: resume with --tracking-uri {uri}"
    elif isinstance(sets, list) and sorted(sets) != sorted(plan.sets):
        given = " ".join(f"--set {s}" for s in sets) or "no --set"
        cause = f"it was started with {redact(given)}: resume with the same, or with no --set to reuse them"
    else:
        cause = (
            "the spec, its base config or the environment (e.g. SEGSWEEP_CACHE) changed since it "
            "started: restore them, or give the sweep a new name"
        )
    return f"this resume would change its trials ({shown}); {cause}"


def resumable_state(plan: Plan, sweep_root: Path, resume: bool) -> dict[str, Any] | None:
    """The state of the sweep a ``--resume`` continues (None for a new sweep), or a one-line
    error: a sweep that exists but is not resumed, none to resume, other trials."""
    sweep_dir = (sweep_root / plan.spec.name).resolve()
    state_file = sweep_dir / "sweep.json"
    if not state_file.exists():
        if resume:
            raise ConfigError(f"--resume: no sweep '{plan.spec.name}' in {sweep_root} to resume")
        return None
    state = read_state(state_file)
    if not resume:
        raise ConfigError(
            f"sweep '{plan.spec.name}' already exists in {sweep_dir}: add --resume to continue it, "
            "or give the spec another name"
        )
    if state.get("fingerprint") not in (plan.fingerprint(), plan.fingerprint(with_passwords=True)):
        raise ConfigError(f"{sweep_dir}: {_why_not_the_same(state, plan)}")
    return state


def run_sweep(
    plan: Plan,
    sweep_root: Path,
    resume: bool = False,
    ray_address: str | None = None,
    echo: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or ``resume``) the sweep of ``plan`` in ``sweep_root/<name>``: one driver at a time."""
    with only_writer(sweep_root / plan.spec.name, "sweep folder"):
        return _run_sweep(plan, sweep_root, resume, ray_address, echo)


def _run_sweep(
    plan: Plan,
    sweep_root: Path,
    resume: bool,
    ray_address: str | None,
    echo: Callable[[str], None],
) -> SweepResult:
    spec = plan.spec
    sweep_dir = (sweep_root / spec.name).resolve()
    state_file = sweep_dir / "sweep.json"
    fingerprint = plan.fingerprint()
    state = resumable_state(plan, sweep_root, resume) or {"instance": uuid.uuid4().hex[:8]}
    # Sweeps started before instance ids existed keep their plain-name keys.
    key_prefix = f"{spec.name}@{state['instance']}" if state.get("instance") else spec.name
    # Optuna studies are named by the instance too: on a shared storage a sweep started anew
    # under an old name must not continue the old sweep's studies. Sweeps started before
    # that keep the plain name they began with, and so their studies' history.
    study_prefix = state.get("study_prefix", key_prefix if not resume else spec.name)

    address = ray_address or spec.ray.address
    # Where the sweep writes, checked now rather than after Ray has started; then the head.
    require_writable_file(sweep_dir / "spec.yaml", "--dir")
    existing_store(plan.tracking_uri, must_exist=False, what=plan.tracking_origin)
    await_ray_head(address, named="--ray-address" if ray_address else "ray.address")
    check_trials(plan, on_cluster=bool(address))

    own_storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    storage_url = spec.optuna_storage or os.environ.get("SEGSWEEP_OPTUNA_STORAGE") or own_storage
    if storage_url != own_storage:  # a database of its own: reachable before anything starts
        from segsweep.sweep.studies import check_storage

        try:
            check_storage(storage_url)
        except ConnectionError as exc:
            raise ConfigError(f"optuna_storage: cannot reach {redact(storage_url)}: {exc}") from None

    uri = resolve_uri(plan.tracking_uri)
    clock = time.perf_counter()
    _ray_init(address, plan)
    seconds = {"ray_init": time.perf_counter() - clock}
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
    write_atomic(
        state_file,
        json.dumps(
            {
                "fingerprint": fingerprint,
                "instance": state.get("instance", ""),
                "study_prefix": study_prefix,
                "parent_run_id": parent.run_id,
                "tracking_uri": redact(uri),  # where its runs are, as told to the user
                "experiment": plan.experiment,
                # How it was started: a resume reuses the --set, and names what differs.
                "sets": plan.sets,
                "cwd": plan.cwd,
                "trials": plan.trial_settings(),
            },
            indent=2,
        ),
        private=True,  # the --set as given, which a resume reuses: a password stays in it
    )
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # resume loses at most ~2 s of scheduling
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our live view instead of Ray's tables
    # Reports of pipeline stages before the main one carry no tuning metric yet.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

    ctx = SweepContext(
        spec.name,
        plan.experiment,
        uri,
        parent.run_id,
        {c.id: c for c in plan.cells},
        spec.resources.cpus_per_trial,
        str(sweep_dir),
        key_prefix,
    )
    es = spec.early_stop
    # Ray pickles the searcher, the schedulers and the trials' configs in here (tuner.pkl,
    # its experiment state): a store's password in a URI among them. The user's alone.
    storage = str(sweep_dir / "ray")
    os.makedirs(storage, mode=0o700, exist_ok=True)
    os.chmod(storage, 0o700)  # and a folder an earlier version made readable
    concurrency = _concurrency(plan)
    # Ray lets a custom searcher keep one trial pending; cells should start side by side.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(concurrency))
    outcomes: dict[str, Outcome] = {}
    echo(
        f"sweep {spec.name}: {len(plan.cells)} cells, {plan.total_trials} search trials"
        f"{f', then {len(plan.cells) * len(spec.final.seeds)} final runs' if spec.final else ''}; "
        f"up to {concurrency} at once; MLflow experiment '{plan.experiment}' at {redact(parent.uri)}"
    )
    interrupted = False
    # Ctrl+C and SIGTERM only set INTERRUPT; the callback hands it to Ray inside fit() (a
    # signal between two fits would reach a stale Ray handler and be lost).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    INTERRUPT.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _interrupt)
    try:
        searcher = CellSearcher(plan, storage_url, study_prefix, es.metric, es.mode)
        scheduler = CellScheduler(
            {c.id: planned_steps(run_config_of(c, {})) for c in plan.cells},
            es.metric,
            es.mode,
            es.grace_period,
            es.reduction_factor,
            es.enabled,
        )
        cb = SweepCallback(ctx, es.metric, es.mode, "search", plan.total_trials, concurrency, echo, outcomes)
        tuner = _tuner(
            "search", plan, ctx, storage, cb, resume, searcher, scheduler, num_samples=plan.total_trials
        )
        clock = time.perf_counter()
        found, complete = _fit(tuner, cb, ctx, parent, es.metric)
        seconds["search"] = time.perf_counter() - clock
        outcomes.update(found)
        if not complete:
            raise KeyboardInterrupt
        best = _best_per_cell(outcomes, es.mode)

        if spec.final:
            configs = []
            for cell in plan.cells:
                if cell.id not in best:
                    echo(f"  no finished trial in cell {cell.id}: it has no final runs")
                    continue
                for seed in spec.final.seeds:
                    configs.append(
                        {
                            "cell": cell.id,
                            "phase": "final",
                            "seed": seed,
                            "params": best[cell.id].params,
                            "sample": best[cell.id].sample,
                        }
                    )
            if configs:
                from ray import tune

                echo(f"final: best configuration of each cell over seeds {spec.final.seeds}")
                fcb = SweepCallback(
                    ctx, es.metric, es.mode, "final", len(configs), concurrency, echo, outcomes
                )
                final_tuner = _tuner(
                    "final", plan, ctx, storage, fcb, resume, param_space={"trial": tune.grid_search(configs)}
                )
                found, complete = _fit(final_tuner, fcb, ctx, parent, es.metric)
                outcomes.update(found)
                if not complete:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    if interrupted:
        parent.finish("KILLED", "killed")
        raise SweepInterrupted(spec.name)

    _close_orphans(parent, ctx, outcomes, echo)
    best = _best_per_cell(outcomes, es.mode)
    importances = {c.id: imp for c in plan.cells if c.space and (imp := searcher.studies[c.id].importances())}
    _summarise(parent, plan, outcomes, best, echo, importances)
    parent.finish("FINISHED", "finished")
    return SweepResult(
        outcomes, best, parent.run_id, sweep_dir, uri, parent.experiment_id, storage_url, seconds
    )


#: Set by Ctrl+C or SIGTERM while a sweep runs; ``SweepCallback`` hands it to Ray Tune.
INTERRUPT = threading.Event()


def _interrupt(signum: int, frame: Any) -> None:
    """First signal: stop gracefully (Ray saves the experiment state, then ends the running
    trials, which ``--resume`` runs again). A second one: quit at once."""
    if INTERRUPT.is_set():
        raise KeyboardInterrupt
    INTERRUPT.set()
    print(
        "\ninterrupted: saving the sweep's state and stopping its trials (again to quit at once)",
        file=sys.stderr,
        flush=True,
    )


#: Seconds the driver waits, after an interrupt, for stopped workers to close their runs (in
#: all: the workers close theirs at the same time).
WORKER_CLOSE_WAIT_S = 10.0


def _fit(
    tuner: Any, callback: SweepCallback, ctx: SweepContext, parent: RunTracker, metric: str
) -> tuple[dict[str, Outcome], bool]:
    """Run one Tuner; outcomes of its trials, and whether it ran to the end.

    On an interrupt Ray ends the running trials as TERMINATED (as if they had finished) and
    their workers close their runs as stopped early: their runs are marked KILLED here, and
    nothing is counted, since ``--resume`` runs those trials again from their checkpoints
    (a run that did finish is left as it is: ``--resume`` reports it without running it).
    """
    grid = tuner.fit()
    if not INTERRUPT.is_set():
        return _outcomes_from(grid, ctx, metric)
    # Stopped workers may still be closing their runs (as "stopped early"): let them finish
    # first, so that the driver's mark is the last word. They were all stopped at once, so
    # one deadline serves every trial.
    deadline = time.monotonic() + WORKER_CLOSE_WAIT_S
    budget = parent.retry_budget_s
    for trial in callback.interrupted_trials(grid._experiment_analysis.trials):
        if not trial.config:
            continue
        key = trial_key(ctx.key_prefix, trial.config.get("trial", trial.config))
        try:
            while True:
                runs = runs_tagged(parent.client, parent.experiment_id, TAG_KEY, key, budget)
                if not any(r.info.status == "RUNNING" for r in runs) or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            for run in runs:
                if run.info.status != "FINISHED" or run.data.tags.get(TAG_STATUS) != "finished":
                    _end_run(parent.client, run.info.run_id, "KILLED", STATUS_INTERRUPTED, budget)
        except UserError as exc:  # the interrupt still ends the sweep; --resume runs the trial again
            print(f"warning: could not mark the run of {key} interrupted: {exc}", file=sys.stderr)
    return {}, False


class SweepInterrupted(Interrupted):
    def __init__(self, name: str) -> None:
        super().__init__(f"sweep '{name}' interrupted; continue it with --resume")


def _close_orphans(
    parent: RunTracker, ctx: SweepContext, outcomes: dict[str, Outcome], echo: Callable[[str], None]
) -> None:
    """Reconcile MLflow with Ray's record of the trials, once the sweep is over.

    Child runs that no known trial owns (a trial started just before the driver died, that
    Ray's saved state never recorded) are deleted, so every trial counts once; runs whose
    worker died without closing them end FAILED; trials the scheduler stopped end FINISHED
    with ``segsweep.status=stopped_early`` whatever their worker managed to write.
    """
    by_key = {o.key: o for o in outcomes.values()}
    budget = parent.retry_budget_s
    for run in runs_tagged(parent.client, parent.experiment_id, TAG_PARENT, parent.run_id, budget):
        rid, key = run.info.run_id, run.data.tags.get(TAG_KEY, "")
        outcome = by_key.get(key)
        if outcome is None:
            _end_run(parent.client, rid, "KILLED", "orphaned", budget, end=run.info.status == "RUNNING")
            with_retries(lambda rid=rid: parent.client.delete_run(rid), "delete run", budget)
            echo(f"  removed orphaned run {rid} ({key})")
        elif outcome.status == "stopped_early" and run.data.tags.get(TAG_STATUS) != "stopped_early":
            _end_run(parent.client, rid, "FINISHED", "stopped_early", budget)
        elif run.info.status == "RUNNING":  # its worker died with no chance to close it
            _end_run(parent.client, rid, "FAILED", "failed", budget)


def _end_run(
    client: Any,
    run_id: str,
    status: str,
    segsweep_status: str,
    budget: float,
    end: bool = True,
    tags: dict[str, str] | None = None,
) -> None:
    """From the driver: tag a trial's run with how it ended (and ``tags``), and (``end``)
    end it."""
    tags = {TAG_STATUS: segsweep_status, **(tags or {})}
    if end:
        end_run(client, run_id, status, tags, budget)
    else:
        tag_run(client, run_id, tags, budget)


def _summarise(
    parent: RunTracker,
    plan: Plan,
    outcomes: dict[str, Outcome],
    best: dict[str, Outcome],
    echo: Callable[[str], None],
    importances: dict[str, dict[str, float]],
) -> None:
    counts = {"finished": 0, "stopped_early": 0, "failed": 0, "diverged": 0}
    for o in outcomes.values():
        counts[o.status] = counts.get(o.status, 0) + 1
    parent.log_metrics({f"trials/{k}": v for k, v in counts.items()}, 0)
    metric = plan.spec.early_stop.metric
    rows = ["cell,trials,best_" + metric.replace("/", "_") + ",val_mIoU,params"]
    echo("")
    echo(f"{'cell':<48} {'trials':>6} {'best ' + metric:>14} {'val/mIoU':>9}  params")
    for cell in plan.cells:
        n = sum(o.cell == cell.id and o.phase == "search" for o in outcomes.values())
        b = best.get(cell.id)
        params = json.dumps(b.params) if b else ""
        m = f"{b.metric:.4f}" if b and b.metric is not None else "-"
        v = f"{b.val:.4f}" if b and b.val is not None else "-"
        echo(f"{cell.id:<48} {n:>6} {m:>14} {v:>9}  {params}")
        rows.append(f'"{cell.id}",{n},{m},{v},"{params.replace(chr(34), chr(39))}"')
    parent.log_text("\n".join(rows) + "\n", "best_per_cell.csv")
    if importances:  # which searched knob mattered, per cell (Optuna's fANOVA)
        parent.log_text(json.dumps(importances, indent=2), "optuna_importances.json")
        parent.log_metrics(
            {f"importance/{_short(c)}/{k}": v for c, imp in importances.items() for k, v in imp.items()}, 0
        )
    # Finished ones only: a failed trial's val is its last intermediate report's.
    finals = [
        o for o in outcomes.values() if o.phase == "final" and o.status == "finished" and o.val is not None
    ]
    if finals:
        echo("")
        echo("final runs, val/mIoU (last evaluation) over seeds:")
        for cell in plan.cells:
            vals = [o.val for o in finals if o.cell == cell.id]
            if vals:
                mean = sum(vals) / len(vals)
                std = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
                echo(f"  {cell.id:<46} {mean:.4f} ± {std:.4f} (n={len(vals)})")
    echo("")
    echo(
        f"trials: {counts['finished']} finished, {counts['stopped_early']} stopped early, "
        f"{counts['failed']} failed, {counts['diverged']} diverged"
    )
    seeds = {c.values.get("seed") for c in plan.cells}
    if len(seeds) == 1 and not plan.spec.final:
        # What one seed per cell can say: a reader of the table must not take noise for a result.
        echo(
            "note: one seed per cell: a difference between two cells smaller than the spread over "
            "seeds (1-2 mIoU points on the embedded dataset, several more for FixMatch at 1/32; "
            "README, Results) is not a finding; add seeds to the grid, or final: {seeds: [...]}"
        )
