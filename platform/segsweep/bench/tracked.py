"""The ``tracking`` section: what MLflow tracking costs a run, against a SQLite store in this
process and against an MLflow server started on this machine.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segsweep.bench.measure import RunClock, timed_run, tracking_share
from segsweep.bench.report import Report, Row, check, median, overhead
from segsweep.config import RunConfig, validate_run_config
from segsweep.tracking.local_server import local_server, session_members
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.retries import TrackingError


def tracking_rows(
    report: Report, tree: dict[str, Any], steps: int, quick: bool, echo: Callable[[str], None]
) -> None:
    """Metrics every step, panels at each evaluation, against the same run untracked: with
    MLflow's SQLite store in this process, then with the store behind an MLflow server started
    on this machine (training talks HTTP to it, as to the compose deployment's server).
    Untracked and tracked runs alternate (pairs against drift of a shared machine); the
    median pair counts."""
    track_tree = {**tree, "method": "fixmatch"}
    track_tree["train"] = {**tree["train"], "log_every": 1, "eval_every": max(1, steps // 2)}
    track_tree["tracking"] = {"enabled": True, "experiment": "bench"}
    cfg = validate_run_config(track_tree, "bench")
    count = 1 if quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        pairs = tracked_pairs(cfg, f"sqlite:///{tmp}/mlflow.db", count)
    # Then against a server, started only now: idle, it still wakes ten times a second, which
    # the SQLite pairs above should not share their cores with.
    served, why = served_pairs(cfg, count)
    sqlite_rows(report, pairs, steps, echo)
    served_rows(report, served, why, echo)


def served_pairs(cfg: RunConfig, count: int) -> tuple[list[tuple[RunClock, RunClock]], str]:
    """``tracked_pairs`` against an MLflow server started on this machine for them, with the
    server's CPU; none and why where the server will not start (the other rows stand). A
    tracking error once it runs is the tracker's fault and propagates."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        try:
            uri, pid = stack.enter_context(local_server(Path(tmp)))
        except TrackingError as exc:  # no server here: its rows say why; the others stand
            return [], str(exc)

        def server_cpu() -> float | None:
            members = session_members(pid)
            return None if members is None else sum(m.cpu_s for m in members)

        return tracked_pairs(cfg, uri, count, server_cpu), ""


def sqlite_rows(
    report: Report, pairs: list[tuple[RunClock, RunClock]], steps: int, echo: Callable[[str], None]
) -> None:
    """The tracking rows against the SQLite store, from (untracked, tracked) ``pairs`` of a
    ``steps``-step run: training time, CPU share (training thread and writer), open and close."""
    loop_cost = median([overhead(t.train, u.train) for u, t in pairs])
    fixed = median([t.start + t.close - u.start - u.close for u, t in pairs])
    whole = median([overhead(t.total, u.total) for u, t in pairs])
    untracked_train = median([u.train for u, _ in pairs])
    report.add(
        Row(
            "overhead/tracking",
            loop_cost,
            "fraction",
            untracked_train,
            1 + loop_cost,
            "<= 0.02",
            check(loop_cost, 0.02),
            f"training time of a fixmatch run, metrics every step + panels per evaluation, "
            f"SQLite store; median of {len(pairs)} alternating pairs",
        )
    )
    cpu_share = cpu_rows(report, pairs, untracked_train)
    report.add(
        Row(
            "overhead/tracking_open_close",
            fixed,
            "s per run",
            note="opening the MLflow run and writing its last records, once per run",
        )
    )
    report.add(
        Row(
            "overhead/tracking_whole_run",
            whole,
            "fraction",
            median([u.total for u, _ in pairs]),
            1 + whole,
            note=f"the same, opening and closing included, for this {steps}-step run; the fixed "
            "part shrinks as runs get longer",
        )
    )
    echo(
        f"  tracking overhead: {100 * loop_cost:+.1f}% of training time (its time on the training "
        f"thread and the writer's CPU: {100 * cpu_share:.1f}%), plus {fixed:.2f} s per run "
        f"to open and close it ({100 * whole:+.1f}% of this {steps}-step run)"
    )


def cpu_rows(report: Report, pairs: list[tuple[RunClock, RunClock]], untracked_train: float) -> float:
    """What tracking costs free of run-to-run noise: the training thread's time in tracker calls
    plus the writer thread's CPU, and each apart; returns the first (a share of training)."""
    writer_share = median([t.writer_cpu / u.train for u, t in pairs])
    caller_share = median([(t.caller - u.caller) / u.train for u, t in pairs])
    cpu_share = median([tracking_share(u, t) for u, t in pairs])
    report.add(
        Row(
            "overhead/tracking_cpu",
            cpu_share,
            "fraction",
            untracked_train,
            1 + cpu_share,
            "<= 0.02",
            check(cpu_share, 0.02),
            "the time tracking takes, without the run-to-run noise of the row above: the "
            "training thread's wall time inside tracker calls (panels rendered included) plus "
            "the writer thread's CPU, per second of untracked training (the cost when every "
            "core is busy training; the GIL waits of the training thread outside those calls "
            f"are not in it); median of {len(pairs)} pairs",
        )
    )
    report.add(
        Row(
            "overhead/tracking_training_thread",
            caller_share,
            "fraction",
            note="of it, the training thread's own: queueing metrics and rendering the panels",
        )
    )
    report.add(
        Row(
            "overhead/tracking_writer_cpu",
            writer_share,
            "fraction",
            note="CPU seconds of the tracker's writer thread per second of untracked training: "
            "what tracking costs the machine, free of the wall-clock noise of the row above "
            "(which adds contention for the GIL and the cores)",
        )
    )
    return cpu_share


def tracked_pairs(
    cfg: RunConfig, uri: str, count: int, server_cpu: Callable[[], float | None] = lambda: None
) -> list[tuple[RunClock, RunClock]]:
    """``count`` pairs of the run untracked, then tracked at ``uri`` (taking turns against the
    drift of a shared machine); ``server_cpu`` as for ``timed_run``, over both runs (the
    untracked run's reading is the server's idle baseline)."""
    RunTracker(uri, "bench", run_name="warm-up").finish()  # store creation is not the runs' cost
    return [(timed_run(cfg, None, server_cpu), timed_run(cfg, uri, server_cpu)) for _ in range(count)]


def served_rows(
    report: Report, served: list[tuple[RunClock, RunClock]], why: str, echo: Callable[[str], None]
) -> None:
    """``overhead/tracking_cpu`` against the MLflow server, and the server's own CPU (another
    machine's in a deployment, so counted apart); ``why`` the server could not be measured."""
    if not served:
        for name in ("overhead/tracking_cpu_server", "overhead/tracking_server_cpu"):
            report.add(Row(name, None, "fraction", note=f"not measured: {why}"))
        echo(f"  against an MLflow server: not measured ({why})")
        return
    share = median([tracking_share(u, t) for u, t in served])
    report.add(
        Row(
            "overhead/tracking_cpu_server",
            share,
            "fraction",
            median([u.train for u, _ in served]),
            1 + share,
            "<= 0.02",
            check(share, 0.02),
            "as overhead/tracking_cpu, with the store behind an MLflow server on this machine "
            "(no auth, SQLite, local artifacts, 1 worker): the training process sends HTTP "
            f"requests and the store's work is the server's; median of {len(served)} pairs",
        )
    )
    server = [
        (t.server_cpu - u.server_cpu) / u.train
        for u, t in served
        if t.server_cpu is not None and u.server_cpu is not None
    ]
    report.add(
        Row(
            "overhead/tracking_server_cpu",
            median(server) if server else None,
            "fraction",
            note="the server's CPU seconds over a tracked run (opening and closing it included), "
            "less its CPU over the untracked run before it, per second of untracked training: "
            "another machine's in a deployment, here sharing this one's cores"
            + ("" if server else " (not measured: no /proc on this system)"),
        )
    )
    echo(
        f"  the same against an MLflow server: {100 * share:.1f}% on the training side"
        + (f", and the server's CPU: {100 * median(server):.1f}%" if server else "")
    )
