"""Optuna at the edge: the only module that imports optuna.

One study per sweep cell, named after the sweep and the cell, in an RDB storage (SQLite
beside the sweep by default, PostgreSQL on a cluster) so ``optuna-dashboard <storage>``
opens every cell's study. Trials are driven with ask/tell by the sweep's searcher.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from segsweep.errors import first_line
from segsweep.sweep.spec import SearchParam

optuna.logging.set_verbosity(logging.WARNING)

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
        self.study = optuna.create_study(
            storage=storage,
            study_name=name,
            load_if_exists=True,
            sampler=sampler,
            direction="maximize" if mode == "max" else "minimize",
        )

    def ask(self) -> tuple[int, dict[str, Any]]:
        trial = self.study.ask(self.space)
        return trial.number, dict(trial.params)

    def report(self, number: int, value: float, step: int) -> None:
        """An intermediate value (TPE ranks pruned trials by how far they got)."""
        trial = self._trial(number)
        if trial is not None:
            try:
                trial.report(value, step)
            except (RuntimeError, ValueError):
                pass  # already finished, or this step was reported before a retry

    def tell(self, number: int, state: str, value: float | None = None) -> None:
        trial = self._frozen(number)
        if trial is None or trial.state.is_finished():
            return
        if state == "complete":
            self.study.tell(number, value)
        else:
            self.study.tell(number, state=STATES[state])

    def fail_orphans(self, known: set[int]) -> None:
        """Trials asked for but never handed to Ray (the driver died in between): FAIL them."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                self.study.tell(t.number, state=TrialState.FAIL)

    def best(self) -> tuple[int, dict[str, Any], float] | None:
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        sign = 1 if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        best = max(done, key=lambda t: sign * float(t.value))
        return best.number, dict(best.params), float(best.value)

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
