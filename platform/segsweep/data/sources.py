"""Dataset readers: each turns a dataset root into a training pool and a validation list.

A ``Source`` knows how to read a sample's image (H, W, 3) uint8 and mask (H, W) uint8 of
class ids with 255 = ignore. Readers check what they can up front (root and list files
exist) and raise ``DataError`` naming the file for anything unreadable later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segsweep.data import synthetic
from segsweep.errors import DataError
from segsweep.primitives import IGNORE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: a stable ``name`` (split lists and hashing use it), where its
    image lives, and where its mask lives (None: an unlabeled-only image)."""

    name: str
    image: str | int
    mask: str | int | None


@dataclass
class Source:
    name: str
    root: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    #: All images share one size (batched evaluation is possible).
    fixed_size: bool = False
    #: Remaps raw mask values to train ids (Cityscapes labelIds); None: values are ids.
    mask_lut: np.ndarray | None = None
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: Resolves a (image, mask) line of a published split list into a Sample.
    from_list_line: Callable[[str, str], Sample] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- reading --------------------------------------------------------------------------
    def read_image(self, sample: Sample) -> np.ndarray:
        if isinstance(sample.image, int):
            # A copy: the cache is memory-mapped read-only and tensors want writable memory.
            return np.array(self.arrays[sample.name.split("/")[0]][0][sample.image])
        path = self.root / sample.image
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None

    def read_mask(self, sample: Sample) -> np.ndarray:
        if sample.mask is None:
            raise DataError(f"{sample.name}: has no mask")
        if isinstance(sample.mask, int):
            return np.array(self.arrays[sample.name.split("/")[0]][1][sample.mask])
        path = self.root / sample.mask
        try:
            with Image.open(path) as im:
                if im.mode not in ("P", "L", "I", "I;16"):
                    raise DataError(
                        f"{path}: mask must be a palette or grayscale PNG of class ids, not mode {im.mode}"
                    )
                mask = np.asarray(im)
        except FileNotFoundError:
            raise DataError(f"{path}: mask file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot read mask ({exc})") from None
        if self.mask_lut is not None:
            if mask.max(initial=0) >= len(self.mask_lut):
                raise DataError(f"{path}: label id {int(mask.max())} is not a known label id")
            mask = self.mask_lut[mask]
        mask = mask.astype(np.uint8) if mask.max(initial=0) <= 255 else mask
        bad = (mask >= self.num_classes) & (mask != IGNORE)
        if bad.any():
            raise DataError(
                f"{path}: mask has class id {int(mask[bad].max())} but the dataset has "
                f"{self.num_classes} classes (0..{self.num_classes - 1}, 255 = ignore)"
            )
        return mask.astype(np.uint8)

    def read_pair(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image, mask = self.read_image(sample), self.read_mask(sample)
        if image.shape[:2] != mask.shape:
            where = self.root / sample.mask if isinstance(sample.mask, str) else sample.name
            raise DataError(
                f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return image, mask


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found")
    return path


def read_list(path: Path) -> list[list[str]]:
    """Non-empty lines of a list file, split on whitespace; a DataError names a missing file."""
    return [line.split() for line in _list_text(path).splitlines() if line.strip()]


def _list_text(path: Path) -> str:
    """A list file's text; a DataError names a missing or unreadable one."""
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows editors) is not a name
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read list ({exc})") from None


def read_class_names(path: Path) -> list[str]:
    """``classes.txt``: one class name per line, the line number (from 0) its id in the masks.
    A blank line inside would shift every id after it, a name twice would make two ids one
    class, and id 255 means ignore: each is a DataError naming the line."""
    lines = [line.strip() for line in _list_text(path).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, start=1):
        if not name:
            raise DataError(
                f"{path}:{number}: blank line (a class's id is its line number: name every class)"
            )
        if name in seen:
            raise DataError(f"{path}:{number}: class '{name}' already on line {seen[name]}")
        seen[name] = number
    if len(lines) < 2:
        raise DataError(f"{path}: needs at least two classes, one per line")
    if len(lines) > 255:
        raise DataError(f"{path}: {len(lines)} classes; at most 255 (mask value 255 means ignore)")
    return lines


# --------------------------------------------------------------------------------------------
# The embedded synthetic dataset


def synthetic_source(root: Path, size: int, num_train: int, num_val: int, seed: int) -> Source:
    arrays = synthetic.load_or_generate(root, seed, size, num_train, num_val)
    train = [Sample(f"train/{i:06d}", i, i) for i in range(num_train)]
    val = [Sample(f"val/{i:06d}", i, i) for i in range(num_val)]
    return Source(
        name="synthetic",
        root=root,
        class_names=list(synthetic.CLASS_NAMES),
        train=train,
        val=val,
        fixed_size=True,
        arrays=arrays,
    )


# --------------------------------------------------------------------------------------------
# PASCAL VOC 2012

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def _voc_mask_path(root: Path, stem: str, augmented: bool) -> str:
    """Fine masks live in SegmentationClass/; the 10,582 augmented ones in SegmentationClassAug/."""
    fine = f"SegmentationClass/{stem}.png"
    if not augmented or (root / fine).is_file():
        return fine
    return f"SegmentationClassAug/{stem}.png"


def voc_source(root: Path, augmented: bool) -> Source:
    """PASCAL VOC 2012: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs, 255 borders),
    optionally ``SegmentationClassAug/`` (SBD, grayscale ids) and ``ImageSets/Segmentation/``.

    ``voc`` trains on the 1,464 fine ``train.txt`` images; ``voc_aug`` on ``train_aug.txt``
    (``ImageSets/Segmentation/`` or ``ImageSets/SegmentationAug/``), 10,582 images.
    """
    require_dir(root, "VOC root")
    require_dir(root / "JPEGImages", "VOC JPEGImages/ folder")
    sets = root / "ImageSets" / "Segmentation"
    if augmented:
        candidates = [sets / "train_aug.txt", root / "ImageSets" / "SegmentationAug" / "train_aug.txt"]
        train_list = next((p for p in candidates if p.is_file()), candidates[0])
    else:
        train_list = sets / "train.txt"

    def sample(stem: str) -> Sample:
        return Sample(stem, f"JPEGImages/{stem}.jpg", _voc_mask_path(root, stem, augmented))

    def from_line(image: str, mask: str) -> Sample:
        # Published lists name SegmentationClass/ for every image; UniMatch ships the
        # augmented masks under that name, the official layout keeps them apart.
        stem = Path(image).stem
        if not (root / mask).is_file() and (root / f"SegmentationClassAug/{stem}.png").is_file():
            mask = f"SegmentationClassAug/{stem}.png"
        return Sample(stem, image, mask)

    train = [sample(row[0].split("/")[-1].removesuffix(".jpg")) for row in read_list(train_list)]
    val = [sample(row[0]) for row in read_list(sets / "val.txt")]
    return Source(
        name="voc_aug" if augmented else "voc",
        root=root,
        class_names=list(VOC_CLASSES),
        train=train,
        val=val,
        from_list_line=from_line,
    )


# --------------------------------------------------------------------------------------------
# Cityscapes

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]  # fmt: skip
# labelId -> trainId for the 19 evaluated classes (cityscapesScripts' labels.py); rest 255.
_CITYSCAPES_ID_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in _CITYSCAPES_ID_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


def cityscapes_source(root: Path) -> Source:
    """Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and ``gtFine/...``.

    Uses ``*_gtFine_labelTrainIds.png`` when present; otherwise reads ``*_gtFine_labelIds.png``
    and maps the 34 label ids to the 19 train ids (others ignored).
    """
    require_dir(root / "leftImg8bit", "Cityscapes leftImg8bit/ folder")
    require_dir(root / "gtFine", "Cityscapes gtFine/ folder")
    use_train_ids = any((root / "gtFine").glob("*/*/*_gtFine_labelTrainIds.png"))
    kind = "labelTrainIds" if use_train_ids else "labelIds"

    def split(name: str) -> list[Sample]:
        images = sorted((root / "leftImg8bit" / name).glob("*/*_leftImg8bit.png"))
        out = []
        for path in images:
            rel = path.relative_to(root).as_posix()
            stem = path.name.removesuffix("_leftImg8bit.png")
            mask = f"gtFine/{name}/{path.parent.name}/{stem}_gtFine_{kind}.png"
            out.append(Sample(stem, rel, mask))
        return out

    def from_line(image: str, mask: str) -> Sample:
        stem = Path(image).name.removesuffix("_leftImg8bit.png")
        if not use_train_ids:
            mask = mask.replace("_labelTrainIds.png", "_labelIds.png")
        return Sample(stem, image, mask)

    train, val = split("train"), split("val")
    if not train:
        raise DataError(f"{root / 'leftImg8bit' / 'train'}: no *_leftImg8bit.png images found")
    return Source(
        name="cityscapes",
        root=root,
        class_names=list(CITYSCAPES_CLASSES),
        train=train,
        val=val,
        mask_lut=None if use_train_ids else cityscapes_lut(),
        from_list_line=from_line,
    )


# --------------------------------------------------------------------------------------------
# Generic folder format


def stable_fraction(name: str, salt: str) -> float:
    """A number in [0, 1) fixed by (salt, name): the same on every machine and Python."""
    digest = hashlib.sha256(f"{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def folder_source(root: Path) -> Source:
    """``root/images/*`` (any common format), ``root/masks/<stem>.png`` (class ids, 255 =
    ignore; an image without a mask is unlabeled-only), ``root/classes.txt`` (one class name
    per line, in id order) and optionally ``root/val.txt`` (image stems of the validation
    split; without it, a stable 15% of the images that have masks)."""
    require_dir(root, "dataset root")
    images_dir = require_dir(root / "images", "images/ folder")
    classes = read_class_names(root / "classes.txt")
    masks_dir = root / "masks"
    if masks_dir.exists() and not masks_dir.is_dir():  # else: "no image has a mask", misleading
        raise DataError(f"{masks_dir}: a file, not the masks/ folder")
    samples = []
    stems: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in stems:  # both would share one mask and one name
            raise DataError(
                f"{path}: another image has the same name, {stems[path.stem].name}; names must be unique"
            )
        stems[path.stem] = path
        mask = masks_dir / f"{path.stem}.png"
        samples.append(
            Sample(
                path.stem,
                path.relative_to(root).as_posix(),
                mask.relative_to(root).as_posix() if mask.is_file() else None,
            )
        )
    if not samples:
        raise DataError(f"{images_dir}: no images found")
    if masks_dir.is_dir() and not any(s.mask for s in samples):
        other = sorted(p.name for p in masks_dir.iterdir() if p.suffix.lower() != ".png")
        if other:  # e.g. masks saved as .jpg: lossy, and not where the reader looks
            raise DataError(f"{masks_dir}: no mask is a PNG named after its image (found {other[0]}, ...)")
    if (root / "val.txt").is_file():
        val_names = {" ".join(row) for row in read_list(root / "val.txt")}  # stems may hold spaces
        unknown = val_names - {s.name for s in samples}
        if unknown:
            raise DataError(f"{root / 'val.txt'}: names a missing image '{sorted(unknown)[0]}'")
    else:
        val_names = {s.name for s in samples if s.mask and stable_fraction(s.name, "val") < 0.15}
    val = [s for s in samples if s.name in val_names]
    missing = [s for s in val if s.mask is None]
    if missing:
        raise DataError(f"{root / 'masks'}: validation image '{missing[0].name}' has no mask")

    def from_line(image: str, mask: str) -> Sample:
        return Sample(Path(image).stem, image, mask)

    return Source(
        name="folder",
        root=root,
        class_names=classes,
        train=[s for s in samples if s.name not in val_names],
        val=val,
        from_list_line=from_line,
    )
