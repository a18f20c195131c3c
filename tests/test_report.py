"""Curves: which runs count, aggregation over seeds, paired differences with known answers,
and the published-table overlay."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from segsweep.report import (
    build_curve,
    compare,
    format_table,
    paired_differences,
    published_table,
    select_rows,
    write_outputs,
)
from segsweep.tracking import RunRecord


def run(
    method: str,
    ratio: float,
    seed: int,
    miou: float,
    *,
    phase: str = "",
    cell: str = "",
    tune: float = 0.0,
    family: str = "generated/seed0",
    dataset: str = "synthetic",
    status: str = "finished",
    at_best_tune: float | None = None,
) -> RunRecord:
    tags = {"segsweep.status": status, "segsweep.split_family": family}
    if phase:
        tags["segsweep.phase"] = phase
    if cell:
        tags["segsweep.cell"] = cell
    metrics = {"val/mIoU_last": miou, "tune/mIoU_best": tune, "val/mIoU_best": miou + 0.2}
    if at_best_tune is not None:
        metrics["val/mIoU_at_best_tune"] = at_best_tune
    return RunRecord(
        f"{method}-{ratio}-{seed}-{phase}-{tune}",
        "1",
        "",
        "FINISHED",
        0,
        {
            "method": method,
            "label_ratio": str(ratio),
            "seed": str(seed),
            "dataset": dataset,
            "n_labeled": "10",
        },
        metrics,
        tags,
    )


def test_final_runs_are_used_when_a_sweep_has_them() -> None:
    runs = [
        run("fixmatch", 0.1, 0, 0.50, phase="search", cell="c1", tune=0.4),
        run("fixmatch", 0.1, 1, 0.52, phase="final"),
        run("fixmatch", 0.1, 2, 0.56, phase="final"),
        run("fixmatch", 0.1, 3, 0.90, phase="final", status="stopped_early"),  # never counted
    ]
    rows = select_rows(runs)
    assert [r.seed for r in rows] == [1, 2]
    curve = build_curve(runs)
    [s] = curve.summary
    assert s.mean == pytest.approx(0.54) and s.std == pytest.approx(math.sqrt(0.0008)) and s.n == 2


def test_without_final_runs_each_cell_contributes_its_best_tuned_trial() -> None:
    runs = [
        run("fixmatch", 0.1, 0, 0.60, phase="search", cell="c1", tune=0.30),
        run("fixmatch", 0.1, 0, 0.50, phase="search", cell="c1", tune=0.45),  # best on tune
        run("supervised", 0.1, 0, 0.40, phase="search", cell="c2", tune=0.2),
    ]
    rows = select_rows(runs)
    assert {(r.method, r.mIoU) for r in rows} == {("fixmatch", 0.50), ("supervised", 0.40)}


def test_value_rule_never_uses_the_best_evaluation_on_the_reported_split() -> None:
    runs = [run("supervised", 0.1, s, 0.4, at_best_tune=0.35) for s in range(2)]
    assert {r.mIoU for r in select_rows(runs, "last")} == {0.4}
    assert {r.mIoU for r in select_rows(runs, "best_tune")} == {0.35}
    with pytest.raises(Exception, match="unknown rule"):
        select_rows(runs, "best")


def test_paired_difference_has_the_known_t_interval() -> None:
    a, b = [0.51, 0.62, 0.73], [0.50, 0.60, 0.70]  # per-seed gains 0.01, 0.02, 0.03
    m, lo, hi, p = compare(a, b, paired=True)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert m == pytest.approx(0.02)
    assert (lo, hi) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert p == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_unpaired_difference_is_welchs_test() -> None:
    a, b = [0.50, 0.55, 0.61, 0.58], [0.40, 0.49, 0.45]
    m, lo, hi, p = compare(a, b, paired=False)
    assert m == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert lo < m < hi


def test_runs_are_paired_by_seed_when_both_methods_have_them() -> None:
    runs = [run("supervised", 0.1, s, 0.40 + 0.05 * s, phase="final") for s in range(3)]
    runs += [run("fixmatch", 0.1, s, 0.43 + 0.05 * s, phase="final") for s in range(3)]
    [d] = paired_differences(select_rows(runs))
    assert d.paired and d.n == 3 and d.mean_diff == pytest.approx(0.03)
    assert d.ci_low == pytest.approx(0.03) and d.ci_high == pytest.approx(0.03)  # identical gains: no spread
    unpaired = [r for r in runs if not (r.params["method"] == "fixmatch" and r.params["seed"] != "0")]
    unpaired += [run("fixmatch", 0.1, 7, 0.5, phase="final"), run("fixmatch", 0.1, 8, 0.52, phase="final")]
    [d] = paired_differences(select_rows(unpaired))
    assert not d.paired and d.n == 3


def test_variants_of_one_method_are_separate_curves_each_paired_with_the_baseline() -> None:
    # An ablation spec's variants (mixandmatch with and without its M&M stage) share a method
    # name: pooled, they would blur the very comparison the ablation exists for.
    gains = {"False": 0.01, "True": 0.04}
    runs = [
        run("supervised", 0.1, s, 0.40 + 0.01 * s, cell=f"method=supervised,ratio=0.1,seed={s}")
        for s in range(3)
    ]
    for mm, gain in gains.items():
        runs += [
            run(
                "mixandmatch",
                0.1,
                s,
                0.40 + 0.01 * s + gain,
                cell=f"method=mixandmatch,ratio=0.1,mixandmatch.mm={mm},seed={s}",
            )
            for s in range(3)
        ]
    curve = build_curve(runs)
    assert {(s.method, s.n) for s in curve.summary} == {
        ("supervised", 3),
        ("mixandmatch (mm=False)", 3),
        ("mixandmatch (mm=True)", 3),
    }
    got = {d.method: (d.n, d.paired, d.mean_diff) for d in curve.differences}
    assert got == {
        "mixandmatch (mm=False)": (3, True, pytest.approx(0.01)),
        "mixandmatch (mm=True)": (3, True, pytest.approx(0.04)),
    }
    assert "mixandmatch (mm=True)" in format_table(curve)


def test_published_points_overlay_runs_on_the_published_voc_splits(tmp_path: Path) -> None:
    table = published_table()
    assert table and all(row["source"] for row in table)
    runs = []
    for split, ratio in (("92", 92 / 10582), ("183", 183 / 10582)):
        for seed in range(2):
            runs.append(
                run(
                    "supervised",
                    ratio,
                    seed,
                    0.40 + 0.01 * seed,
                    phase="final",
                    family=f"published/pascal/{split}",
                    dataset="voc",
                )
            )
    curve = build_curve(runs)
    published_92 = next(
        float(r["mIoU"]) for r in table if r["method"] == "supervised" and r["split"] == "pascal/92"
    )
    s92 = next(s for s in curve.summary if s.label_ratio == pytest.approx(92 / 10582))
    assert s92.published == pytest.approx(published_92 / 100)
    assert s92.delta_vs_published == pytest.approx(0.405 - published_92 / 100)
    assert {"unimatch", "supervised"} <= {p["method"] for p in curve.published}
    files = write_outputs(curve, tmp_path, "voc")
    assert (tmp_path / "curve.png").stat().st_size > 10_000 and len(files) == 4
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("method,label_ratio,mean,std,n,published,delta_vs_published")
    # synthetic runs have no published counterpart: nothing is overlaid
    assert build_curve([run("supervised", 0.1, 0, 0.4)]).published == []
