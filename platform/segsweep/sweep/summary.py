"""What a sweep says and logs when it ends: the best trial per cell (printed, and as the
parent run's ``best_per_cell.csv``), outcome counts, each searched knob's importance, the
final runs' mean and spread over seeds, and what one seed per cell can say."""

from __future__ import annotations

import json
from collections.abc import Callable

from segsweep.sweep.live import short
from segsweep.sweep.spec import Plan
from segsweep.sweep.trial import Outcome
from segsweep.tracking.mlflow_writer import RunTracker


def best_per_cell(outcomes: dict[str, Outcome], mode: str, phase: str = "search") -> dict[str, Outcome]:
    """The finished trial of each cell with the best tuning metric."""
    best: dict[str, Outcome] = {}
    sign = 1 if mode == "max" else -1
    for o in outcomes.values():
        if o.phase != phase or o.status != "finished" or o.metric is None:
            continue
        if o.cell not in best or sign * o.metric > sign * best[o.cell].metric:  # type: ignore[operator]
            best[o.cell] = o
    return best


def summarise(
    parent: RunTracker,
    plan: Plan,
    outcomes: dict[str, Outcome],
    best: dict[str, Outcome],
    echo: Callable[[str], None],
    importances: dict[str, dict[str, float]],
) -> None:
    """Print the sweep's closing table and counts; log them to its parent run."""
    counts = {"finished": 0, "stopped_early": 0, "failed": 0, "diverged": 0}
    for o in outcomes.values():
        counts[o.status] = counts.get(o.status, 0) + 1
    parent.log_metrics({f"trials/{k}": v for k, v in counts.items()}, 0)
    _best_table(parent, plan, outcomes, best, echo)
    if importances:  # which searched knob mattered, per cell (Optuna's fANOVA)
        parent.log_text(json.dumps(importances, indent=2), "optuna_importances.json")
        parent.log_metrics(
            {f"importance/{short(c)}/{k}": v for c, imp in importances.items() for k, v in imp.items()}, 0
        )
    _final_spread(plan, outcomes, echo)
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


def _best_table(
    parent: RunTracker,
    plan: Plan,
    outcomes: dict[str, Outcome],
    best: dict[str, Outcome],
    echo: Callable[[str], None],
) -> None:
    """Per cell: its search trials, the best one's tuning metric, val/mIoU and values."""
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


def _final_spread(plan: Plan, outcomes: dict[str, Outcome], echo: Callable[[str], None]) -> None:
    """The final runs' val/mIoU per cell: mean ± standard deviation over seeds."""
    # Finished ones only: a failed trial's val is its last intermediate report's.
    finals = [
        o for o in outcomes.values() if o.phase == "final" and o.status == "finished" and o.val is not None
    ]
    if not finals:
        return
    echo("")
    echo("final runs, val/mIoU (last evaluation) over seeds:")
    for cell in plan.cells:
        vals = [o.val for o in finals if o.cell == cell.id]
        if vals:
            mean = sum(vals) / len(vals)  # type: ignore[arg-type]
            std = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5  # type: ignore[operator]
            echo(f"  {cell.id:<46} {mean:.4f} ± {std:.4f} (n={len(vals)})")
