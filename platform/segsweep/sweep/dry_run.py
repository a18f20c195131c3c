"""What ``segsweep sweep --dry-run`` checks and says: every distinct dataset and model built
once, and the plan cell by cell (trials, steps, the published point, what a trial costs)."""

from __future__ import annotations

import json

from segsweep.data import DataCache
from segsweep.errors import redact
from segsweep.sweep.spec import Plan, run_config_of
from segsweep.training.budget import planned_steps


def check_trials(
    plan: Plan, on_cluster: bool = False, download: bool = True, data: DataCache | None = None
) -> list[str]:
    """Build every distinct dataset and model of the plan once (the datasets through
    ``data``, which the caller may keep), before anything is started or written: a broken
    dataset or model is one line now, not a failed trial later.

    On a cluster the trials run on the workers: the driver may have no GPU of its own, so it
    builds the models on its CPU (a worker still checks its device when its trial starts).
    ``download`` False (``--dry-run``): ImageNet weights are not fetched, the models are built
    without them, and the notes returned name the encoders a run will fetch."""
    from segsweep.training.runner import prepare

    data = data if data is not None else DataCache()
    on_driver = {"train.device": "cpu"} if on_cluster else {}
    seen: set[str] = set()
    pretrained: set[str] = set()
    for cell in plan.cells:
        cfg = run_config_of(cell, on_driver)
        if not download and cfg.model.encoder_weights == "imagenet":
            pretrained.add(cfg.model.encoder)
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"encoder_weights": None})})
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.model.model_dump(mode="json"), cfg.method])
        if key not in seen:
            seen.add(key)
            prepare(cfg, data=data.checked(cfg.data))
    if not pretrained:
        return []
    return [
        f"model.encoder_weights: imagenet: the weights of {', '.join(sorted(pretrained))} are loaded when "
        "the sweep starts (from the cache, or downloaded); `segsweep weights SPEC --cache DIR` fetches "
        "them beforehand for nodes without internet"
    ]


def describe_plan(plan: Plan, data: DataCache | None = None) -> list[str]:
    """What a sweep would run, cell by cell (``segsweep sweep --dry-run``): trials and steps
    (``train.epochs`` counted over the cell's split), the published point the curve will set
    it beside, and what a trial costs on a GPU where that was measured."""
    from segsweep.reports.published import published_point
    from segsweep.sweep.costs import describe_costs

    spec = plan.spec
    final = f", then {len(plan.cells) * len(spec.final.seeds)} final runs" if spec.final else ""
    lines = [
        f"sweep {spec.name}: {len(plan.cells)} cells, {plan.total_trials} search trials{final}; "
        f"MLflow experiment '{plan.experiment}' at {redact(plan.tracking_uri)}"
    ]
    width = max(len(c.id) for c in plan.cells)
    total, trials, published = 0, [], False
    for cell in plan.cells:
        cfg = run_config_of(cell, {})
        steps = planned_steps(cfg, data)
        total += plan.samples(cell) * steps
        epochs = f" ({cfg.train.epochs:g} epochs)" if cfg.train.epochs is not None else ""
        point = published_point(cfg)
        published = published or point is not None
        against = f"  published {point}" if point else ""
        lines.append(
            f"  {cell.id:<{width}}  {plan.samples(cell)} trial(s) x {steps:,} steps{epochs}{against}"
        )
        lines += [f"  {'':<{width}}    search {k}: {v.describe()}" for k, v in cell.space.items()]
        trials.append((cfg, steps))
    if spec.final:
        lines.append(f"  final: each cell's best configuration again with seeds {spec.final.seeds}")
    lines.append(f"{total:,} training steps in the search at most (early stopping cuts trials short)")
    if published:
        lines.append(
            "published: mIoU as the source's table reports it (the best evaluation over training); "
            "runs keep that number apart as val/mIoU_best, and the curve's value is the last evaluation"
        )
    lines += [f"gpu: {line}" for line in describe_costs(trials)]
    return lines
