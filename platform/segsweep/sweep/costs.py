"""What a trial costs on a GPU, where it was measured: peak memory and time per step.

The rows of ``reference/gpu_costs.csv`` come from the GPU kit (``make gpu-check``, which
writes ``docs/gpu-costs.csv`` to be copied here) and earlier benchmarks, each naming its
source. ``--dry-run`` sets a sweep's trials against the row of the same architecture,
encoder, crop, method and images per step; where none exists it says so rather than guess.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from segsweep.config import RunConfig

COSTS = Path(__file__).resolve().parents[1] / "reference" / "gpu_costs.csv"


@dataclass(frozen=True)
class Cost:
    gpu: str
    gpu_memory_gib: float
    peak_gib: float
    seconds_per_step: float
    accumulate: int
    source: str


def measured_cost(cfg: RunConfig, path: Path = COSTS) -> Cost | None:
    """The measured row for a trial of ``cfg``, if any (the same model, crop, method and
    labeled + unlabeled images per step)."""
    if not path.is_file():
        return None
    t, m = cfg.train, cfg.model
    unlabeled = (t.unlabeled_batch_size or t.batch_size) if cfg.method != "supervised" else 0
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if (
                row["arch"] == m.arch
                and row["encoder"] == m.encoder
                and int(row["crop"]) == cfg.data.crop_size
                and row["method"] == cfg.method
                and int(row["labeled"]) == t.batch_size
                and int(row["unlabeled"]) == unlabeled
            ):
                return Cost(
                    row["gpu"],
                    float(row["gpu_memory_gib"]),
                    float(row["peak_gib"]),
                    float(row["seconds_per_step"]),
                    int(row["accumulate"]),
                    row["source"],
                )
    return None


def describe_costs(trials: list[tuple[RunConfig, int]]) -> list[str]:
    """Lines for ``--dry-run``: per measured (method, crop), peak memory, hours per trial and
    whether the batch fits one GPU; the rest named together as not measured."""
    lines: dict[tuple[str, int], str] = {}
    unmeasured: dict[tuple[str, str, int, int], list[str]] = {}
    for cfg, steps in trials:
        t, m = cfg.train, cfg.model
        cost = measured_cost(cfg)
        if cost is None:
            methods = unmeasured.setdefault((m.arch, m.encoder, cfg.data.crop_size, t.batch_size), [])
            methods += [cfg.method] if cfg.method not in methods else []
            continue
        hours = steps * cost.seconds_per_step / 3600
        # Activations dominate: a micro-batch of 1/k holds about 1/k of them.
        parts = max(1, math.ceil(cost.peak_gib * cost.accumulate / (0.9 * cost.gpu_memory_gib)))
        fits = "fits one GPU" if parts <= t.accumulate else f"does not fit: set train.accumulate {parts}"
        lines.setdefault(
            (cfg.method, cfg.data.crop_size),
            f"{cfg.method} at {cfg.data.crop_size} px: {cost.peak_gib:.1f} GiB peak on {cost.gpu} "
            f"({cost.gpu_memory_gib:.0f} GiB), {hours:.1f} h for {steps:,} steps; {fits} ({cost.source})",
        )
    for (arch, encoder, crop, batch), methods in unmeasured.items():
        lines[(arch, crop)] = (
            f"{arch} {encoder} at {crop} px, {batch} labeled per step ({', '.join(methods)}): GPU memory "
            "and hours not measured yet (make gpu-check on a GPU machine); where a step runs out of "
            "memory, train.accumulate 2 holds half the activations at the same batch, learning rate "
            "and schedule"
        )
    return list(lines.values())
