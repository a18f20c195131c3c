"""The bench's report: its rows and the ratios they hold, the machine and the base config
it measured, the sections it runs and the table ``segsweep bench`` prints.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from segsweep.config import set_dotted
from segsweep.errors import ConfigError
from segsweep.training.devices import usable_cpus

SCHEMA = 1

# The report's sections, in the order they run. ``--only`` picks some: a GPU machine without
# MLflow or Ray installed can still run the rows that need neither ("step,data,flops,gpu").
SECTIONS = ("step", "tracking", "data", "flops", "gpu", "packing", "sweep", "curve")


def check_sections(only: set[str] | None) -> None:
    """``--only``'s names must be sections: one line naming the unknown ones, before anything
    is measured."""
    unknown = set(only or ()) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"--only: unknown section(s) {', '.join(sorted(unknown))}; valid: {', '.join(SECTIONS)}"
        )


@dataclass
class Row:
    """One line of the report: a value, the baseline it is compared with (their ratio) and its
    target, with whether it was met (None: no target, or not measured)."""

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""


@dataclass
class Report:
    """Every row of one bench, with when, on what machine and at what config it ran."""

    schema: int
    date: str
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    complete: bool = False  # False while sections are still to run (or were cut short)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rows": [asdict(r) for r in self.rows]}, indent=2)


def overhead(measured: float, baseline: float) -> float:
    """Relative extra cost of ``measured`` over ``baseline`` (0.03 = 3% slower)."""
    return measured / baseline - 1.0


def speedup(measured: float, baseline: float) -> float:
    return measured / baseline


def check(value: float, limit: float, below: bool = True) -> bool:
    return value <= limit if below else value >= limit


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),  # the share this process may use (affinity, cgroup quota)
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():  # the bench's device: numerics_for made it the current one
        current = torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(current)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(current).total_memory / 2**30, 1)
    return info


def base_config(quick: bool, device: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "method": "supervised",
        "data": {"label_ratio": 0.25, "tune_size": 16, "synthetic": {"num_train": 400, "num_val": 32}},
        "train": {"steps": 40, "batch_size": 16, "eval_every": 10_000, "log_every": 10, "device": device},
        "eval": {"diag_samples": 16, "panel_samples": 4},
        "tracking": {"enabled": False, "experiment": "bench"},
        "hfpl": {"cam_steps": 2},
        "mixandmatch": {"proxy_steps": 2, "mm_steps": 2},
    }
    if quick:
        tree["data"]["synthetic"] = {"num_train": 64, "num_val": 8}
        tree["data"]["tune_size"] = 4
        tree["train"].update(steps=6, batch_size=4)
        tree["model"] = {"decoder_channels": 16}
        tree["eval"] = {"diag_samples": 4, "panel_samples": 2}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return tree


def format_table(report: Report) -> str:
    m = report.machine
    usable = m.get("usable_cpus", m["cpu_count"])  # absent from reports before it was kept
    cpus = f"{m['cpu_count']} CPUs" + (f", {usable} usable" if usable != m["cpu_count"] else "")
    lines = [
        f"segsweep bench, {report.date}, {m.get('gpu') or m['cpu']} ({cpus}), torch {m['torch']}",
        f"{'row':<34}{'value':>12} {'unit':<16}{'vs':>10}{'target':>16}  ok",
    ]
    for r in report.rows:
        value = "-" if r.value is None else f"{r.value:.4g}"
        ratio = "" if r.ratio is None else f"{r.ratio:.3f}x"
        ok = "" if r.passed is None else ("yes" if r.passed else "NO")
        lines.append(f"{r.name:<34}{value:>12} {r.unit:<16}{ratio:>10}{r.target:>16}  {ok}")
        if r.note and r.value is None:
            lines[-1] += f"  ({r.note})"
    return "\n".join(lines)
