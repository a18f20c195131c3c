"""What a spawned test process runs: kept apart from the test modules, whose imports (torch,
hypothesis, the fixtures) would cost each of several processes seconds and hundreds of MB."""

from __future__ import annotations

from segsweep.tracking.mlflow_writer import RunTracker


def write_metrics(uri: str, index: int, steps: int) -> None:
    """One run of ``steps`` steps, ten metrics each, flushed every 25 steps."""
    tracker = RunTracker(uri, "concurrent", run_name=f"w{index}")
    for step in range(steps):
        tracker.log_metrics({f"m{k}": float(step * 10 + k) for k in range(10)}, step)
        if step % 25 == 0:
            tracker.flush()
    tracker.finish("FINISHED", "finished")
