"""The driver's word on its trials' MLflow runs: how each ended, whatever its worker wrote.

A trial stopped by the scheduler runs no code after its last report, a killed worker closes
nothing, and an interrupt ends the running trials as if they had finished: the driver tags
and ends those runs here, from what the scheduler recorded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from segsweep.errors import UserError
from segsweep.sweep.trial import Outcome
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.retries import with_retries
from segsweep.tracking.store import end_run, runs_tagged, tag_run
from segsweep.tracking.tags import STATUS_INTERRUPTED, TAG_KEY, TAG_PARENT, TAG_STATUS

#: Seconds the driver waits, after an interrupt, for stopped workers to close their runs (in
#: all: the workers close theirs at the same time).
WORKER_CLOSE_WAIT_S = 10.0


def end_trial_run(
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


def mark_interrupted(parent: RunTracker, keys: list[str]) -> None:
    """The runs of trials an interrupt cut short end KILLED, tagged interrupted: nothing is
    counted, since ``--resume`` runs them again from their checkpoints (a run that did finish
    is left as it is: ``--resume`` reports it without running it).

    Stopped workers may still be closing their runs (as "stopped early"): they finish first,
    so that the driver's mark is the last word. They were all stopped at once, so one
    deadline serves every trial."""
    deadline = time.monotonic() + WORKER_CLOSE_WAIT_S
    budget = parent.retry_budget_s
    for key in keys:
        try:
            while True:
                runs = runs_tagged(parent.client, parent.experiment_id, TAG_KEY, key, budget)
                if not any(r.info.status == "RUNNING" for r in runs) or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            for run in runs:
                if run.info.status != "FINISHED" or run.data.tags.get(TAG_STATUS) != "finished":
                    end_trial_run(parent.client, run.info.run_id, "KILLED", STATUS_INTERRUPTED, budget)
        except UserError as exc:  # the interrupt still ends the sweep; --resume runs the trial again
            print(f"warning: could not mark the run of {key} interrupted: {exc}", file=sys.stderr)


def close_orphans(parent: RunTracker, outcomes: dict[str, Outcome], echo: Callable[[str], None]) -> None:
    """Reconcile MLflow with the scheduler's record of the trials, once the sweep is over.

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
            end_trial_run(parent.client, rid, "KILLED", "orphaned", budget, end=run.info.status == "RUNNING")
            with_retries(lambda rid=rid: parent.client.delete_run(rid), "delete run", budget)
            echo(f"  removed orphaned run {rid} ({key})")
        elif outcome.status == "stopped_early" and run.data.tags.get(TAG_STATUS) != "stopped_early":
            end_trial_run(parent.client, rid, "FINISHED", "stopped_early", budget)
        elif run.info.status == "RUNNING":  # its worker died with no chance to close it
            end_trial_run(parent.client, rid, "FAILED", "failed", budget)
