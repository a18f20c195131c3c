"""The lines a sweep prints while its trials run: one per ended or retried trial, and every
30 s the phase's counts, elapsed and remaining time, and the best val/mIoU per cell.

Nothing here knows the scheduler: ``ray_tune.SweepCallback`` feeds it what Ray reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from segsweep.sweep.trial import Outcome, TrialOrder

#: Seconds between two progress views.
VIEW_EVERY_S = 30

MARKS = {"finished": "done", "stopped_early": "stop", "failed": "FAIL", "diverged": "NaN!"}


def short(cell_id: str) -> str:
    """'method=fixmatch,ratio=0.0625,seed=0' -> 'fixmatch@0.0625/s0'."""
    parts = dict(p.split("=", 1) for p in cell_id.split(","))
    text = f"{parts.pop('method', '?')}@{parts.pop('ratio', '?')}"
    seed = parts.pop("seed", None)
    extra = ",".join(f"{k.split('.')[-1]}={v}" for k, v in parts.items())
    return text + (f"[{extra}]" if extra else "") + (f"/s{seed}" if seed is not None else "")


def fmt_s(seconds: float) -> str:
    """Minutes and seconds: ``12:05``."""
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def params_text(params: dict[str, Any]) -> str:
    """Searched values by the last part of their key, floats to three digits."""
    return ", ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in params.items()
    )


def ended_line(order: TrialOrder, status: str, result: dict[str, Any], metric: str, error: str) -> str:
    """The line of a trial that ended: ``  done fixmatch... #1 (conf_threshold=0.9)  tune/mIoU 0.41``."""
    what = order.cell + (f" #{order.sample}" if order.phase == "search" else f" seed={order.seed}")
    params = params_text(order.params)
    score = f"{metric} {result[metric]:.4f}" if metric in result else ""
    if status == "stopped_early":
        score += f" at step {result.get('step', '?')}"
    if status == "failed":
        score = error
    return f"  {MARKS[status]:<4} {what}{' (' + params + ')' if params else ''}  {score}"


def retry_line(order: TrialOrder, error: str) -> str:
    return f"  retry  {order.cell} ({order.phase}): {error}; resuming from its last checkpoint"


class LiveView:
    """The progress of one phase: counts of ``outcomes`` (shared with the driver), the best
    val/mIoU seen per cell, and an ETA from the rate at which trials end."""

    def __init__(
        self, phase: str, total: int, echo: Callable[[str], None], outcomes: dict[str, Outcome]
    ) -> None:
        self.phase, self.total, self.echo, self.outcomes = phase, total, echo, outcomes
        self.started_at = time.time()
        self.best: dict[str, float] = {}
        self.last_view = time.time() - VIEW_EVERY_S + 10  # the first view comes ~10 s in
        self.ended_here = 0  # trials this driver saw end (the ETA's rate; not restored ones)

    def note(self, cell: str, val: Any) -> None:
        """A val/mIoU reported by a trial of ``cell`` (shown only: selection uses the tuning split)."""
        if val is not None:
            self.best[cell] = max(self.best.get(cell, 0.0), float(val))

    def due(self, force: bool = False) -> bool:
        """Whether the next view is due now (and, if so, start the next interval)."""
        now = time.time()
        if now - self.last_view < VIEW_EVERY_S and not force:
            return False
        self.last_view = now
        return True

    def show(self, running: int) -> None:
        """Trial counts, elapsed and remaining time, best val/mIoU per cell."""
        done = [o for o in self.outcomes.values() if o.phase == self.phase]
        elapsed = time.time() - self.started_at
        left = self.total - len(done)
        rate = self.ended_here / elapsed  # trials end at a roughly steady rate once the pipeline is full
        eta = f", ~{fmt_s(left / rate)} left" if rate > 0 and left > 0 else ""
        stopped = sum(o.status == "stopped_early" for o in done)
        failed = sum(o.status in ("failed", "diverged") for o in done)
        self.echo(
            f"[{fmt_s(elapsed)}] {self.phase}: {running} running, {len(done) - stopped - failed} finished, "
            f"{stopped} stopped, {failed} failed of {self.total}{eta}"
        )
        if self.best:
            shown = "  ".join(f"{short(c)} {v:.3f}" for c, v in self.best.items())
            self.echo(f"        best val/mIoU so far: {shown}")
