"""A sweep's answer, written where the MLflow UI shows it.

At the end of a sweep and of ``segsweep curve``: the runs the curve counts carry the tag
``segsweep.counted=true`` (the sweep's other runs ``false``), the curve's files are the parent
run's artifacts (``curve/``), the parent's description (``mlflow.note.content``) is the method
x label-ratio table in markdown with the value rule, the curve image and the comparison view's
link, and a comparison view is stored in the experiment (``mlflow_view``): one filter, one
click, one row per cell and seed.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from segsweep.errors import ConfigError
from segsweep.reports import curve as report
from segsweep.reports.curve import Curve
from segsweep.sweep.spec import ratio_text
from segsweep.tracking.store import RunRecord, client_for, fetch_runs, log_files, tag_run

TAG_COUNTED = "segsweep.counted"
#: The filter that shows the counted runs only (MLflow's search syntax).
COUNTED_FILTER = f"tags.`{TAG_COUNTED}` = 'true'"
#: The pseudo-mask panels' image key (``training.evaluation.score_models``).
PANELS_KEY = "panels/pseudo_masks"


@dataclass
class Answer:
    """What was written, and the lines to print."""

    counted: set[str]
    view_link: str | None
    runs_link: str
    lines: list[str] = field(default_factory=list)


def ui_base_url(uri: str) -> str:
    """Where the MLflow UI of a store is: the server itself for http(s) stores (without the
    credentials: the browser asks for them); for a local store, where ``mlflow ui`` serves
    it by default."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return "http://127.0.0.1:5000"


def description(curve: Curve, sweep: str, view_link: str | None, parent_run_id: str) -> str:
    """The parent run's description: the method x ratio table (mean ± std over seeds, n),
    the value rule, the curve image and the view's link, in MLflow's markdown."""
    ratios = sorted({s.label_ratio for s in curve.summary})
    methods = sorted({s.method for s in curve.summary}, key=lambda m: (m != "supervised", m))
    cells = {(s.method, s.label_ratio): s for s in curve.summary}
    lines = [
        f"**{sweep}**: mIoU (%) by label ratio, mean ± std over seeds (n runs). "
        f"{report.RULE_TEXT[curve.rule][:1].upper()}{report.RULE_TEXT[curve.rule][1:]}.",
        "",
        "| method | " + " | ".join(ratio_text(r) for r in ratios) + " |",
        "| --- |" + " --- |" * len(ratios),
    ]
    for m in methods:
        row = []
        for r in ratios:
            s = cells.get((m, r))
            if s is None:
                row.append("-")
                continue
            spread = "" if math.isnan(s.std) else f" ± {100 * s.std:.1f}"
            published = f" (published {100 * s.published:.1f})" if s.published is not None else ""
            row.append(f"{100 * s.mean:.1f}{spread} (n={s.n}){published}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    if curve.differences:
        lines += ["", "Paired differences to the baseline (95% CI):", ""]
        lines += [f"- {line.strip()}" for line in report.format_differences(curve).splitlines()]
    lines += [
        "",
        f"![curve](get-artifact?path=curve%2Fcurve.png&run_uuid={parent_run_id})",
        "",
        "Files: artifacts `curve/` (curve.png, summary.csv, differences.csv, runs.csv).",
    ]
    if view_link:
        lines.append(f"Compare the counted runs: [the saved view]({view_link}).")
    lines += [f"Note: {n}" for n in curve.notes]
    return "\n".join(lines)


def mark_counted(uri: str, runs: list[RunRecord], counted: set[str], budget_s: float = 30.0) -> None:
    """``segsweep.counted`` on each run of the sweep: true where the curve counts it."""
    client = client_for(uri)
    for run in runs:
        value = "true" if run.run_id in counted else "false"
        if run.tags.get(TAG_COUNTED) != value:
            tag_run(client, run.run_id, {TAG_COUNTED: value}, budget_s)


def publish(
    uri: str,
    experiment: str,
    parent_run_id: str,
    rule: str = "last",
    baseline: str = "supervised",
    searched: list[str] | None = None,
) -> Answer:
    """Tag the counted runs, log the curve to the parent, describe it and store the view.
    A sweep with no finished run (nothing to count) writes the tags and nothing else."""
    from segsweep.tracking import mlflow_view

    runs = fetch_runs(uri, experiment)
    parent, children = report.one_sweep(runs, parent_run_id, experiment)
    base = ui_base_url(uri)
    runs_link = mlflow_view.runs_link(base, parent.experiment_id)
    try:
        curve = report.build_curve(children, rule, baseline, experiment)
    except ConfigError:  # nothing finished: nothing counts
        mark_counted(uri, children, set())
        return Answer(set(), None, runs_link, [f"  browse:  {runs_link}"])
    counted = {r.run_id for r in curve.rows}
    mark_counted(uri, children, counted)
    with tempfile.TemporaryDirectory() as tmp:
        files = report.write_outputs(curve, Path(tmp), f"{experiment}: mIoU vs label ratio")
        log_files(uri, parent.run_id, files, "curve")
    client = client_for(uri)
    metric = report.RULES[rule]
    columns = [("params", "method"), ("params", "label_ratio"), ("params", "seed")]
    columns += [("params", key) for key in searched or []]
    columns += [("metrics", metric)]
    state = mlflow_view.comparison_view(
        columns,
        [("param", "method"), ("param", "label_ratio")],
        metric,
        PANELS_KEY,
        COUNTED_FILTER,
        step_metric="val/mIoU",  # the chart: val/mIoU over steps (the column: the rule's summary)
    )
    key = mlflow_view.store_view(client, parent.experiment_id, state, f"segsweep-{parent.name}")
    view = mlflow_view.view_link(base, parent.experiment_id, key) if key else None
    tag_run(
        client,
        parent.run_id,
        {"mlflow.note.content": description(curve, parent.name, view, parent.run_id)},
        30.0,
    )
    lines = [f"  compare: {view}" if view else f"  browse:  {runs_link}"]
    if view:
        lines.append(
            f"           (the saved view: counted runs grouped by method and label ratio; all runs: {runs_link})"
        )
    else:
        lines.append(
            f"           then filter {COUNTED_FILTER} and group by the params method and label_ratio"
        )
    lines.append(f"  answer:  the parent run's description and artifacts/curve ({len(counted)} runs counted)")
    return Answer(counted, view, runs_link, lines)
