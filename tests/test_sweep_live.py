"""The sweep's live view and its callback, without a Ray instance: the lines it prints, and
the MLflow runs it closes for trials that the scheduler stopped or whose worker died."""

from __future__ import annotations

from pathlib import Path


def test_a_trials_line_and_the_progress_view_read_as_the_user_sees_them() -> None:
    from segsweep.sweep.live import LiveView, ended_line, short
    from segsweep.sweep.trial import Outcome, TrialOrder

    order = TrialOrder(
        "method=fixmatch,ratio=0.25,seed=0", "search", {"fixmatch.conf_threshold": 0.91234}, sample=2
    )
    result = {"tune/mIoU": 0.41237, "step": 40}
    assert ended_line(order, "finished", result, "tune/mIoU", "") == (
        "  done method=fixmatch,ratio=0.25,seed=0 #2 (conf_threshold=0.912)  tune/mIoU 0.4124"
    )
    assert ended_line(order, "stopped_early", result, "tune/mIoU", "").endswith("tune/mIoU 0.4124 at step 40")
    final = TrialOrder(order.cell, "final", {}, sample=2, seed=7)
    assert ended_line(final, "failed", {}, "tune/mIoU", "CUDA out of memory") == (
        "  FAIL method=fixmatch,ratio=0.25,seed=0 seed=7  CUDA out of memory"
    )
    assert short("method=fixmatch,ratio=0.0625,split=92,seed=0") == "fixmatch@0.0625[split=92]/s0"
    lines: list[str] = []
    outcomes = {
        "a": Outcome(order.cell, "search", "finished", 0.4, 0.3, 5.0),
        "b": Outcome(order.cell, "search", "stopped_early", 0.2, 0.1, 2.0),
        "c": Outcome(order.cell, "final", "failed", None, None, 1.0),  # another phase: not counted
    }
    view = LiveView("search", 4, lines.append, outcomes)
    assert not view.due() and view.due(force=True)  # the first view comes ~10 s in
    view.note(order.cell, 0.35)
    view.note(order.cell, None)
    view.show(running=1)
    assert lines[0].endswith("search: 1 running, 1 finished, 1 stopped, 0 failed of 4")
    assert lines[1].strip() == "best val/mIoU so far: fixmatch@0.25/s0 0.350"


def test_the_live_view_shows_the_best_value_of_trials_that_ended_before_a_resume(tmp_path: Path) -> None:
    """A trial restored as ended shows its best val/mIoU over training, as a trial seen running
    does, not its last value (the view is labelled "best so far")."""
    from types import SimpleNamespace

    from segsweep.sweep.live import LiveView
    from segsweep.sweep.ray_tune import SweepCallback
    from segsweep.sweep.trial import SweepContext

    lines: list[str] = []
    ctx = SweepContext("s", "live", f"sqlite:///{tmp_path}/m.db", "parent", {}, 1.0, str(tmp_path))
    cb = SweepCallback(ctx, "tune/mIoU", LiveView("search", 1, lines.append, {}))
    config = {"cell": "method=fixmatch,ratio=0.25,seed=0", "phase": "search", "sample": 0, "params": {}}
    restored = SimpleNamespace(
        trial_id="a",
        status="TERMINATED",
        config=config,
        error_file=None,
        last_result={"val/mIoU": 0.31, "step": 9, "done": True},
        metric_analysis={"val/mIoU": {"max": 0.35, "last": 0.31}},
    )
    cb.show([restored], force=True)
    assert lines[-1].strip() == "best val/mIoU so far: fixmatch@0.25/s0 0.350", lines


def test_the_live_view_closes_the_runs_of_stopped_and_killed_trials(tmp_path: Path) -> None:
    """A trial stopped after its last report, and one whose worker died, leave RUNNING runs:
    the driver's callback ends them (stopped early: FINISHED, with the step; died: FAILED).
    A store that refuses does not stop the sweep: a one-line warning says so."""
    from types import SimpleNamespace

    from segsweep.sweep.live import LiveView
    from segsweep.sweep.ray_tune import SweepCallback
    from segsweep.sweep.trial import SweepContext
    from segsweep.tracking.store import client_for
    from segsweep.tracking.tags import TAG_STATUS

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    experiment = client.create_experiment("live")
    stopped, died = (client.create_run(experiment).info.run_id for _ in range(2))
    lines: list[str] = []
    ctx = SweepContext("s", "live", uri, "parent", {}, 1.0, str(tmp_path))
    cb = SweepCallback(ctx, "tune/mIoU", LiveView("search", 2, lines.append, {}))

    def trial(trial_id: str, run_id: str, **result: object) -> SimpleNamespace:
        config = {"cell": "c", "phase": "search", "sample": 0, "params": {}}
        return SimpleNamespace(
            trial_id=trial_id, config=config, error_file=None, last_result={"mlflow_run_id": run_id, **result}
        )

    cb.on_trial_complete(0, [], trial("a", stopped, step=40, **{"tune/mIoU": 0.3}))
    cb.on_trial_error(0, [], trial("b", died, step=10))
    a, b = client.get_run(stopped), client.get_run(died)
    assert (a.info.status, a.data.tags[TAG_STATUS], a.data.tags["segsweep.stopped_at_step"]) == (
        "FINISHED",
        "stopped_early",
        "40",
    )
    assert (b.info.status, b.data.tags[TAG_STATUS]) == ("FAILED", "failed")
    assert cb.outcomes["a"].status == "stopped_early" and cb.outcomes["b"].status == "failed"
    # a later Ctrl+C cuts short only what was still going: "b" failed for good by itself
    from segsweep.sweep.interrupt import INTERRUPT

    cb.ended_before = set()
    waiting = trial("d", "x")
    try:
        INTERRUPT.set()
        cb.on_trial_error(0, [], trial("e", "no-such-run"))  # failed as the signal reached it
    finally:
        INTERRUPT.clear()
    lines.clear()
    names = [
        t.trial_id
        for t in cb.interrupted_trials([trial("a", stopped), trial("b", died), waiting, trial("e", "-")])
    ]
    assert names == ["d", "e"]

    cb.on_trial_complete(0, [], trial("c", "no-such-run", step=5))
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "  warning: could not close run no-such-run: tracking"
    )


def test_sigterm_and_ctrl_c_stop_a_sweep_alike_and_a_second_one_quits(capsys) -> None:
    """A job scheduler's SIGTERM takes the path of Ctrl+C (the end-to-end test sends SIGINT):
    the first sets the flag the callback hands to Ray Tune, a second quits at once, and the
    handlers before the sweep come back after it."""
    import os
    import signal

    import pytest

    from segsweep.sweep.interrupt import INTERRUPT, signals_caught

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with signals_caught():
            assert not INTERRUPT.is_set()
            os.kill(os.getpid(), sig)
            assert INTERRUPT.is_set()
            assert "interrupted: saving the sweep's state" in capsys.readouterr().err
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
        assert {s: signal.getsignal(s) for s in before} == before
