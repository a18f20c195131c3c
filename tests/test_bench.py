"""The bench's own logic on a tiny CPU config: report schema and ratios (no time is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segsweep.bench import check, format_table, overhead, run_bench, speedup, steady_seconds_per_trial

from .helpers import segsweep


def test_ratio_arithmetic() -> None:
    assert overhead(1.03, 1.0) == pytest.approx(0.03)
    assert overhead(0.5, 1.0) == pytest.approx(-0.5)
    assert speedup(30.0, 10.0) == 3.0
    assert check(0.02, 0.03) and not check(0.04, 0.03)
    assert check(2.5, 2.0, below=False) and not check(1.5, 2.0, below=False)


def test_steady_state_ignores_the_start_up_before_the_first_trial_ends() -> None:
    # 2 slots; the first trial ends after a 30 s start-up, then one ends every 0.5 s: each
    # trial holds a slot for 1 s, however long the start-up was
    ends = [31.0, 30.0, 32.0, 30.5, 31.5]  # in any order
    assert steady_seconds_per_trial(ends, 2) == pytest.approx(1.0)
    assert steady_seconds_per_trial([5.0, 7.0], 1) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        steady_seconds_per_trial([1.0], 2)


def test_report_schema_and_consistent_ratios(cache_dir: Path) -> None:
    report = run_bench(
        quick=True, methods=["supervised", "fixmatch"], sweep=False, echo=lambda _m: None, peak_tflops=1.0
    )
    rows = {r.name: r for r in report.rows}
    for name in (
        "step/bare",
        "step/supervised",
        "step/fixmatch",
        "overhead/supervised_vs_bare",
        "overhead/tracking",
        "overhead/tracking_open_close",
        "overhead/tracking_whole_run",
        "overhead/tracking_writer_cpu",
        "data/loader_workers0",
        "data/loader_workers2",
        "data/wait_share_workers0",
        "data/wait_share_workers2",
        "flops/per_step",
        "flops/achieved",
        "flops/mfu",
        "memory/peak_rss",
        "gpu/bf16",
        "gpu/compile",
        "gpu/packing",
        "report/curve_100_runs",
    ):
        assert name in rows, name
    bare, sup = rows["step/bare"].value, rows["step/supervised"].value
    assert rows["step/supervised"].ratio == pytest.approx(sup / bare)
    cost = rows["overhead/supervised_vs_bare"]
    assert cost.value == pytest.approx(bare / sup - 1, rel=1e-6)  # one pair (quick): from throughputs
    assert cost.ratio == pytest.approx(1 + cost.value)
    assert cost.passed == (cost.value <= 0.03)
    track = rows["overhead/tracking"]
    assert track.ratio == pytest.approx(1 + track.value) and track.passed == (track.value <= 0.02)
    assert rows["overhead/tracking_open_close"].value > 0  # an MLflow run costs something to open
    assert 0 < rows["overhead/tracking_writer_cpu"].value < 1  # the writer's CPU, per training second
    assert rows["flops/per_step"].value > 0 and 0 < rows["flops/mfu"].value
    assert rows["flops/achieved"].value == pytest.approx(rows["flops/per_step"].value * bare / 4, rel=1e-6)
    assert rows["gpu/bf16"].value is None and "no CUDA" in rows["gpu/bf16"].note  # never guessed
    payload = json.loads(report.to_json())
    assert payload["schema"] == 1 and payload["machine"]["cpu_count"] >= 1
    assert {"name", "value", "unit", "baseline", "ratio", "target", "passed", "note"} == set(
        payload["rows"][0]
    )
    assert "overhead/supervised_vs_bare" in format_table(report)


def test_cli_writes_the_json_report(cache_dir: Path, tmp_path: Path) -> None:
    proc = segsweep(
        "bench", "--quick", "--no-sweep", "--methods", "supervised", "--json", "out/bench.json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "out/bench.json").read_text())
    assert data["config"]["quick"] is True and any(r["name"] == "step/bare" for r in data["rows"])
    bad = segsweep("bench", "--methods", "mixmatch", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown method 'mixmatch'" in bad.stderr
