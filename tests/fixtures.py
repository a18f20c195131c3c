"""Small datasets written in the real on-disk layouts (VOC, Cityscapes, folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def blob_pair(rng: np.random.Generator, h: int, w: int, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour encodes a rectangle-of-class mask (so readers can be checked)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for cls in classes:
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[top : top + h // 2, left : left + w // 2] = cls
    image = np.stack([mask * 10, 255 - mask * 10, np.full_like(mask, 128)], -1).astype(np.uint8)
    return image, mask


def voc_palette() -> list[int]:
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):  # the VOC colour map
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal.flatten().tolist()


def write_voc(
    root: Path, n_train: int = 6, n_val: int = 3, n_aug: int = 4, size: tuple[int, int] = (48, 64)
) -> Path:
    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    stems = {"train": [], "val": [], "aug": []}
    for split, n in (("train", n_train), ("val", n_val), ("aug", n_aug)):
        for i in range(n):
            stem = f"2007_{split}{i:03d}"
            image, mask = blob_pair(rng, *size, classes=[int(rng.integers(1, 21))])
            Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
            if split == "aug":  # SBD-only images: grayscale ids in SegmentationClassAug
                Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{stem}.png")
            else:
                bordered = mask.copy()
                edge = np.zeros_like(mask, dtype=bool)
                edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
                bordered[edge] = 255
                png = Image.fromarray(bordered, mode="P")
                png.putpalette(voc_palette())
                png.save(root / "SegmentationClass" / f"{stem}.png")
                Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{stem}.png")
            stems[split].append(stem)
    sets = root / "ImageSets/Segmentation"
    (sets / "train.txt").write_text("\n".join(stems["train"]) + "\n")
    (sets / "val.txt").write_text("\n".join(stems["val"]) + "\n")
    (sets / "train_aug.txt").write_text("\n".join(stems["train"] + stems["aug"]) + "\n")
    return root


def write_cityscapes(root: Path, train_ids: bool, n: int = 3) -> Path:
    rng = np.random.default_rng(1)
    label_ids = [7, 8, 11, 26, 0, 4]  # road, sidewalk, building, car, unlabeled, static
    for split in ("train", "val"):
        for i in range(n):
            city = "aachen" if split == "train" else "frankfurt"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            stem = f"{city}_{i:06d}_000019"
            ids = rng.choice(label_ids, size=(32, 64)).astype(np.uint8)
            Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            )
            Image.fromarray(ids, mode="L").save(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            )
            if train_ids:
                lut = np.full(256, 255, dtype=np.uint8)
                lut[[7, 8, 11, 26]] = [0, 1, 2, 13]
                Image.fromarray(lut[ids], mode="L").save(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
                )
    return root


def write_folder(root: Path, n_masked: int = 8, n_unlabeled: int = 3, classes: int = 3) -> Path:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(["background", "cat", "dog"][:classes]) + "\n")
    for i in range(n_masked + n_unlabeled):
        image, mask = blob_pair(rng, 40, 40, classes=[1 + i % (classes - 1)])
        Image.fromarray(image).save(root / "images" / f"im{i:02d}.png")
        if i < n_masked:
            Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i:02d}.png")
    (root / "val.txt").write_text("im00\nim01\n")
    return root
