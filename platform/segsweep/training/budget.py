"""Training budgets as the papers count them: epochs, turned into optimizer steps.

UniMatch (LiheYoung/UniMatch ``unimatch.py``/``fixmatch.py`` at 818609d) counts an epoch as
one pass over the unlabeled list, the labeled list repeated to its length
(``dataset/semi.py`` L25-27, ``nsample``), ``len(trainloader_u)`` iterations of the global
unlabeled batch. ``train.epochs`` asks for that budget; it becomes ``train.steps`` once the
split is known, for every method of a cell alike (UniMatch's ``supervised.py`` passes over the
labeled list only; segsweep gives supervised-only the same steps as the methods it is set
against, so a cell compares methods at one budget).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from segsweep.config import RunConfig

if TYPE_CHECKING:
    from segsweep.data import DataCache


def epoch_steps(cfg: RunConfig, n_labeled: int, n_unlabeled: int) -> int:
    """Optimizer steps of ``train.epochs`` epochs (``train.steps`` when epochs is unset)."""
    t = cfg.train
    if t.epochs is None:
        return t.steps
    if n_unlabeled:
        per_epoch = math.ceil(n_unlabeled / (t.unlabeled_batch_size or t.batch_size))
    else:  # fully labeled: one pass over the labeled list
        per_epoch = math.ceil(n_labeled / t.batch_size)
    return max(1, round(t.epochs * per_epoch))


def resolved(cfg: RunConfig, n_labeled: int, n_unlabeled: int) -> RunConfig:
    """``cfg`` with its budget in steps: ``train.epochs`` turned into ``train.steps`` (and
    unset, so the saved config.yaml, which a resume reads, names one budget)."""
    if cfg.train.epochs is None:
        return cfg
    steps = epoch_steps(cfg, n_labeled, n_unlabeled)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps, "epochs": None})})


def planned_steps(cfg: RunConfig, data: DataCache | None = None) -> int:
    """The steps a run of ``cfg`` will train: ``train.steps``, or its epochs over its split
    (read from the dataset's lists, through ``data`` where given: what ``--dry-run`` prints
    and ASHA's horizon)."""
    if cfg.train.epochs is None:
        return cfg.train.steps
    from segsweep.data import DataCache

    split = (data or DataCache()).build(cfg.data).split
    return epoch_steps(cfg, len(split.labeled), len(split.unlabeled))
