"""Datasets, label-ratio splits, augmentation and loaders.

``DATASETS`` maps each dataset name to its ``Reader``: the one place a dataset is
registered (``data.name`` accepts exactly its names; the config builds its ``Literal`` from
it). ``build_data`` turns a ``DataConfig`` into the source, its deterministic split, and the
augmentation parameters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from segsweep.data.loaders import AugmentParams, Data
from segsweep.data.sources import (
    Source,
    cityscapes_source,
    folder_source,
    synthetic_source,
    voc_source,
)
from segsweep.data.splits import Split, make_split
from segsweep.errors import ConfigError
from segsweep.files import require_folder

if TYPE_CHECKING:
    from segsweep.config import DataConfig


def default_cache() -> Path:
    """Where the synthetic dataset is cached: $SEGSWEEP_CACHE or ~/.cache/segsweep."""
    return Path(os.environ.get("SEGSWEEP_CACHE") or Path.home() / ".cache" / "segsweep")


def _synthetic(cfg: DataConfig) -> Source:
    s = cfg.synthetic
    if cfg.root is None:
        require_folder(default_cache(), "SEGSWEEP_CACHE" if os.environ.get("SEGSWEEP_CACHE") else "the cache")
    return synthetic_source(cfg.root or default_cache(), s.image_size, s.num_train, s.num_val, s.seed)


def _rooted(reader: Callable[[Path], Source]) -> Callable[[DataConfig], Source]:
    def load(cfg: DataConfig) -> Source:
        if cfg.root is None:
            raise ConfigError(f"data.root: required for the {cfg.name} dataset")
        return reader(cfg.root.expanduser())

    return load


class Reader(NamedTuple):
    """A dataset in ``DATASETS``: one line for ``segsweep datasets``, and ``load``, which
    reads the config's ``data`` section (``root``, and any section of its own) into a
    ``Source`` whose samples keep the contract of ``sources.Source``."""

    summary: str
    load: Callable[[DataConfig], Source]


#: Every dataset a config may name (``data.name``), in the order ``segsweep datasets`` lists them.
DATASETS: dict[str, Reader] = {
    "synthetic": Reader("embedded synthetic scenes (7 classes), generated offline", _synthetic),
    "voc": Reader("PASCAL VOC 2012, 1,464 fine training masks", _rooted(lambda r: voc_source(r, False))),
    "voc_aug": Reader("PASCAL VOC 2012 + SBD, 10,582 training masks", _rooted(lambda r: voc_source(r, True))),
    "cityscapes": Reader("Cityscapes gtFine, 19 classes", _rooted(cityscapes_source)),
    "folder": Reader("images/, masks/, classes.txt (unlabeled images need no mask)", _rooted(folder_source)),
}


def load_source(cfg: DataConfig) -> Source:
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset '{cfg.name}'; valid: {', '.join(DATASETS)}")
    if cfg.root is not None:  # a file where the dataset (or the synthetic cache) should be
        require_folder(cfg.root.expanduser(), "data.root")
    return DATASETS[cfg.name].load(cfg)


def build_data(cfg: DataConfig) -> Data:
    source = load_source(cfg)
    split = make_split(source, cfg.label_ratio, cfg.split_seed, cfg.tune_size, cfg.num_labeled, cfg.split)
    a = cfg.augment
    aug = AugmentParams(
        crop=cfg.crop_size,
        scale=(a.scale_min, a.scale_max),
        hflip=a.hflip,
        jitter=a.color_jitter,
        grayscale_prob=a.grayscale_prob,
        blur_prob=a.blur_prob,
        # UniMatch blurs with sigma up to 2 px at 321 px crops; at 64 px that would erase the
        # textures that tell classes apart, so the range scales with the crop size.
        blur_sigma_max=a.blur_sigma_max if a.blur_sigma_max is not None else 2.0 * cfg.crop_size / 321,
        cutmix_prob=a.cutmix_prob,
        blur_sigma_min=a.blur_sigma_min,
    )
    return Data(source, split, aug)


__all__ = ["DATASETS", "Data", "Reader", "Source", "Split", "build_data", "default_cache", "load_source"]
