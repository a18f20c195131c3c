"""PASCAL VOC 2012 and Cityscapes trees in their real layouts, with every file the published
split lists name, generated here: the published specs are checked against them (and the GPU
kit times them at the real image sizes). Nothing is downloaded.

Every image of a tree is one file hard-linked under each name (a tree of 12,000 names takes
a second); images are noise, masks a few class blocks with an ignored border.

    python -m tests.published_trees voc DIR [--size 500x375]
    python -m tests.published_trees cityscapes DIR [--size 2048x1024]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

LISTS = Path(__file__).resolve().parents[1] / "platform" / "segsweep" / "reference" / "splits" / "unimatch"


def _list_pairs(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if line.strip()]  # type: ignore[misc]


def _image_and_mask(
    folder: Path, width: int, height: int, classes: list[int], suffix: str
) -> tuple[Path, Path]:
    """One image (noise) and one mask (class blocks, a 255 border) to link every name to."""
    rng = np.random.default_rng(0)
    image = folder / f"image{suffix}"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
    mask = np.full((height, width), classes[0], dtype=np.uint8)
    for i, c in enumerate(classes[1:], start=1):
        mask[:, i * width // len(classes) :] = c
    mask[:2] = 255
    path = folder / "mask.png"
    Image.fromarray(mask, mode="L").save(path)
    return image, path


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.link(src, dst)


def make_voc(root: Path, size: tuple[int, int] = (40, 30)) -> Path:
    """VOC2012 as the published lists expect it: JPEGImages/, SegmentationClass/ (the 1,464
    fine train masks and the 1,449 val ones), SegmentationClassAug/ (all 10,582 train_aug),
    ImageSets/Segmentation/{train,val,train_aug}.txt."""
    root.mkdir(parents=True, exist_ok=True)
    stock = root / ".stock"
    stock.mkdir(exist_ok=True)
    image, mask = _image_and_mask(stock, *size, [0, 1, 15], ".jpg")
    stem = lambda p: Path(p).stem  # noqa: E731
    train_aug = (
        [stem(i) for i, _ in _list_pairs(LISTS / "pascal" / "train_aug.txt")]
        if (LISTS / "pascal" / "train_aug.txt").is_file()
        else []
    )
    fine = [stem(i) for i, _ in _list_pairs(LISTS / "pascal" / "1464" / "labeled.txt")]
    val = [stem(i) for i, _ in _list_pairs(LISTS / "pascal" / "val.txt")]
    if not train_aug:
        first = LISTS / "pascal" / "92"
        train_aug = [stem(i) for f in ("labeled.txt", "unlabeled.txt") for i, _ in _list_pairs(first / f)]
    for name in set(train_aug) | set(val):
        _link(image, root / "JPEGImages" / f"{name}.jpg")
    for name in set(fine) | set(val):
        _link(mask, root / "SegmentationClass" / f"{name}.png")
    for name in train_aug:
        _link(mask, root / "SegmentationClassAug" / f"{name}.png")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("\n".join(fine) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    (sets / "train_aug.txt").write_text("\n".join(train_aug) + "\n")
    return root


def make_cityscapes(root: Path, size: tuple[int, int] = (64, 32)) -> Path:
    """Cityscapes as the published lists expect it: leftImg8bit/{train,val}/<city>/ and
    gtFine/... with *_gtFine_labelTrainIds.png, for the 2,975 train and 500 val images."""
    root.mkdir(parents=True, exist_ok=True)
    stock = root / ".stock"
    stock.mkdir(exist_ok=True)
    image, mask = _image_and_mask(stock, *size, [0, 2, 13], ".png")
    train = {
        pair
        for ratio in ("1_16", "1_8", "1_4", "1_2", "1_30")
        for f in ("labeled.txt", "unlabeled.txt")
        if (LISTS / "cityscapes" / ratio / f).is_file()
        for pair in _list_pairs(LISTS / "cityscapes" / ratio / f)
    }
    for image_path, mask_path in train | set(_list_pairs(LISTS / "cityscapes" / "val.txt")):
        _link(image, root / image_path)
        _link(mask, root / mask_path)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["voc", "cityscapes"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", help="WIDTHxHEIGHT of every image (VOC: 500x375; Cityscapes: 2048x1024)")
    args = parser.parse_args()
    make = make_voc if args.dataset == "voc" else make_cityscapes
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    root = make(args.root, size) if size else make(args.root)  # type: ignore[arg-type]
    print(f"{args.dataset} tree at {root}")


if __name__ == "__main__":
    main()
