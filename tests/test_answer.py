"""A sweep's answer where the MLflow UI shows it: counted runs tagged, the parent's
description, the curve's files, a stored comparison view; run names and colours."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segsweep.reports.answer import COUNTED_FILTER, TAG_COUNTED, description, publish, ui_base_url
from segsweep.reports.curve import METHOD_COLOURS, build_curve, method_colour
from segsweep.sweep.spec import ratio_text, trial_run_name
from segsweep.tracking.mlflow_writer import RunTracker
from segsweep.tracking.store import fetch_runs


def make_sweep(uri: str, experiment: str) -> tuple[str, dict[tuple[str, float, int], str]]:
    """A finished sweep: two methods x two ratios, seed 0, two search trials per cell (the
    second better on the tuning split). Returns the parent's id and each trial's run id."""
    parent = RunTracker(uri, experiment, run_name=experiment, tags={"segsweep.kind": "sweep"})
    ids = {}
    for method, gain in (("supervised", 0.0), ("fixmatch", 0.03)):
        for ratio in (0.0625, 0.25):
            for sample, tune in ((0, 0.30), (1, 0.35)):
                values = {"method": method, "data.label_ratio": ratio, "seed": 0}
                t = RunTracker(
                    uri,
                    experiment,
                    run_name=trial_run_name(values, "search", sample),
                    parent_run_id=parent.run_id,
                    tags={
                        "segsweep.phase": "search",
                        "segsweep.split_family": "generated/seed0",
                        "segsweep.cell": f"method={method},ratio={ratio:g},seed=0",
                        "mlflow.runColor": method_colour(method),
                    },
                )
                t.log_params({"method": method, "label_ratio": ratio, "seed": 0, "dataset": "synthetic"})
                t.log_metrics({"val/mIoU": 0.3 + gain + ratio / 4}, 100)
                t.log_metrics(
                    {
                        "val/mIoU_last": 0.3 + gain + ratio / 4 + 0.01 * sample,
                        "val/mIoU_best": 0.32 + gain + ratio / 4,
                        "tune/mIoU_last": tune,
                    },
                    100,
                )
                t.finish("FINISHED", "finished")
                ids[(method, ratio, sample)] = t.run_id
    parent.finish("FINISHED", "finished")
    return parent.run_id, ids


@pytest.mark.slow
def test_publish_tags_the_counted_runs_and_describes_the_answer(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id, ids = make_sweep(uri, "answer")
    answer = publish(uri, "answer", parent_id, searched=["fixmatch.conf_threshold"])
    # each cell's best search trial by its tuning score counts; the other is marked false
    assert answer.counted == {ids[(m, r, 1)] for m in ("supervised", "fixmatch") for r in (0.0625, 0.25)}
    runs = {r.run_id: r for r in fetch_runs(uri, "answer")}
    for (_, _, sample), run_id in ids.items():
        assert runs[run_id].tags[TAG_COUNTED] == ("true" if sample == 1 else "false")
    client = MlflowClient(uri)
    assert len(client.search_runs([runs[parent_id].experiment_id], COUNTED_FILTER)) == 4
    # the parent's description: the table, the value rule, the curve image, the view's link
    note = runs[parent_id].tags["mlflow.note.content"]
    assert "| method | 1/16 | 1/4 |" in note
    assert "| fixmatch | 35.6 (n=1) | 40.2 (n=1) |" in note
    assert "Value: val/mIoU at the last evaluation" in note
    assert f"run_uuid={parent_id}" in note and "curve.png" in note
    # the curve's files are the parent's artifacts
    logged = {a.path for a in client.list_artifacts(parent_id, "curve")}
    assert {"curve/curve.png", "curve/summary.csv", "curve/differences.csv"} <= logged
    # the links open MLflow's model-training view
    assert all("workflowType=machine_learning" in line for line in answer.lines if "http" in line)
    if answer.view_link is not None:  # the MLflow version the view format is pinned to
        experiment = client.get_experiment(runs[parent_id].experiment_id)
        assert any(k.startswith("mlflow.sharedViewState.") for k in experiment.tags)
        assert answer.view_link in note
    # run again (a resumed sweep, `segsweep curve`): the same runs, nothing doubled
    again = publish(uri, "answer", parent_id)
    assert again.counted == answer.counted


def test_a_sweep_without_a_finished_run_counts_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunTracker(uri, "empty", run_name="empty", tags={"segsweep.kind": "sweep"})
    child = RunTracker(uri, "empty", run_name="x", parent_run_id=parent.run_id)
    child.finish("FAILED", "failed")
    parent.finish("FINISHED", "finished")
    answer = publish(uri, "empty", parent.run_id)
    assert answer.counted == set() and answer.view_link is None
    assert fetch_runs(uri, "empty")[0].tags.get(TAG_COUNTED) in ("false", None)


@pytest.mark.slow
def test_the_description_has_a_row_per_method_and_the_published_points(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id, _ = make_sweep(uri, "table")
    runs = fetch_runs(uri, "table")
    curve = build_curve([r for r in runs if r.run_id != parent_id])
    curve.summary[0].published = 0.451
    text = description(curve, "table", "http://x/#/experiments/1?viewStateShareKey=k", parent_id)
    lines = text.splitlines()
    assert lines[2] == "| method | 1/16 | 1/4 |"
    assert lines[4].startswith("| supervised |") and lines[5].startswith("| fixmatch |")
    assert "(published 45.1)" in text
    assert "[the saved view](http://x/#/experiments/1?viewStateShareKey=k)" in text


@pytest.mark.parametrize(
    ("values", "phase", "index", "name"),
    [
        ({"method": "fixmatch", "data.label_ratio": 0.125, "seed": 0}, "search", 1, "fixmatch 1/8 s0 #1"),
        ({"method": "fixmatch", "data.label_ratio": 0.125, "seed": 0}, "final", 3, "fixmatch 1/8 s3 final"),
        (
            {"method": "supervised", "data.label_ratio": 0.0087, "data.split": "/x/pascal/92", "seed": 0},
            "search",
            0,
            "supervised 0.0087 split=92 s0 #0",
        ),
    ],
)
def test_run_names_lead_with_what_tells_runs_apart(values: dict, phase: str, index: int, name: str) -> None:
    assert trial_run_name(values, phase, index) == name


def test_ratios_colours_and_the_ui_address() -> None:
    assert [ratio_text(r) for r in (0.5, 0.03125, 0.0087, 1.0)] == ["1/2", "1/32", "0.0087", "1"]
    assert method_colour("fixmatch") == METHOD_COLOURS["fixmatch"]
    assert method_colour("fixmatch[cutmix=False]") == METHOD_COLOURS["fixmatch"]  # an arm: its method's
    assert method_colour("newmethod") == method_colour("newmethod")  # stable for a method not listed
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)
    assert ui_base_url("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_base_url("http://bob:pw@mlflow:5000/") == "http://mlflow:5000"  # no password in a link
