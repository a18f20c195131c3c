"""The published reference points the curves are set beside: ``reference/published.csv``
(one row per method, dataset, split and backbone, with its source and notes) and which row
stands for a (method, split) of the runs.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segsweep.reports.curve import Row

#: The table shipped with the package (package data, as the split lists are).
PUBLISHED = Path(__file__).resolve().parents[1] / "reference" / "published.csv"


def published_table(path: Path = PUBLISHED) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row.get("mIoU")]


#: Notes of published rows never overlaid: replaced by a later number, or measured on other
#: image lists under the same split name.
UNUSABLE = ("SUPERSEDED", "DIFFER")
#: Notes of rows used only where nothing better is listed for the method and split, weakest
#: last: a table quoted by another repository, one read with low confidence, and the best
#: validation score over training read from a log (the flattering rule these curves refuse).
WEAKER = ("secondary source", "LOW CONFIDENCE", "TRAINING-LOG")


def backbone_key(name: str) -> str:
    """'tu-resnet101', 'resnet101' and 'ResNet-101' compare equal."""
    return name.lower().removeprefix("tu-").replace("-", "").replace("_", "")


def matching_published(rows: list[Row], table: list[dict[str, str]]) -> tuple[list[dict[str, str]], str, str]:
    """Usable published rows for the runs' dataset and published split family (e.g.
    'pascal/92'): the split folders are named by their labeled count, so each family is one
    point."""
    families = {r.split_family for r in rows}
    datasets = {r.dataset for r in rows}
    splits = {f.removeprefix("published/") for f in families if f.startswith("published/")}
    if not splits:
        return [], ",".join(sorted(datasets)), ",".join(sorted(families))
    matched = [
        p
        for p in table
        if p["split"] in splits
        and p["dataset"] in datasets
        and not any(flag in p.get("note", "") for flag in UNUSABLE)
    ]
    return matched, ",".join(sorted(datasets)), ",".join(sorted(families))


def pick_published(
    matched: list[dict[str, str]], method: str, split: str, encoders: set[str]
) -> dict[str, str] | None:
    """The published row to set beside (method, split): the runs' backbone first, then the
    strongest source (``WEAKER``), then table order."""
    keys = {backbone_key(e) for e in encoders if e}
    candidates = [(i, p) for i, p in enumerate(matched) if p["method"] == method and p["split"] == split]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda ip: (
            backbone_key(ip[1].get("backbone", "")) not in keys,
            max((n + 1 for n, flag in enumerate(WEAKER) if flag in ip[1].get("note", "")), default=0),
            ip[0],
        ),
    )[1]


def published_point(cfg: Any) -> str | None:
    """The published mIoU a run of ``cfg`` (a RunConfig with a published ``data.split``) will
    be set beside, with its source in a few words; None without one."""
    if cfg.data.split is None:
        return None
    split = "/".join(Path(cfg.data.split).parts[-2:])
    dataset = {"voc_aug": ("voc", "voc_aug")}.get(cfg.data.name, (cfg.data.name,))
    usable = [
        p
        for p in published_table()
        if p["split"] == split
        and p["dataset"] in dataset
        and not any(f in p.get("note", "") for f in UNUSABLE)
    ]
    hit = pick_published(usable, cfg.method, split, {cfg.model.encoder})
    if hit is None:
        return None
    source = hit.get("source", "").split(" ")[0].removeprefix("github.com/")
    return f"{float(hit['mIoU']):.1f} ({hit.get('backbone', '')}, {source})"
