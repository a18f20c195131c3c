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


def build_data(cfg: DataConfig, source: Source | None = None) -> Data:
    """The source (read now unless given), its split, and the augmentation of ``cfg``."""
    source = source if source is not None else load_source(cfg)
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


#: Fields of ``data`` that choose the split or how images are served, not which images there
#: are: configs that differ only in these read the same source.
NOT_THE_SOURCE = frozenset(
    {
        "label_ratio",
        "num_labeled",
        "split",
        "split_seed",
        "tune_size",
        "crop_size",
        "num_workers",
        "verify",
        "augment",
    }
)


class DataCache:
    """``build_data`` over the cells of one plan: each dataset read once, each split once.
    A 24-cell VOC sweep read its 10,582-image tree 48 times before it started (a minute)."""

    def __init__(self) -> None:
        self._sources: dict[str, Source] = {}
        self._data: dict[str, Data] = {}
        self._checked: set[str] = set()

    def build(self, cfg: DataConfig) -> Data:
        key = cfg.model_dump_json()
        if key not in self._data:
            of_source = cfg.model_dump_json(exclude=set(NOT_THE_SOURCE))
            if of_source not in self._sources:
                self._sources[of_source] = load_source(cfg)
            self._data[key] = build_data(cfg, self._sources[of_source])
        return self._data[key]

    def checked(self, cfg: DataConfig) -> Data:
        """``build``, and every file the dataset and its split lists name found (decoded too
        with ``data.verify``), once per config."""
        from segsweep.data.check import require_files, require_valid

        data = self.build(cfg)
        key = cfg.model_dump_json()
        if key not in self._checked:
            require_files(data)
            if cfg.verify:
                require_valid(data)
            self._checked.add(key)
        return data


__all__ = [
    "DATASETS",
    "Data",
    "DataCache",
    "Reader",
    "Source",
    "Split",
    "build_data",
    "default_cache",
    "load_source",
]
