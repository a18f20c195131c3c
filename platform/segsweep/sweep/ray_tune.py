"""Ray Tune at the edge: the only module of the sweep that imports Ray.

Every cell of a plan runs through one Ray Tune experiment per phase, so cells run in
parallel, not one after another:

* ``CellSearcher`` hands out trials round-robin over the cells (``studies.CellSearch``: an
  Optuna study per cell with a search space).
* ``CellScheduler`` keeps one ASHA instance per cell: a trial is only ever compared with the
  trials of its own cell (a 1/16 trial is never stopped because 1/2 trials score higher).
* ``trial_main`` runs one trial (``trial.run_trial``) in a worker, through ``RaySession``:
  reports at each evaluation with its checkpoint; a crashed trial is retried from there.
* ``SweepCallback`` closes the MLflow runs of trials that the scheduler stopped (a stopped
  trial runs no code after its last report), counts outcomes and feeds the live view.

Each trial's config carries its ``TrialOrder`` as plain data (``TrialOrder.as_dict``).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import Searcher

from segsweep.errors import ConfigError, UserError, redact
from segsweep.sweep.interrupt import INTERRUPT
from segsweep.sweep.live import LiveView, ended_line, retry_line
from segsweep.sweep.reconcile import end_trial_run
from segsweep.sweep.spec import Plan
from segsweep.sweep.studies import CellSearch
from segsweep.sweep.trial import Outcome, SweepContext, TrialOrder, ended_status, run_trial
from segsweep.tracking.retries import with_retries
from segsweep.tracking.tags import TAG_STOPPED_AT
from segsweep.waiting import poll, said_once, unanswered

#: Trial statuses that Ray keeps for trials that ended.
ENDED = ("TERMINATED", "ERROR")

# ---------------------------------------------------------------------------------------------
# The trial, in a Ray worker


class RaySession:
    """A trial's ``TrialSession`` under Ray Tune (``trial.run_trial``)."""

    def gpu_ids(self) -> list[Any]:
        import ray

        return list(ray.get_gpu_ids())

    def tags(self) -> dict[str, str]:
        import ray

        return {
            "ray.trial_id": tune.get_context().get_trial_id(),
            "ray.node_id": ray.get_runtime_context().get_node_id(),
        }

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        if checkpoint_dir is None:
            tune.report(metrics)
        else:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    def restore_checkpoint(self, into: Path) -> bool:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as folder:
            into.mkdir(parents=True, exist_ok=True)
            for src in Path(folder).glob("*.pt"):  # last, best and finished stages' weights
                shutil.copy2(src, into / src.name)
        return True

    def stop_requested(self) -> bool:
        """Whether Ray asked this trial to stop (its session's stop event; Ray 2.60 internals)."""
        from ray.train._internal.session import get_session

        session = get_session()
        return bool(session is not None and session.stop_event.is_set())


def trial_main(config: dict[str, Any], ctx: SweepContext) -> None:
    """One trial, inside a Ray worker: its order read back from the config, then run."""
    run_trial(TrialOrder.from_ray_config(config), ctx, RaySession())


# ---------------------------------------------------------------------------------------------
# Search and early stopping


class CellSearcher(Searcher):
    """Ray's searcher over ``CellSearch``: a suggestion is the next trial's order. Its state
    (which trial is which cell's sample) is saved with Ray's experiment state."""

    def __init__(self, search: CellSearch, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.search = search

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        order = self.search.next(trial_id)
        return self.FINISHED if order is None else order.as_dict()

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result and "step" in result:
            self.search.progress(trial_id, float(result[self.metric]), int(result["step"]))

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        self.search.ended(trial_id, result, error, self.metric)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.search.state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.search.restore(pickle.load(fh))


def _cell_of(config: dict[str, Any]) -> str:
    """The cell of a trial's config (the final phase's grid search nests it under "trial")."""
    return config.get("cell") or config.get("trial", {}).get("cell")


class CellScheduler(FIFOScheduler):
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
        self._asha: dict[str, AsyncHyperBandScheduler] = {}
        self.stopped: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _for(self, controller: Any, trial: Any) -> AsyncHyperBandScheduler:
        cell = _cell_of(trial.config)
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

#: Retry budget of the live view's run closings: they run in Ray's event loop, which must not
#: stall for long (the end of the sweep closes whatever they could not, with the full budget).
CALLBACK_RETRY_S = 10.0


#: Ray's words (its error types, or what its error.txt keeps of them) for a trial whose
#: worker process or node went away mid-trial.
WORKER_LOST = (
    "ActorUnavailableError",
    "ActorDiedError",
    "NodeDiedError",
    "WorkerCrashedError",
    "The actor is temporarily unavailable",
    "The actor died unexpectedly",
)


def error_line(trial: Any) -> str:
    """The last line of a failed trial's error, without a URI's password."""
    try:
        text = trial.error_file and Path(trial.error_file).read_text()
    except OSError:
        text = ""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    last = redact(lines[-1] if lines else "error")  # shown on the terminal: no URI password
    if any(lost in last for lost in WORKER_LOST):
        return "its Ray worker was lost (its node down, the worker killed or out of memory)"
    return last.split("Error: ", 1)[-1][:200] if "Error: " in last else last[:200]


class SweepCallback(Callback):
    """Ends the MLflow runs Ray stopped, records outcomes, and prints a compact live view."""

    def __init__(self, ctx: SweepContext, metric: str, view: LiveView) -> None:
        self.ctx, self.metric, self.view = ctx, metric, view
        self.outcomes = view.outcomes
        self.ended_before: set[str] | None = None  # trials that had ended when it restored them
        self.completed: set[str] = set()  # trials this driver saw end, by themselves
        self.forwarded = False
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from segsweep.tracking.store import client_for

            self._client = client_for(self.ctx.tracking_uri)
        return self._client

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.ended_before is None:
            self.ended_before = {t.trial_id for t in trials if t.status in ENDED}
        if INTERRUPT.is_set() and not self.forwarded:
            # Ray's own stop path (SIGUSR1 handler, installed by every fit()): it saves the
            # experiment state with the running trials as RUNNING, so --resume re-runs them.
            self.forwarded = True
            handler = signal.getsignal(signal.SIGUSR1)
            if callable(handler):
                handler(signal.SIGUSR1, None)
        self.show(trials)  # on a clock, not only on results: some stages report nothing for long

    def interrupted_trials(self, trials: list) -> list:
        """Trials an interrupt cut short: neither ended before this driver restored them nor
        seen to end normally. Ray marks the running ones TERMINATED without telling callbacks;
        others failed as the signal reached their workers (Ctrl+C reaches the whole process
        group) and are waiting for a retry. ``--resume`` runs all of them again."""
        before = self.ended_before or set()
        return [t for t in trials if t.trial_id not in before and t.trial_id not in self.completed]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.view.note(_cell_of(trial.config), result.get("val/mIoU"))
        self.show(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        status = ended_status(result)
        self.view.ended_here += 1
        self.completed.add(trial.trial_id)
        run_id = result.get("mlflow_run_id")
        if status == "stopped_early" and run_id:
            # The trial was killed after its last report: its run is closed here (and again,
            # if this fails, when the sweep ends: reconcile.close_orphans).
            step = {TAG_STOPPED_AT: str(result.get("step", ""))}
            self._close(run_id, "FINISHED", "stopped_early", tags=step)
        self._ended(trial, status, result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.view.ended_here += 1
        if not INTERRUPT.is_set():  # failed for good on its own: not one an interrupt cut short
            self.completed.add(trial.trial_id)
        self._ended(trial, "failed", trial.last_result or {})
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        if run_id:  # normally closed FAILED by the trial; a killed worker could not
            self._close(run_id, "FAILED", "failed", only_running=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.view.echo(retry_line(TrialOrder.from_ray_config(trial.config), error_line(trial)))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if not INTERRUPT.is_set():
            self.show(trials, force=True)  # the phase's closing counts, however short it was

    def _close(
        self,
        run_id: str,
        status: str,
        segsweep_status: str,
        tags: dict | None = None,
        only_running: bool = False,
    ) -> None:
        """End a trial's run; a tracking hiccup must not stop the sweep (close_orphans
        closes it when the sweep ends)."""
        try:
            if only_running:
                run = with_retries(lambda: self.client.get_run(run_id), "read run", CALLBACK_RETRY_S)
                if run.info.status != "RUNNING":
                    return
            end_trial_run(self.client, run_id, status, segsweep_status, CALLBACK_RETRY_S, tags=tags)
        except UserError as exc:
            self.view.echo(f"  warning: could not close run {run_id}: {exc}")

    def _ended(self, trial: Any, status: str, result: dict[str, Any]) -> None:
        """Record a trial's outcome and print its line."""
        order = TrialOrder.from_ray_config(trial.config)
        self.outcomes[trial.trial_id] = Outcome.of(order, status, result, self.metric, self.ctx.key_prefix)
        error = error_line(trial) if status == "failed" else ""
        self.view.echo(ended_line(order, status, result, self.metric, error))

    def show(self, trials: list, force: bool = False) -> None:
        """Every 30 s: the live view, trials that ended before a --resume counted too."""
        if not self.view.due(force):
            return
        for t in trials:
            if t.trial_id not in self.outcomes and t.status in ENDED:
                result = t.last_result or {}
                status = "failed" if t.status == "ERROR" else ended_status(result)
                order = TrialOrder.from_ray_config(t.config)
                self.outcomes[t.trial_id] = Outcome.of(
                    order, status, result, self.metric, self.ctx.key_prefix
                )
                # Its best over training, as for trials seen running (not its last value).
                seen = (getattr(t, "metric_analysis", None) or {}).get("val/mIoU", {})
                self.view.note(order.cell, seen.get("max", result.get("val/mIoU")))
        self.view.show(sum(t.status == "RUNNING" for t in trials))


# ---------------------------------------------------------------------------------------------
# Ray itself: the head, the instance, the tuners


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
    budget_s = RAY_WAIT_S if budget_s is None else budget_s
    text = (address or "").removeprefix("ray://")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return

    note = said_once(
        lambda reason: f"note: Ray head {address} does not answer ({reason}); waiting up to {budget_s:.0f}s"
    )
    reason = poll(lambda: unanswered(host, int(port), 5.0), budget_s, on_wait=note)
    if reason is not None:
        raise ConfigError(f"{named} {address}: nothing answers there within {budget_s:.0f}s ({reason})")


class GoneCheckpointFilter(logging.Filter):
    """Drops Ray's traceback for a checkpoint that is already gone. A sweep resumed after its
    driver or the Ray head was lost restores Ray's saved state, which may still list a
    checkpoint past ``num_to_keep`` that the lost driver had deleted; Ray deletes it again,
    logs the FileNotFoundError with a traceback and carries on. Nothing is lost (seen in the
    cluster test of 2026-12-07)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, FileNotFoundError) and "Error handling checkpoint" in str(record.msg))


#: One instance, so that starting Ray again in this process does not stack filters.
GONE_CHECKPOINT = GoneCheckpointFilter()


def ray_init(address: str | None, plan: Plan) -> None:
    """Join the Ray cluster at ``address``, or start a local instance sized to this process's
    CPUs and the machine's GPUs; a trial's resources that no node has are one line."""
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(GONE_CHECKPOINT)
    env_vars = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": str(TRIAL_THREAD_TIMEOUT_S)}
    kwargs: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "configure_logging": True,
        # A worker is reused for the next trial only once the last one's thread has ended; Ray
        # waits 2 s by default, and a stopped trial still closing its MLflow run takes longer
        # on a busy machine: the next trial then fails with "Could not re-use actor".
        "runtime_env": {"env_vars": env_vars},
    }
    if address:
        _join_cluster(address, env_vars, kwargs)
    else:
        _start_locally(plan, kwargs)
    _require_resources(plan, ray.cluster_resources())


def _join_cluster(address: str, env_vars: dict[str, str], kwargs: dict[str, Any]) -> None:
    import ray

    # Trials on other machines need the tracking server's credentials: they travel in the
    # job's runtime environment (the cluster is token-authenticated), never as params.
    from segsweep.tracking.uris import CREDENTIAL_VARS

    env_vars.update({k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)})
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray-address {address}: cannot join the Ray cluster ({exc})") from None


def _start_locally(plan: Plan, kwargs: dict[str, Any]) -> None:
    import ray
    import torch

    from segsweep.training.devices import usable_cpus

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


def _require_resources(plan: Plan, res: dict[str, float]) -> None:
    import ray

    need_gpu, need_cpu = plan.spec.resources.gpus_per_trial, plan.spec.resources.cpus_per_trial
    if need_gpu > res.get("GPU", 0):
        ray.shutdown()
        raise ConfigError(
            f"resources.gpus_per_trial: {need_gpu:g} GPU per trial but the Ray cluster has {res.get('GPU', 0):g}"
        )
    if need_cpu > res.get("CPU", 0):
        ray.shutdown()
        raise ConfigError(
            f"resources.cpus_per_trial: {need_cpu:g} CPUs per trial but the Ray cluster has {res.get('CPU', 0):g}"
        )


def concurrency(plan: Plan) -> int:
    """How many trials run at once: as many as the cluster's CPUs and GPUs hold, at most
    ``resources.max_concurrent``."""
    import ray

    r = plan.spec.resources
    res = ray.cluster_resources()
    fits = int(res.get("CPU", 1) // r.cpus_per_trial)
    if r.gpus_per_trial:
        fits = min(fits, int(res.get("GPU", 0) / r.gpus_per_trial + 1e-9))
    return max(1, min(fits, r.max_concurrent or fits))


def make_tuner(
    phase: str,
    plan: Plan,
    ctx: SweepContext,
    storage: str,
    callback: SweepCallback,
    resume: bool,
    search: CellSearch | None = None,
    scheduler: CellScheduler | None = None,
    finals: list[TrialOrder] | None = None,
) -> tune.Tuner:
    """The Tuner of one phase: the search (``search``'s trials, stopped by ``scheduler``) or
    the final runs (``finals``, a grid), restored from ``storage`` on a resume."""
    r, es = plan.spec.resources, plan.spec.early_stop
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, ctx=ctx), {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial}
    )
    searcher = CellSearcher(search, es.metric, es.mode) if search is not None else None
    param_space = {"trial": tune.grid_search([o.as_dict() for o in finals])} if finals else None
    path = os.path.join(storage, phase)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=param_space)
        # Callbacks hold driver objects: hand the fresh ones to the restored experiment. So
        # does the searcher: the pickled one was made when the sweep started (its state, the
        # trials it handed out, is restored from its own checkpoint when the fit starts), and
        # it would open the Optuna storage as it was named then (a password changed since, a
        # database moved to SEGSWEEP_OPTUNA_STORAGE).
        tuner._local_tuner._run_config.callbacks = [callback]
        if searcher is not None:
            tuner._local_tuner._tune_config.search_alg = searcher
        return tuner
    return tune.Tuner(
        trainable,
        param_space=param_space or {},
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.total_trials if search is not None else 1,
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


@dataclass
class PhaseRun:
    """What one Tuner's fit left: its trials' outcomes, whether every trial ended, and the
    run keys of the trials an interrupt cut short."""

    outcomes: dict[str, Outcome]
    complete: bool
    cut_short: list[str]


def run_phase(tuner: tune.Tuner, callback: SweepCallback) -> PhaseRun:
    """Run one Tuner. On an interrupt Ray ends the running trials as TERMINATED (as if they
    had finished): nothing is counted then, and the trials it cut short are named."""
    grid = tuner.fit()
    if not INTERRUPT.is_set():
        outcomes, complete = outcomes_from(grid, callback.ctx.key_prefix, callback.metric)
        return PhaseRun(outcomes, complete, [])
    cut = callback.interrupted_trials(grid._experiment_analysis.trials)
    keys = [TrialOrder.from_ray_config(t.config).key(callback.ctx.key_prefix) for t in cut if t.config]
    return PhaseRun({}, False, keys)


def outcomes_from(result_grid: Any, key_prefix: str, metric: str) -> tuple[dict[str, Outcome], bool]:
    """Outcomes of every trial of a finished (or restored) experiment, from Ray's records,
    and whether every trial ended (False when the experiment was interrupted)."""
    statuses = {t.trial_id: t.status for t in result_grid._experiment_analysis.trials}
    out, complete = {}, True
    for r in result_grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or r.path
        ray_status = statuses.get(m.get("trial_id"), "TERMINATED" if m else "PENDING")
        if ray_status not in ENDED or not r.config:
            complete = False  # still running, or never started (no config yet) when interrupted
            continue
        status = "failed" if r.error is not None or ray_status == "ERROR" else ended_status(m)
        out[trial_id] = Outcome.of(TrialOrder.from_ray_config(r.config), status, m, metric, key_prefix)
    return out, complete
