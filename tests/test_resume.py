"""Exact resume: a run interrupted and resumed from its checkpoint computes the same steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segsweep.runner import prepare
from segsweep.tracking import NullTracker


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.metrics: dict[tuple[str, int], float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.metrics[(k, step)] = v


@pytest.mark.parametrize("method", ["supervised", "fixmatch"])
def test_resumed_run_matches_the_uninterrupted_one(tiny, tmp_path: Path, method: str) -> None:
    over = {"method": method, "train.steps": 6, "train.eval_every": 3, "fixmatch.ema_teacher": True}
    full = Recorder()
    a = prepare(tiny(**over))
    a.trainer.run(tmp_path / "a", full)

    broken = prepare(tiny(**over, **{"debug.fail_at_step": 5}))
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        broken.trainer.run(tmp_path / "b", Recorder())
    resumed = Recorder()
    b = prepare(tiny(**over, **{"debug.fail_at_step": 5}))
    b.trainer.run(tmp_path / "b", resumed, resume_from=tmp_path / "b" / "checkpoints" / "last.pt")

    for step in (4, 5, 6):  # the steps after the checkpoint at step 3
        assert resumed.metrics[("train/loss", step)] == full.metrics[("train/loss", step)]
    assert ("train/loss", 3) not in resumed.metrics  # nothing before the checkpoint is redone
    assert resumed.metrics[("val/mIoU", 6)] == full.metrics[("val/mIoU", 6)]
    sa, sb = a.trainer.method.state_dict(), b.trainer.method.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


class Closing(NullTracker):
    def __init__(self) -> None:
        self.ended: tuple[str, str | None] | None = None

    def finish(
        self, status: str = "FINISHED", segsweep_status: str | None = None, unless_marked: str | None = None
    ) -> None:
        self.ended = (status, segsweep_status)


def test_a_trial_stopped_at_a_report_closes_its_run_and_ends_its_thread(tiny, tmp_path: Path) -> None:
    """Ray ends a stopped trial's thread with SystemExit at the report it is stopped at. The
    run must close as stopped early and the SystemExit must propagate: a trial function that
    returns instead makes Ray's wrapper report once more and wait for ever, and its worker can
    never serve another trial."""
    from segsweep.runner import execute

    reports: list[dict] = []

    def stopped_at_first_report(metrics: dict, checkpoint_dir: Path) -> None:
        reports.append(metrics)
        raise SystemExit(0)

    tracker = Closing()
    with pytest.raises(SystemExit):
        execute(
            prepare(tiny(**{"train.steps": 6, "train.eval_every": 2})),
            tracker,
            tmp_path / "r",
            stopped_at_first_report,
        )
    assert len(reports) == 1 and reports[0]["step"] == 2
    assert tracker.ended == ("FINISHED", "stopped_early")
