"""Curves: which runs count, aggregation over seeds, paired differences with known answers,
and the published-table overlay."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from segsweep.reports.curve import (
    build_curve,
    compare,
    format_table,
    paired_differences,
    select_rows,
    write_outputs,
)
from segsweep.reports.published import published_table
from segsweep.tracking.store import RunRecord

from .helpers import store_with_two_sweeps_named_alike


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
    tune_last: float | None = None,
    parent: str = "",
    start: int = 0,
    encoder: str = "",
) -> RunRecord:
    """A run as fetch_runs reads it; a sweep's runs (``phase``) carry their cell, as trials do."""
    tags = {"segsweep.status": status, "segsweep.split_family": family}
    if phase:
        tags["segsweep.phase"] = phase
    if phase or cell:
        tags["segsweep.cell"] = cell or f"method={method},ratio={ratio},seed=0"
    if parent:
        tags["mlflow.parentRunId"] = parent
    metrics = {"val/mIoU_last": miou, "tune/mIoU_best": tune, "val/mIoU_best": miou + 0.2}
    metrics["tune/mIoU_last"] = tune if tune_last is None else tune_last
    if at_best_tune is not None:
        metrics["val/mIoU_at_best_tune"] = at_best_tune
    params = {
        "method": method,
        "label_ratio": str(ratio),
        "seed": str(seed),
        "dataset": dataset,
        "n_labeled": "10",
    }
    if encoder:
        params["model.encoder"] = encoder
    return RunRecord(
        f"{method}-{ratio}-{seed}-{phase}-{tune}-{parent}-{start}",
        "1",
        "",
        "FINISHED",
        start,
        params,
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


def test_the_best_trial_is_chosen_by_the_tune_score_of_the_value_rule() -> None:
    # trial A is best on tune at its last evaluation, B at its best one: the rule decides,
    # and under "last" the curve agrees with the sweep (which ranks by the last tune/mIoU)
    runs = [
        run("fixmatch", 0.1, 0, 0.50, phase="search", tune=0.40, tune_last=0.39, at_best_tune=0.5),
        run("fixmatch", 0.1, 0, 0.60, phase="search", tune=0.30, tune_last=0.30, at_best_tune=0.6),
    ]
    runs[1] = RunRecord(
        *[getattr(runs[1], f) for f in ("run_id", "experiment_id", "name", "status")],
        0,
        runs[1].params,
        runs[1].metrics,
        runs[1].tags,
    )
    assert [r.mIoU for r in select_rows(runs, "last")] == [0.50]
    runs[0].metrics["tune/mIoU_last"] = 0.20  # A's last tune score now below B's
    assert [r.mIoU for r in select_rows(runs, "last")] == [0.60]
    assert [r.mIoU for r in select_rows(runs, "best_tune")] == [0.5]  # A: best tune 0.40 > 0.30


def test_each_sweep_contributes_by_its_own_phases_and_plain_runs_always_count() -> None:
    runs = [  # sweep P1 has final runs; sweep P2 searched only; two plain runs
        run("fixmatch", 0.1, 1, 0.52, phase="final", parent="P1"),
        run("fixmatch", 0.1, 0, 0.50, phase="search", parent="P1", tune=0.9),  # P1 has finals
        run("supervised", 0.1, 0, 0.41, phase="search", parent="P2", tune=0.2),
        run("supervised", 0.1, 0, 0.45, phase="search", parent="P2", tune=0.3),  # P2's best
        run("guidedmix", 0.1, 0, 0.47),
        run("guidedmix", 0.1, 1, 0.49),
    ]
    rows = select_rows(runs)
    assert sorted((r.method, r.seed, r.mIoU) for r in rows) == [
        ("fixmatch", 1, 0.52),
        ("guidedmix", 0, 0.47),
        ("guidedmix", 1, 0.49),
        ("supervised", 0, 0.45),
    ]


def test_a_measurement_repeated_by_a_newer_sweep_counts_once_the_newest() -> None:
    old = [run("fixmatch", 0.1, s, 0.40, phase="final", parent="old", start=1) for s in range(3)]
    new = [run("fixmatch", 0.1, s, 0.50 + 0.01 * s, phase="final", parent="new", start=2) for s in range(3)]
    base = [run("supervised", 0.1, s, 0.30, phase="final", parent="new", start=2) for s in range(3)]
    curve = build_curve(old + new + base)
    [fix] = [s for s in curve.summary if s.method == "fixmatch"]
    assert fix.n == 3 and fix.mean == pytest.approx(0.51)  # not n=6, not pooled with the old
    [diff] = curve.differences
    assert diff.n == 3 and diff.mean_diff == pytest.approx(0.21)  # the same runs as the table
    assert any("3 run(s) repeat" in note for note in curve.notes)


def test_split_seeds_are_replicates_of_one_arm_and_a_missing_baseline_is_said() -> None:
    runs = []
    for split_seed in (0, 1):
        for method, value in (("supervised", 0.30), ("fixmatch", 0.40)):
            r = run(
                method,
                0.1,
                0,
                value + 0.01 * split_seed,
                cell=f"method={method},ratio=0.1,data.split_seed={split_seed},seed=0",
            )
            r.params["data.split_seed"] = str(split_seed)
            runs.append(r)
    runs.append(run("fixmatch", 0.5, 0, 0.6, cell="method=fixmatch,ratio=0.5,seed=0"))
    curve = build_curve(runs)
    assert {(s.method, s.label_ratio, s.n) for s in curve.summary} == {
        ("supervised", 0.1, 2),
        ("fixmatch", 0.1, 2),
        ("fixmatch", 0.5, 1),
    }
    [diff] = curve.differences
    assert diff.method == "fixmatch" and diff.n == 2 and diff.paired
    assert curve.notes == ["no supervised runs at ratio 0.5: no differences there"]


def test_the_published_point_is_on_the_same_lists_and_prefers_the_runs_backbone() -> None:
    def cs_runs(method: str, encoder: str) -> list[RunRecord]:
        family, ratio = "published/cityscapes/1_16", 186 / 2975
        return [
            run(method, ratio, s, 0.6, phase="final", family=family, dataset="cityscapes", encoder=encoder)
            for s in range(2)
        ]

    table = published_table()
    # U2PL's own Cityscapes numbers are on other image lists under the same name: never used
    [r50] = [s for s in build_curve(cs_runs("supervised", "resnet50")).summary]
    assert (r50.published, r50.published_backbone) == (pytest.approx(0.633), "ResNet-50")
    assert "UniMatch" in r50.published_source
    [r101] = [s for s in build_curve(cs_runs("supervised", "tu-resnet101")).summary]
    assert (r101.published, r101.published_backbone) == (pytest.approx(0.663), "ResNet-101")
    assert not any("DIFFER" in p["note"] for p in build_curve(cs_runs("u2pl", "resnet101")).published)
    # a quoted table value (ScaleMatch) before a training-log maximum, whatever the table order
    logs = [p for p in table if "TRAINING-LOG" in p["note"] and p["split"] == "pascal/u2pl_1_16"]
    assert logs  # the case exists in the shipped table
    voc = [
        run(
            "unimatch",
            662 / 10582,
            s,
            0.7,
            phase="final",
            family="published/pascal/u2pl_1_16",
            dataset="voc_aug",
            encoder="resnet101",
        )
        for s in range(2)
    ]
    [u] = build_curve(voc).summary
    assert u.published == pytest.approx(0.809) and "ScaleMatch" in u.published_source


def test_runs_of_unequal_budgets_are_said() -> None:
    a, b = run("supervised", 0.1, 0, 0.4), run("fixmatch", 0.1, 0, 0.5)
    assert build_curve([a, b]).notes == []
    a.params["train.steps"], b.params["train.steps"] = "60", "80"
    a.params["train.batch_size"] = b.params["train.batch_size"] = "16"
    assert build_curve([a, b]).notes == [
        "the runs differ in budget (train.steps x train.batch_size: 60x16, 80x16): "
        "their differences compare unequal training"
    ]


def test_runs_on_other_backbones_are_not_repeats_of_each_other() -> None:
    runs = [
        run("supervised", 0.1, 0, 0.40, encoder="resnet50"),
        run("supervised", 0.1, 0, 0.45, encoder="resnet101"),
    ]
    curve = build_curve(runs)
    assert len(curve.rows) == 2 and not any("repeat" in note for note in curve.notes)


@pytest.mark.slow
def test_curve_of_one_sweep_of_an_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--sweep picks one sweep by run id (a name two sweeps share is refused, naming both),
    and the outputs are logged to that sweep's parent; without it, every sweep counts."""
    import csv

    from segsweep.cli import main
    from segsweep.tracking.store import client_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old, new = store_with_two_sweeps_named_alike(uri, "e")

    def fixmatch_row(out: str) -> dict:
        with open(tmp_path / out / "summary.csv") as f:
            return next(r for r in csv.DictReader(f) if r["method"] == "fixmatch")

    common = ["curve", "--experiment", "e", "--tracking-uri", uri]
    assert main([*common, "--sweep", old, "--out", str(tmp_path / "old")]) == 0
    assert float(fixmatch_row("old")["mean"]) == pytest.approx(0.40)  # the old sweep alone
    out = capsys.readouterr().out
    assert f"logged to the sweep's parent run {old}" in out and "covers the" not in out
    client = client_for(uri)
    assert [f.path for f in client.list_artifacts(old, "curve")] and not client.list_artifacts(new, "curve")

    assert main([*common, "--out", str(tmp_path / "all")]) == 0  # both: the newest run counts
    assert float(fixmatch_row("all")["mean"]) == pytest.approx(0.51)
    out = capsys.readouterr().out
    assert "note: the curve covers the 2 sweeps of experiment 'e'" in out
    assert f"logged to the newest sweep's parent run {new}" in out

    monkeypatch.chdir(tmp_path)  # by default, one sweep's outputs go beside the experiment's
    assert main([*common, "--sweep", old, "--no-log"]) == 0 and main([*common, "--no-log"]) == 0
    assert (tmp_path / "reports" / f"e@{old}" / "summary.csv").is_file()
    assert (tmp_path / "reports" / "e" / "summary.csv").is_file()
    capsys.readouterr()

    assert main([*common, "--sweep", "s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 sweeps of experiment 'e' are named 's'" in err[0]
    assert old in err[0] and new in err[0]
    assert main([*common, "--sweep", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--sweep: no sweep 'nope' in experiment 'e'; its sweeps: s (" in err


def test_the_best_evaluation_on_val_is_kept_beside_the_value_never_as_it() -> None:
    """What the published tables report (the best evaluation over training on val) is each
    summary's ``best_on_val``; the curve's value stays the rule's."""
    from segsweep.reports.curve import Row, summarise

    rows = [
        Row("fixmatch", "voc", 0.1, 92, seed, last, best_on_val=best)
        for seed, last, best in ((0, 0.60, 0.64), (1, 0.62, 0.66))
    ]
    (summary,) = summarise(rows)
    assert summary.mean == pytest.approx(0.61) and summary.best_on_val == pytest.approx(0.65)
    rows.append(Row("fixmatch", "voc", 0.1, 92, 2, 0.61))  # a run that logged no best
    assert summarise(rows)[0].best_on_val is None


def test_published_split_lists_are_points_of_one_curve_and_other_crops_their_own_arm() -> None:
    """voc_classic's cells name a split list each: one arm per method across the lists.
    voc_blended's U2PL lists run at 513 px: their own arm, set against supervised-only at
    513 px, never pooled with the 321 px point of the same ratio."""
    from segsweep.reports.curve import Row, arm_of_cell, paired_differences, summarise

    assert arm_of_cell("method=fixmatch,ratio=0.0087,data.split=unimatch/pascal/92,seed=0") == "fixmatch"
    u2pl = "method=fixmatch,ratio=0.0625,data.split=unimatch/pascal/u2pl_1_16,data.crop_size=513,seed=0"
    assert arm_of_cell(u2pl) == "fixmatch (data.crop_size=513)"
    rows = [
        Row(arm, "voc_aug", 0.0625, 662, 0, value, split_family=family)
        for arm, value, family in (
            ("supervised", 0.60, "published/pascal/1_16"),
            ("fixmatch", 0.66, "published/pascal/1_16"),
            ("supervised (data.crop_size=513)", 0.70, "published/pascal/u2pl_1_16"),
            ("fixmatch (data.crop_size=513)", 0.74, "published/pascal/u2pl_1_16"),
        )
    ]
    assert {(s.method, s.n) for s in summarise(rows)} == {(r.method, 1) for r in rows}
    diffs = {d.method: (d.baseline, round(d.mean_diff, 4)) for d in paired_differences(rows)}
    assert diffs == {
        "fixmatch": ("supervised", 0.06),
        "fixmatch (data.crop_size=513)": ("supervised (data.crop_size=513)", 0.04),
    }
