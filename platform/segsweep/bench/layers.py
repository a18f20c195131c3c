"""The ``sweep`` and ``curve`` sections: the layers above training. A Ray Tune sweep of trivial
trials (start-up, per-trial scheduling and tracking) and a curve read back from many runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from segsweep.bench.report import Report, Row, base_config, check
from segsweep.config import validate_run_config
from segsweep.tracking.protocol import NullTracker
from segsweep.training.devices import usable_cpus
from segsweep.training.runner import prepare


def steady_seconds_per_trial(ends: list[float], concurrency: int) -> float:
    """Slot-seconds one trial occupies at steady state: with ``concurrency`` slots, trials end
    every (last end - first end) / (n - 1) seconds once the pipeline is full; the first end
    carries the one-off start (workers, imports) and is the origin, not an interval."""
    ends = sorted(ends)
    if len(ends) < 2:
        raise ValueError("at least two trial end times are needed")
    return (ends[-1] - ends[0]) / (len(ends) - 1) * concurrency


def sweep_rows(report: Report, quick: bool, echo: Callable[[str], None]) -> None:
    """Ray start, the first trial's start-up, and per-trial scheduling + tracking cost at
    steady state, from a sweep of trivial trials (1 step and 1 evaluation each)."""
    import yaml

    from segsweep.sweep.driver import run_sweep
    from segsweep.sweep.spec import plan_sweep
    from segsweep.tracking.store import fetch_runs
    from segsweep.tracking.tags import TAG_KIND

    n = 8 if quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        base = base_config(True, "cpu")
        base["train"].update(steps=1, eval_every=1)
        base.pop("tracking")
        spec = {
            "name": "bench",
            "base": base,
            "grid": {"method": ["supervised"], "data.label_ratio": [0.5], "seed": list(range(n))},
            "early_stop": {"enabled": False},
            "resources": {"cpus_per_trial": 1},
        }
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(spec))
        uri = f"sqlite:///{tmp}/mlflow.db"
        cwd = Path.cwd()
        os.chdir(tmp)
        try:
            plan = plan_sweep(path, tracking_uri=uri)
            began = time.time()
            result = run_sweep(plan, Path(tmp) / "sweeps", echo=lambda _m: None)
            trials = [r for r in fetch_runs(uri, "bench") if r.tags.get(TAG_KIND) != "sweep"]
            # One trivial trial's own work, untracked and unscheduled, in this process.
            cfg = validate_run_config({**plan.cells[0].tree, "tracking": {"enabled": False}}, "bench")
            start = time.perf_counter()
            prepared = prepare(cfg)
            prepared.trainer.run(Path(tmp) / "solo", NullTracker())
            compute = time.perf_counter() - start
        finally:
            os.chdir(cwd)
            import ray

            ray.shutdown()
    concurrency = max(1, min(n, usable_cpus()))
    per_trial = steady_seconds_per_trial([r.end_time / 1000 for r in trials], concurrency)
    cost = per_trial - compute
    first_start = min(r.start_time for r in trials) / 1000 - began - result.seconds["ray_init"]
    report.add(Row("sweep/ray_start", result.seconds["ray_init"], "s", note="local Ray, once per sweep"))
    report.add(
        Row(
            "sweep/first_trial_start",
            first_start,
            "s",
            note="once per worker: process start, imports (torch, Ray, MLflow), dataset, model",
        )
    )
    report.add(
        Row(
            "sweep/per_trial_overhead",
            cost,
            "s",
            compute,
            per_trial / compute,
            "< 1",
            check(cost, 1.0),
            f"{n} trivial trials, {concurrency} at once, steady state (from the first trial end to "
            "the last): slot-seconds per trial minus the trial's own compute (model build, 1 step, "
            "evaluation)",
        )
    )
    amortised = result.seconds["search"] * concurrency / n - compute
    report.add(
        Row(
            "sweep/per_trial_overhead_amortised",
            amortised,
            "s",
            note=f"the same over the whole search phase, start-up included, shared by {n} trials",
        )
    )
    echo(f"  sweep: {cost:.2f} s of scheduling + tracking per trial at steady state")


def curve_row(report: Report, count: int, echo: Callable[[str], None]) -> None:
    """Read ``count`` runs back from a SQLite store and draw the curve (bulk queries)."""
    from mlflow.entities import Metric, Param, RunTag

    from segsweep.reports import curve as curves
    from segsweep.tracking.store import client_for, ensure_experiment, fetch_runs
    from segsweep.tracking.tags import TAG_PHASE, TAG_STATUS

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = client_for(uri)
        exp = ensure_experiment(client, "curve-bench", uri)
        for i in range(count):
            run = client.create_run(exp, tags={TAG_PHASE: "final"})
            method, ratio, seed = ("supervised", "fixmatch")[i % 2], (0.0625, 0.25, 0.5)[i // 2 % 3], i // 6
            client.log_batch(
                run.info.run_id,
                metrics=[Metric("val/mIoU_last", 0.3 + 0.1 * ratio + 0.01 * (i % 2), 0, 1)],
                params=[
                    Param("method", method),
                    Param("label_ratio", str(ratio)),
                    Param("seed", str(seed)),
                    Param("dataset", "synthetic"),
                ],
                tags=[RunTag(TAG_STATUS, "finished")],
            )
            client.set_terminated(run.info.run_id, "FINISHED")
        start = time.perf_counter()
        curve = curves.build_curve(fetch_runs(uri, "curve-bench"))
        curves.write_outputs(curve, Path(tmp) / "out", "bench")
        seconds = time.perf_counter() - start
    report.add(
        Row(
            f"report/curve_{count}_runs",
            seconds,
            "s",
            target="a few seconds",
            passed=seconds < 10,
            note="read every run in bulk, aggregate, paired differences, plot, CSVs",
        )
    )
    echo(f"  curve over {count} runs: {seconds:.2f} s")
