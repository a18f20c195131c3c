"""Label-ratio curves from MLflow: which runs count, aggregation over seeds, paired
differences with their uncertainty, published reference points, and the plot.

The rule for a run's value is stated, printed on the plot and written to the CSVs:

* ``last`` (default): ``val/mIoU_last``, the last evaluation.
* ``best_tune``: ``val/mIoU_at_best_tune``, the evaluation whose *tuning split* score was
  best. The best evaluation on the reported split itself (``val/mIoU_best``) is never used:
  picking the epoch on the set one reports flatters every method.

Which runs, sweep by sweep (a sweep is its parent run): a sweep with a ``final`` phase
contributes its final runs (the best configuration of each cell re-run over seeds); otherwise
each cell contributes its best search trial by the tuning-split score that goes with the value
rule (``tune/mIoU_last`` or ``tune/mIoU_best``; a cell without a search space has one trial).
Runs made with ``segsweep run`` count one each. Only runs that finished (not stopped early,
failed or diverged) count. One run per measurement: where several runs are the same point
(arm, label ratio, seed, split seed and family: a sweep started anew under the same experiment,
a run repeated), the newest counts and the others are named in a note.

Published points: for each (method, split), the published row measured on the same split
lists (rows noted as superseded or on other image lists are never used), preferring the runs'
backbone, then table and README values over training-log maxima and low-confidence rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, stdev

from segsweep.errors import ConfigError
from segsweep.files import make_folder, write_atomic
from segsweep.reports.published import matching_published, pick_published, published_table
from segsweep.tracking.store import RunRecord
from segsweep.tracking.tags import TAG_CELL, TAG_KIND, TAG_PARENT, TAG_PHASE, TAG_SPLIT_FAMILY, TAG_STATUS

RULES = {"last": "val/mIoU_last", "best_tune": "val/mIoU_at_best_tune"}
#: The tuning-split score a cell's best search trial is chosen by, per value rule: the
#: evaluation the value is read at (the sweep ranks trials by their last tune/mIoU as well).
SELECT_BY = {"last": "tune/mIoU_last", "best_tune": "tune/mIoU_best"}
RULE_TEXT = {
    "last": "value: val/mIoU at the last evaluation",
    "best_tune": "value: val/mIoU at the evaluation best on the tuning split",
}


@dataclass
class Row:
    #: The method, with the values its sweep cell fixes besides ratio and seed when a spec's
    #: variants vary more than the method (``arm_of_cell``): two variants of one
    #: method are two curves, never pooled.
    method: str
    dataset: str
    label_ratio: float
    n_labeled: int
    seed: int
    mIoU: float
    split_family: str = ""
    split_seed: int = 0
    run_id: str = ""
    encoder: str = ""
    #: ``val/mIoU_best``: the best evaluation over training on the reported split, what the
    #: published tables report; kept beside the value, never used as it (nan: not logged).
    best_on_val: float = float("nan")


@dataclass
class Summary:
    method: str
    label_ratio: float
    mean: float
    std: float
    n: int
    published: float | None = None
    delta_vs_published: float | None = None
    published_backbone: str = ""
    published_source: str = ""
    #: Mean ``val/mIoU_best`` of the same runs: the number the published tables report
    #: (best evaluation over training on val); for setting beside them, not the curve's value.
    best_on_val: float | None = None


@dataclass
class Difference:
    method: str
    baseline: str
    label_ratio: float
    n: int
    paired: bool
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass
class Curve:
    rule: str
    rows: list[Row]
    summary: list[Summary]
    differences: list[Difference]
    published: list[dict[str, str]] = field(default_factory=list)
    dataset: str = ""
    family: str = ""
    #: What a reader must know about the selection: runs left out as repeats, ratios where
    #: the baseline is missing.
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Which runs count


def _finished(run: RunRecord, key: str) -> bool:
    return (
        run.status == "FINISHED"
        and run.tags.get(TAG_STATUS, "finished") == "finished"
        and run.tags.get(TAG_KIND) != "sweep"
        and key in run.metrics
        and "method" in run.params
    )


def arm_of_cell(cell: str) -> str | None:
    """What a cell compares, from its id (``sweep.spec.cell_id``; parsed here so that reports
    need neither torch nor the methods): its method and any other value it fixes but the
    label ratio and seed, e.g. 'mixandmatch (mm=False)' for
    'method=mixandmatch,ratio=0.03125,mixandmatch.mm=False,seed=0'. Cells of one arm at one
    ratio are the seeds of one point of a curve; None for an id without a method."""
    parts = [part.partition("=") for part in cell.split(",")]
    method = next((v for k, _, v in parts if k == "method"), None)
    if method is None:
        return None
    # Seeds and split seeds are replicates of one point, never separate arms; a published
    # split list is a point of the curve (its label ratio), as the ratio is.
    rest = [
        f"{k.removeprefix(method + '.')}={v}"
        for k, _, v in parts
        if k not in ("method", "ratio", "seed", "data.split_seed", "data.split")
    ]
    return f"{method} ({', '.join(rest)})" if rest else method


def started_at(run: RunRecord) -> str:
    """When a run started, to the minute, local time (to tell apart sweeps of one name)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(run.start_time / 1000))


def sweep_parents(runs: list[RunRecord]) -> list[RunRecord]:
    """The parent runs of the sweeps among ``runs``, newest first."""
    return sorted((r for r in runs if r.tags.get(TAG_KIND) == "sweep"), key=lambda r: -r.start_time)


def one_sweep(runs: list[RunRecord], which: str, experiment: str) -> tuple[RunRecord, list[RunRecord]]:
    """The parent run named ``which`` (its run id, or its name: the spec's name) and its
    trials' runs. An experiment can hold several sweeps: one started anew under the same
    name, or several specs sharing an experiment."""
    parents = sweep_parents(runs)
    found = [p for p in parents if which in (p.run_id, p.name)]
    if not found:
        known = ", ".join(f"{p.name} ({p.run_id})" for p in parents) or "none"
        raise ConfigError(f"--sweep: no sweep '{which}' in experiment '{experiment}'; its sweeps: {known}")
    if len(found) > 1:
        started = ", ".join(f"{p.run_id} (started {started_at(p)})" for p in found)
        raise ConfigError(
            f"--sweep: {len(found)} sweeps of experiment '{experiment}' are named '{which}'; "
            f"give its run id: {started}"
        )
    parent = found[0]
    return parent, [r for r in runs if r.tags.get(TAG_PARENT) == parent.run_id]


def select_rows(runs: list[RunRecord], rule: str = "last", notes: list[str] | None = None) -> list[Row]:
    """The runs that count (module docstring), one row each; ``notes`` receives a line for
    runs left out as repeats of a newer one."""
    if rule not in RULES:
        raise ConfigError(f"--value: unknown rule '{rule}'; valid: {', '.join(RULES)}")
    key, rank = RULES[rule], SELECT_BY[rule]
    chosen: list[RunRecord] = []
    sweeps: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        if not _finished(r, key):
            continue
        if r.tags.get(TAG_CELL):
            sweeps[r.tags.get(TAG_PARENT, "")].append(r)
        else:
            chosen.append(r)  # a plain run counts as it is
    for members in sweeps.values():
        finals = [r for r in members if r.tags.get(TAG_PHASE) == "final"]
        if finals:
            chosen += finals
            continue
        by_cell: dict[str, RunRecord] = {}
        for r in members:
            best = by_cell.get(r.tags[TAG_CELL])
            if best is None or r.metrics.get(rank, -1) > best.metrics.get(rank, -1):
                by_cell[r.tags[TAG_CELL]] = r
        chosen += by_cell.values()
    # One run per measurement, the newest.
    newest: dict[tuple, tuple[RunRecord, Row]] = {}
    repeats = 0
    for r in sorted(chosen, key=lambda r: (r.start_time, r.run_id)):
        row = _row(r, key)
        ident = (
            row.method,
            row.dataset,
            row.encoder,
            row.label_ratio,
            row.seed,
            row.split_seed,
            row.split_family,
        )
        repeats += ident in newest
        newest[ident] = (r, row)
    if repeats and notes is not None:
        notes.append(
            f"{repeats} run(s) repeat the method, ratio, seed and split of a newer run and are left "
            "out (a sweep started anew in the same experiment, or a run repeated): the newest counts"
        )
    # A sweep gives every method one budget; runs made one by one may not have.
    budgets = sorted(
        {
            f"{r.params.get('train.steps', '?')}x{r.params.get('train.batch_size', '?')}"
            for r, _ in newest.values()
        }
    )
    if len(budgets) > 1 and notes is not None:
        notes.append(
            f"the runs differ in budget (train.steps x train.batch_size: {', '.join(budgets)}): "
            "their differences compare unequal training"
        )
    return sorted((row for _, row in newest.values()), key=lambda x: (x.method, x.label_ratio, x.seed))


def _row(r: RunRecord, key: str) -> Row:
    p = r.params
    return Row(
        method=arm_of_cell(r.tags.get(TAG_CELL, "")) or p["method"],
        dataset=p.get("dataset", p.get("data.name", "")),
        label_ratio=float(p.get("label_ratio", p.get("data.label_ratio", "nan"))),
        n_labeled=int(p.get("n_labeled", 0)),
        seed=int(p.get("seed", 0)),
        mIoU=float(r.metrics[key]),
        split_family=r.tags.get(TAG_SPLIT_FAMILY, ""),
        split_seed=int(p.get("data.split_seed", 0)),
        run_id=r.run_id,
        encoder=p.get("model.encoder", ""),
        best_on_val=float(r.metrics.get("val/mIoU_best", float("nan"))),
    )


# ---------------------------------------------------------------------------------------------
# Aggregation and uncertainty


def summarise(rows: list[Row]) -> list[Summary]:
    groups: dict[tuple[str, float], list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r.method, r.label_ratio)].append(r)
    out = []
    for (method, ratio), runs in sorted(groups.items()):
        values = [r.mIoU for r in runs]
        spread = stdev(values) if len(values) > 1 else float("nan")  # one seed has no spread
        best = [r.best_on_val for r in runs if not math.isnan(r.best_on_val)]
        summary = Summary(method, ratio, mean(values), spread, len(values))
        summary.best_on_val = mean(best) if len(best) == len(runs) else None
        out.append(summary)
    return out


def t_quantile(p: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def t_pvalue(t: float, df: float) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def compare(values: list[float], other: list[float], paired: bool) -> tuple[float, float, float, float]:
    """Mean difference (values - other), its 95% confidence interval and a two-sided p-value.

    Paired: a one-sample t on the per-seed differences. Unpaired: Welch's t. NaN where there
    are too few runs to estimate a spread.
    """
    nan = float("nan")
    if paired:
        diffs = [a - b for a, b in zip(values, other, strict=True)]
        m = mean(diffs)
        if len(diffs) < 2:
            return m, nan, nan, nan
        se = stdev(diffs) / math.sqrt(len(diffs))
        df = len(diffs) - 1
    else:
        m = mean(values) - mean(other)
        if len(values) < 2 or len(other) < 2:
            return m, nan, nan, nan
        va, vb = stdev(values) ** 2 / len(values), stdev(other) ** 2 / len(other)
        se = math.sqrt(va + vb)
        df_num = (va + vb) ** 2
        df_den = va**2 / (len(values) - 1) + vb**2 / (len(other) - 1)
        df = df_num / df_den if df_den > 0 else len(values) + len(other) - 2  # Welch-Satterthwaite
    if se == 0:
        return m, m, m, 0.0 if m != 0 else 1.0
    half = t_quantile(0.975, df) * se
    return m, m - half, m + half, t_pvalue(m / se, df)


def paired_differences(rows: list[Row], baseline: str = "supervised") -> list[Difference]:
    """Each method against ``baseline`` at each label ratio; runs are paired by (seed, split
    seed, split family) where both sides have them, otherwise compared unpaired."""
    index: dict[tuple[str, float], dict[tuple[int, int, str], float]] = defaultdict(dict)
    for r in rows:
        index[(r.method, r.label_ratio)][(r.seed, r.split_seed, r.split_family)] = r.mIoU
    out = []
    for (method, ratio), runs in sorted(index.items()):
        # An arm with values of its own ("fixmatch (data.crop_size=513)") is set against the
        # baseline with the same values where the sweep has it, else the plain baseline.
        extras = method[method.index(" (") :] if " (" in method else ""
        own = baseline + extras if (baseline + extras, ratio) in index else baseline
        base = index.get((own, ratio))
        if method == own or not base:
            continue
        common = sorted(set(runs) & set(base))
        paired = len(common) >= 2 or (len(common) == len(runs) == len(base) == 1)
        if paired:
            a, b = [runs[k] for k in common], [base[k] for k in common]
        else:
            a, b = list(runs.values()), list(base.values())
        m, lo, hi, p = compare(a, b, paired)
        out.append(Difference(method, own, ratio, len(a), paired, m, lo, hi, p))
    return out


# ---------------------------------------------------------------------------------------------
# Method colours; published points beside the summary (the table itself: published.py)


#: One colour per method, the same in the curve's plot and in the MLflow UI (``mlflow.runColor``).
METHOD_COLOURS = {
    "supervised": "#7f7f7f",
    "fixmatch": "#1f77b4",
    "guidedmix": "#2ca02c",
    "s4mim": "#9467bd",
    "hfpl": "#d62728",
    "mixandmatch": "#ff7f0e",
}
OTHER_COLOURS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf")


def method_colour(arm: str) -> str:
    """The colour of a method (an arm such as ``fixmatch[cutmix=False]`` takes its method's)."""
    base = arm.split("[", 1)[0]
    if base in METHOD_COLOURS:
        return METHOD_COLOURS[base]
    return OTHER_COLOURS[int(hashlib.sha256(base.encode()).hexdigest(), 16) % len(OTHER_COLOURS)]


def attach_published(summary: list[Summary], rows: list[Row], matched: list[dict[str, str]]) -> None:
    """Reproduced minus published, per method and label ratio (ratio of the runs' family)."""
    family_of = {(r.method, r.label_ratio): r.split_family.removeprefix("published/") for r in rows}
    for s in summary:
        split = family_of.get((s.method, s.label_ratio))
        encoders = {r.encoder for r in rows if (r.method, r.label_ratio) == (s.method, s.label_ratio)}
        hit = pick_published(matched, s.method.split(" (", 1)[0], split or "", encoders)
        if hit is not None:
            s.published = float(hit["mIoU"]) / 100
            s.delta_vs_published = s.mean - s.published
            s.published_backbone = hit.get("backbone", "")
            s.published_source = hit.get("source", "")


def baseline_notes(rows: list[Row], baseline: str) -> list[str]:
    """Ratios where other arms ran but the baseline did not: no difference is given there."""
    if not any(r.method == baseline for r in rows):
        return []
    missing = sorted({r.label_ratio for r in rows} - {r.label_ratio for r in rows if r.method == baseline})
    return [f"no {baseline} runs at ratio {ratio:g}: no differences there" for ratio in missing]


def build_curve(
    runs: list[RunRecord], rule: str = "last", baseline: str = "supervised", experiment: str | None = None
) -> Curve:
    notes: list[str] = []
    rows = select_rows(runs, rule, notes)
    if not rows:
        where = f"experiment '{experiment}'" if experiment else "this experiment"
        raise ConfigError(f"no finished runs with a val/mIoU summary in {where}")
    summary = summarise(rows)
    matched, dataset, family = matching_published(rows, published_table())
    attach_published(summary, rows, matched)
    notes += baseline_notes(rows, baseline)
    differences = paired_differences(rows, baseline)
    return Curve(rule, rows, summary, differences, matched, dataset, family, notes)


# ---------------------------------------------------------------------------------------------
# Outputs


def to_csv(items: list, rule: str) -> str:
    """Rows as CSV with a ``value_rule`` column, so a file read alone still says what it holds."""
    buf = io.StringIO()
    if not items:
        return ""
    fields = [*asdict(items[0]), "value_rule"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for item in items:
        writer.writerow(
            {**{k: ("" if v is None else v) for k, v in asdict(item).items()}, "value_rule": rule}
        )
    return buf.getvalue()


def plot(curve: Curve, path: Path, title: str, baseline: str = "supervised") -> Path:
    """mIoU against label ratio (log scale): mean and a +- std band per method, the baseline
    dashed, published points as hollow markers; the value rule in the corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = sorted({s.method for s in curve.summary}, key=lambda m: (m != baseline, m))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    taken: set[str] = set()
    for i, method in enumerate(methods):
        pts = sorted((s for s in curve.summary if s.method == method), key=lambda s: s.label_ratio)
        x = [s.label_ratio for s in pts]
        y = [100 * s.mean for s in pts]
        sd = [0.0 if math.isnan(s.std) else 100 * s.std for s in pts]
        # the method's colour, as its runs have in MLflow; a second arm of one method: the cycle's
        c = method_colour(method) if method_colour(method) not in taken else cycle[i % len(cycle)]
        taken.add(c)
        style = "--" if method == baseline else "-"
        ax.plot(x, y, style, marker="o", color=c, label=f"{method} (n={max(s.n for s in pts)})")
        ax.fill_between(
            x,
            [a - b for a, b in zip(y, sd, strict=True)],
            [a + b for a, b in zip(y, sd, strict=True)],
            color=c,
            alpha=0.15,
            linewidth=0,
        )
        for s in pts:
            if s.published is not None:
                ax.plot([s.label_ratio], [100 * s.published], marker="D", mfc="none", color=c, ms=8)
    # Published points of methods this experiment did not run, in grey, named.
    x_of = {r.split_family.removeprefix("published/"): r.label_ratio for r in curve.rows}
    encoders = {r.encoder for r in curve.rows}
    others = {(p["method"], p["split"]) for p in curve.published if p["method"] not in methods}
    for method, split in sorted(others):
        p = pick_published(curve.published, method, split, encoders)
        if p is None or split not in x_of:
            continue
        ax.plot([x_of[p["split"]]], [float(p["mIoU"])], marker="D", mfc="none", color="gray", ms=6)
        ax.annotate(
            p["method"],
            (x_of[p["split"]], float(p["mIoU"])),
            textcoords="offset points",
            xytext=(5, -3),
            fontsize=7,
            color="gray",
        )
    if curve.published:
        ax.plot([], [], "D", mfc="none", color="gray", label="published (the runs' backbone where listed)")
    ax.set_xscale("log", base=2)
    ticks = sorted({s.label_ratio for s in curve.summary})
    ax.set_xticks(ticks, [ratio_label(r) for r in ticks])
    ax.minorticks_off()
    ax.set_xlabel("label ratio (fraction of training images labeled)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.text(
        0.01,
        0.99,
        f"{RULE_TEXT[curve.rule]}; band: ±1 std over seeds",
        transform=ax.transAxes,
        va="top",
        fontsize=7,
        color="dimgray",
    )
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def ratio_label(ratio: float) -> str:
    """0.0625 -> '1/16'; ratios that are not 1/n stay decimal."""
    inverse = 1 / ratio
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 and ratio < 1 else f"{ratio:g}"


#: What ``write_outputs`` writes into its folder.
OUTPUT_FILES = ("runs.csv", "summary.csv", "differences.csv", "curve.png")


def write_outputs(curve: Curve, out: Path, title: str) -> list[Path]:
    make_folder(out, "--out")
    files = []
    tables = (curve.rows, curve.summary, curve.differences)
    for name, items in zip(OUTPUT_FILES[:-1], tables, strict=True):
        path = out / name
        write_atomic(path, to_csv(items, RULES[curve.rule]))
        files.append(path)
    files.append(plot(curve, out / OUTPUT_FILES[-1], title))
    return files


def format_table(curve: Curve) -> str:
    """Method x label ratio, mean ± std (n), as the terminal and README show it."""
    ratios = sorted({s.label_ratio for s in curve.summary})
    methods = sorted({s.method for s in curve.summary}, key=lambda m: (m != "supervised", m))
    cells = {(s.method, s.label_ratio): s for s in curve.summary}
    width = max(12, *(len(m) + 2 for m in methods))
    head = f"{'method':<{width}}" + "".join(f"{f'ratio {r:g}':>22}" for r in ratios)
    lines = [head]
    for m in methods:
        line = f"{m:<{width}}"
        for r in ratios:
            s = cells.get((m, r))
            if s is None:
                line += f"{'-':>22}"
            else:
                spread = "n/a" if math.isnan(s.std) else f"{100 * s.std:.1f}"
                line += f"{f'{100 * s.mean:.1f} ± {spread} (n={s.n})':>22}"
        lines.append(line)
    return "\n".join(lines)


def format_differences(curve: Curve) -> str:
    lines = []
    for d in curve.differences:
        kind = "paired" if d.paired else "unpaired"
        ci = "n/a" if math.isnan(d.ci_low) else f"[{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]"
        p = "n/a" if math.isnan(d.p_value) else f"{d.p_value:.3f}"
        lines.append(
            f"  {d.method} - {d.baseline} at ratio {d.label_ratio:g}: {100 * d.mean_diff:+.1f} mIoU, "
            f"95% CI {ci}, p={p} ({kind}, n={d.n})"
        )
    return "\n".join(lines)
