"""The reader contract, checked for every dataset in DATASETS (one suite, parametrized).

Each reader is loaded through the run's own door (``load_source`` of a ``DataConfig``) on a
tree written in its real layout (``fixtures.py``), and its samples must keep the same
contract: class names, train and val lists of the expected lengths (disjoint, names unique,
every val image masked), images (H, W, 3) uint8 and masks (H, W) uint8 of class ids below
the class count or 255 (ignored); as the model gets them, images float (B, 3, H, W) and masks
int64 (B, H, W), from the evaluation loader and from the training (labeled) stream alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from segsweep.config import validate_run_config
from segsweep.data import DATASETS, build_data, load_source
from segsweep.data.loaders import eval_loader, to_model
from segsweep.data.sources import Source
from segsweep.primitives import IGNORE

from .fixtures import write_cityscapes, write_folder, write_voc

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Tree:
    """A dataset tree for one reader: how to write it under a folder (its ``data`` section
    is returned), and the list lengths and class count its reader must find there."""

    write: Callable[[Path], dict[str, object]]
    train: int
    val: int
    classes: int
    has_ignore: bool  # some mask holds 255 (borders, unlabeled Cityscapes ids)


def _synthetic(tmp: Path) -> dict[str, object]:
    sizes = {"image_size": 32, "num_train": 16, "num_val": 8, "seed": 0}
    return {"name": "synthetic", "root": str(tmp / "cache"), "synthetic": sizes}


TREES: dict[str, Tree] = {
    "synthetic": Tree(_synthetic, train=16, val=8, classes=7, has_ignore=False),
    "voc": Tree(lambda t: {"name": "voc", "root": str(write_voc(t))}, 6, 3, 21, True),
    "voc_aug": Tree(lambda t: {"name": "voc_aug", "root": str(write_voc(t))}, 10, 3, 21, True),
    "cityscapes": Tree(
        lambda t: {"name": "cityscapes", "root": str(write_cityscapes(t, train_ids=True))}, 3, 3, 19, True
    ),
    "folder": Tree(lambda t: {"name": "folder", "root": str(write_folder(t))}, 9, 2, 3, False),
}
#: Trees of a reader's other modes, each checked as a case of its own.
VARIANTS: dict[str, Tree] = {
    # only *_labelIds.png, as downloaded: the reader maps them to train ids
    "cityscapes-labelIds": Tree(
        lambda t: {"name": "cityscapes", "root": str(write_cityscapes(t, train_ids=False))}, 3, 3, 19, True
    ),
}
CASES = [*TREES, *VARIANTS]


def test_every_registered_reader_has_a_tree_here() -> None:
    # A new reader joins the suite by adding its tree above; without one this fails.
    assert list(TREES) == list(DATASETS)


def tree_of(case: str) -> Tree:
    return TREES.get(case) or VARIANTS[case]


def source_of(case: str, tmp_path: Path) -> tuple[Source, dict[str, object]]:
    data = {**tree_of(case).write(tmp_path), "crop_size": 32, "tune_size": 0}
    cfg = validate_run_config({"data": data}, "test").data
    return load_source(cfg), data


def masked(source: Source) -> list:
    """A few samples with masks: the first two of train that have one, the first two of val."""
    return [s for s in source.train if s.mask is not None][:2] + source.val[:2]


def check_mask_values(mask: np.ndarray | torch.Tensor, classes: int) -> None:
    values = set(np.unique(np.asarray(mask)).tolist())
    assert values, "an empty mask"
    assert values <= set(range(classes)) | {IGNORE}, values


@pytest.mark.parametrize("name", CASES)
def test_lists_and_classes(name: str, tmp_path: Path) -> None:
    source, _ = source_of(name, tmp_path)
    tree = tree_of(name)
    assert (len(source.train), len(source.val)) == (tree.train, tree.val)
    assert source.num_classes == tree.classes == len(source.class_names)
    assert all(isinstance(c, str) and c for c in source.class_names)
    assert len(set(source.class_names)) == source.num_classes <= 255
    names = [s.name for s in source.train + source.val]
    assert len(set(names)) == len(names)  # splits hash and list samples by name
    assert all(s.mask is not None for s in source.val)  # every reported image is scored


@pytest.mark.parametrize("name", CASES)
def test_samples_as_read(name: str, tmp_path: Path) -> None:
    source, _ = source_of(name, tmp_path)
    seen_ignore = False
    for sample in masked(source):
        image, mask = source.read_pair(sample)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        check_mask_values(mask, source.num_classes)
        seen_ignore |= bool((mask == IGNORE).any())
    unlabeled = [s for s in source.train if s.mask is None]
    for sample in unlabeled[:1]:  # an image without a mask still reads (folder format)
        assert source.read_image(sample).shape[2] == 3
    if tree_of(name).has_ignore:
        assert seen_ignore, "the tree has ignored pixels, the reader lost them"


@pytest.mark.parametrize("name", CASES)
def test_samples_as_the_model_gets_them(name: str, tmp_path: Path) -> None:
    source, _ = source_of(name, tmp_path)
    for batch in eval_loader(source, masked(source), batch_size=2, workers=0):
        batch = to_model(batch, CPU, channels_last=False)
        image, mask = batch["image"], batch["mask"]
        assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[1] == 3
        assert mask.dtype == torch.int64 and mask.shape == (image.shape[0], *image.shape[-2:])
        assert torch.isfinite(image).all()
        check_mask_values(mask, source.num_classes)


@pytest.mark.parametrize("name", CASES)
def test_training_batches(name: str, tmp_path: Path) -> None:
    _, data_section = source_of(name, tmp_path)
    tree = {"data": {**data_section, "label_ratio": 0.5}}
    data = build_data(validate_run_config(tree, "test").data)
    labeled = data.labeled()
    assert len(labeled) >= 1 and len(labeled) + len(data.split.unlabeled) == len(data.source.train)
    items = [labeled[(i, 0, i)] for i in range(min(2, len(labeled)))]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    batch = to_model(batch, CPU, channels_last=False)
    assert batch["image_l"].dtype == torch.float32 and batch["image_l"].shape[1:] == (3, 32, 32)
    assert batch["mask_l"].dtype == torch.int64 and batch["mask_l"].shape[1:] == (32, 32)
    check_mask_values(batch["mask_l"], data.source.num_classes)
    assert batch["tags_l"].shape[1] == data.source.num_classes
