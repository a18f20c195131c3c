"""Optuna at the edge: the only module that imports optuna.

One study per sweep cell, named after the sweep and the cell, in an RDB storage (SQLite
beside the sweep by default, PostgreSQL on a cluster) so ``optuna-dashboard <storage>``
opens every cell's study. Trials are driven with ask/tell: ``CellSearch`` hands out the
trials of every cell in turn (the scheduler's searcher in ``ray_tune.py`` wraps it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from segsweep.errors import UserError, first_line, redact
from segsweep.sweep.spec import Cell, SearchParam
from segsweep.sweep.trial import TrialOrder
from segsweep.waiting import poll, said_once

optuna.logging.set_verbosity(logging.WARNING)

#: Seconds a study call rides out its database not answering (a PostgreSQL restart, SQLite's
#: writer lock), as the tracker does its store's; then the sweep fails in one line.
STORAGE_RETRY_S = 120.0

T = TypeVar("T")


def _unreachable(exc: BaseException) -> bool:
    """The database did not answer or dropped the connection (worth retrying), as opposed to a
    refused statement. Optuna wraps a failed commit in StorageInternalError."""
    import sqlalchemy.exc as sa

    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    return isinstance(cause, sa.OperationalError | sa.InterfaceError | sa.DisconnectionError) or (
        isinstance(cause, sa.DBAPIError) and cause.connection_invalidated
    )


def riding_out_outages(method: Callable[..., T]) -> Callable[..., T]:
    """``method`` of a study, called again while its database does not answer, up to
    ``STORAGE_RETRY_S``; said once on stderr. Each call reads the study's state afresh, so a
    retry after a write that did land is not a second write (``tell`` checks first)."""

    @functools.wraps(method)
    def call(self: CellStudy, *args: Any, **kwargs: Any) -> T:
        result: list[T] = []

        def attempt() -> str | None:
            try:
                result.append(method(self, *args, **kwargs))
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                return redact(first_line(getattr(exc.__cause__, "orig", None) or exc.__cause__ or exc))
            return None

        note = said_once(
            lambda reason: (
                f"note: the Optuna storage does not answer ({reason}); retrying for up to {STORAGE_RETRY_S:.0f}s"
            )
        )
        reason = poll(attempt, STORAGE_RETRY_S, delay_s=0.5, on_wait=note)
        if reason is not None:
            raise UserError(f"optuna_storage: no answer for {STORAGE_RETRY_S:.0f}s ({reason})")
        return result[0]

    return call


STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "fail": TrialState.FAIL}


def distribution(param: SearchParam) -> BaseDistribution:
    if param.type == "categorical":
        return CategoricalDistribution(param.choices or [])
    if param.type == "int":
        return IntDistribution(int(param.low), int(param.high), step=int(param.step or 1))  # type: ignore[arg-type]
    return FloatDistribution(param.low, param.high, log=param.type == "logfloat", step=param.step)  # type: ignore[arg-type]


class CellStudy:
    """The Optuna study of one cell: ask for parameters, report progress, tell the outcome."""

    def __init__(self, storage: str, name: str, space: dict[str, SearchParam], mode: str, seed: int) -> None:
        self.name = name
        self.space = {k: distribution(p) for k, p in space.items()}
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True, n_startup_trials=min(5, max(1, len(space) * 2))
        )
        self._open(storage, sampler, mode)

    @riding_out_outages
    def _open(self, storage: str, sampler: optuna.samplers.BaseSampler, mode: str) -> None:
        self.study = optuna.create_study(
            storage=storage,
            study_name=self.name,
            load_if_exists=True,
            sampler=sampler,
            direction="maximize" if mode == "max" else "minimize",
        )

    @riding_out_outages
    def ask(self) -> tuple[int, dict[str, Any]]:
        trial = self.study.ask(self.space)
        return trial.number, dict(trial.params)

    @riding_out_outages
    def report(self, number: int, value: float, step: int) -> None:
        """An intermediate value (TPE ranks pruned trials by how far they got)."""
        trial = self._trial(number)
        if trial is not None:
            try:
                trial.report(value, step)
            except (RuntimeError, ValueError):
                pass  # already finished, or this step was reported before a retry

    @riding_out_outages
    def tell(self, number: int, state: str, value: float | None = None) -> None:
        trial = self._frozen(number)
        if trial is None or trial.state.is_finished():
            return
        if state == "complete":
            self.study.tell(number, value)
        else:
            self.study.tell(number, state=STATES[state])

    @riding_out_outages
    def fail_orphans(self, known: set[int]) -> None:
        """Trials asked for but never handed to Ray (the driver died in between): FAIL them."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                self.study.tell(t.number, state=TrialState.FAIL)

    @riding_out_outages
    def best(self) -> tuple[int, dict[str, Any], float] | None:
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        sign = 1 if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        best = max(done, key=lambda t: sign * float(t.value))
        return best.number, dict(best.params), float(best.value)

    @riding_out_outages
    def importances(self) -> dict[str, float]:
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(self.space) < 2 or len(done) < 3:
            return {}
        try:
            return dict(optuna.importance.get_param_importances(self.study))
        except (RuntimeError, ValueError):
            return {}

    def _trial(self, number: int) -> optuna.Trial | None:
        frozen = self._frozen(number)
        if frozen is None or frozen.state != TrialState.RUNNING:
            return None
        return optuna.Trial(self.study, frozen._trial_id)

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial | None:
        trials = self.study.get_trials(deepcopy=False)
        return trials[number] if 0 <= number < len(trials) else None


def study_name(sweep: str, cell: Cell) -> str:
    """A cell's study: ``sweep`` is ``<name>@<instance>``, so a sweep started anew under an
    old name on a shared storage never continues the old sweep's studies."""
    return f"{sweep}:{cell.id}"


def stable_seed(text: str) -> int:
    """A sampler seed that is the same for the same text in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 2**31


class CellSearch:
    """Which trial runs next: every cell in turn, each asking its own study where it has a
    search space. Its state (which scheduler trial is which cell's sample) is saved with the
    scheduler's, so a restored sweep neither repeats nor loses a sample."""

    def __init__(
        self, cells: list[Cell], samples: dict[str, int], storage: str, sweep_name: str, mode: str
    ) -> None:
        self.cells, self.samples = list(cells), dict(samples)
        self.storage, self.sweep_name, self.mode = storage, sweep_name, mode
        self.started: dict[str, int] = {c.id: 0 for c in self.cells}
        self.assigned: dict[str, tuple[str, int | None]] = {}  # trial id -> (cell, optuna no.)
        self._studies: dict[str, CellStudy] | None = None

    # Optuna studies hold a database engine: never pickled, reopened on demand.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_studies": None}

    @property
    def studies(self) -> dict[str, CellStudy]:
        """The study of every cell with a search space, by cell id."""
        if self._studies is None:
            self._studies = {
                c.id: CellStudy(
                    self.storage, study_name(self.sweep_name, c), c.space, self.mode, stable_seed(c.id)
                )
                for c in self.cells
                if c.space
            }
        return self._studies

    def next(self, trial_id: str) -> TrialOrder | None:
        """The order of the scheduler's trial ``trial_id``; None once every sample started.
        The cell that started fewest goes first (ties keep the grid's order)."""
        waiting = [c for c in self.cells if self.started[c.id] < self.samples[c.id]]
        if not waiting:
            return None
        cell = min(waiting, key=lambda c: self.started[c.id])
        number, params = self.studies[cell.id].ask() if cell.space else (None, {})
        sample = self.started[cell.id]
        self.started[cell.id] += 1
        self.assigned[trial_id] = (cell.id, number)
        return TrialOrder(cell.id, "search", params, sample=sample, optuna_trial=number)

    def progress(self, trial_id: str, value: float, step: int) -> None:
        """An intermediate value of a trial (TPE ranks pruned trials by how far they got)."""
        cell, number = self.assigned.get(trial_id, (None, None))
        if number is not None:
            self.studies[cell].report(number, value, step)  # type: ignore[index]

    def ended(self, trial_id: str, result: dict[str, Any] | None, error: bool, metric: str) -> None:
        """Tell the trial's study how it ended. Trials stopped early are PRUNED, not COMPLETE
        with a truncated value."""
        cell, number = self.assigned.get(trial_id, (None, None))
        if number is None:
            return
        study = self.studies[cell]  # type: ignore[index]
        if error or not result or result.get("diverged"):
            study.tell(number, "fail")
        elif result.get("final") and metric in result:
            study.tell(number, "complete", float(result[metric]))
        else:  # stopped early: a truncated value is not a final one
            study.tell(number, "pruned")

    def state(self) -> dict[str, Any]:
        """What a restored sweep needs to go on where this one was."""
        return {"started": self.started, "assigned": self.assigned}

    def restore(self, state: dict[str, Any]) -> None:
        """Go on from ``state``; trials asked for but never handed to the scheduler FAIL."""
        self.started, self.assigned = state["started"], state["assigned"]
        known: dict[str, set[int]] = {}
        for cell, number in self.assigned.values():
            if number is not None:
                known.setdefault(cell, set()).add(number)
        for cell_id, study in self.studies.items():
            study.fail_orphans(known.get(cell_id, set()))

    def importances(self) -> dict[str, dict[str, float]]:
        """Per searched cell, how much each knob mattered (Optuna's fANOVA), where known."""
        return {cell: imp for cell, study in self.studies.items() if (imp := study.importances())}


def check_storage(storage: str) -> None:
    """Connect to an Optuna storage database once, within seconds; raise ``ConnectionError``
    with the driver's first line if it cannot be reached (before a sweep starts anything)."""
    import sqlalchemy

    server = storage.startswith(("postgresql", "mysql"))
    engine = None
    try:  # a missing driver fails already in create_engine
        engine = sqlalchemy.create_engine(storage, connect_args={"connect_timeout": 10} if server else {})
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - any driver's failure, reported in one line
        raise ConnectionError(first_line(getattr(exc, "orig", None) or exc)) from None
    finally:
        if engine is not None:
            engine.dispose()


def counts(storage: str) -> dict[str, int]:
    """Trials per study name in ``storage`` (used by tests and the cluster check)."""
    out = {}
    for summary in optuna.get_all_study_summaries(storage):
        out[summary.study_name] = summary.n_trials
    return out
