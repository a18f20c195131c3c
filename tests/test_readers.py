"""VOC, Cityscapes and folder readers on fixtures in the real layouts, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsweep.data.sources import cityscapes_source, folder_source, voc_source
from segsweep.data.splits import make_split
from segsweep.errors import DataError

from .fixtures import write_cityscapes, write_folder, write_voc


def test_voc_classic_reads_palette_masks_with_255_borders(tmp_path: Path) -> None:
    src = voc_source(write_voc(tmp_path), augmented=False)
    assert src.num_classes == 21 and len(src.train) == 6 and len(src.val) == 3
    image, mask = src.read_pair(src.train[0])
    assert image.shape == (48, 64, 3) and mask.shape == (48, 64)
    assert 255 in np.unique(mask)  # object borders stay ignored
    ids = set(np.unique(mask)) - {0, 255}
    assert len(ids) == 1 and 1 <= ids.pop() <= 20


def test_voc_aug_falls_back_to_segmentation_class_aug(tmp_path: Path) -> None:
    src = voc_source(write_voc(tmp_path), augmented=True)
    assert len(src.train) == 10
    aug_only = [s for s in src.train if "aug" in s.name]
    assert aug_only and all(str(s.mask).startswith("SegmentationClassAug/") for s in aug_only)
    _, mask = src.read_pair(aug_only[0])
    assert 255 not in np.unique(mask)


def test_voc_published_list_lines_resolve_augmented_masks(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    (root / "split").mkdir()
    (root / "split" / "labeled.txt").write_text(
        "JPEGImages/2007_train000.jpg SegmentationClass/2007_train000.png\n"
    )
    (root / "split" / "unlabeled.txt").write_text(
        "JPEGImages/2007_aug000.jpg SegmentationClass/2007_aug000.png\n"
        "JPEGImages/2007_aug001.jpg SegmentationClass/2007_aug001.png\n"
    )
    split = make_split(voc_source(root, True), 0.5, 0, tune_size=1, split_folder=root / "split")
    assert [s.name for s in split.labeled] == ["2007_train000"]
    assert len(split.tune) == 1 and str(split.tune[0].mask).startswith("SegmentationClassAug/")


@pytest.mark.parametrize("train_ids", [True, False])
def test_cityscapes_published_list_lines_read_with_or_without_train_id_masks(
    tmp_path: Path, train_ids: bool
) -> None:
    # UniMatch's lines name *_gtFine_labelTrainIds.png; the official download has only
    # *_labelIds.png until cityscapesScripts is run, so those are read and mapped instead.
    root = write_cityscapes(tmp_path, train_ids=train_ids)
    (root / "split").mkdir()
    line = "leftImg8bit/train/aachen/aachen_{0:06d}_000019_leftImg8bit.png gtFine/train/aachen/aachen_{0:06d}_000019_gtFine_labelTrainIds.png\n"
    (root / "split" / "labeled.txt").write_text(line.format(0))
    (root / "split" / "unlabeled.txt").write_text(line.format(1) + line.format(2))
    src = cityscapes_source(root)
    split = make_split(src, 0.5, 0, tune_size=1, split_folder=root / "split")
    assert [s.name for s in split.labeled] == ["aachen_000000_000019"]
    assert len(split.tune) == 1 and len(split.unlabeled) == 1
    _, mask = src.read_pair(split.labeled[0])
    raw = np.asarray(Image.open(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"))
    assert (mask[raw == 26] == 13).all() and (mask[raw == 4] == 255).all()


@pytest.mark.parametrize("train_ids", [True, False])
def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path, train_ids: bool) -> None:
    src = cityscapes_source(write_cityscapes(tmp_path, train_ids=train_ids))
    assert src.num_classes == 19 and len(src.train) == 3 and len(src.val) == 3
    _, mask = src.read_pair(src.train[0])
    assert set(np.unique(mask)) <= {0, 1, 2, 13, 255}
    raw = np.asarray(Image.open(tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"))
    assert (mask[raw == 26] == 13).all() and (mask[raw == 7] == 0).all() and (mask[raw == 4] == 255).all()


def test_folder_format_unlabeled_images_need_no_mask(tmp_path: Path) -> None:
    src = folder_source(write_folder(tmp_path))
    assert src.class_names == ["background", "cat", "dog"]
    assert [s.name for s in src.val] == ["im00", "im01"]
    assert sum(s.mask is None for s in src.train) == 3
    split = make_split(src, 0.5, 0, tune_size=1)
    assert all(s.mask is not None for s in split.labeled + split.tune)


def test_missing_roots_and_unreadable_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="JPEGImages"):
        voc_source(tmp_path, augmented=False)
    root = write_voc(tmp_path / "voc")
    src = voc_source(root, augmented=False)
    (root / "JPEGImages" / f"{src.train[0].name}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"{src.train[0].name}.jpg: cannot read image"):
        src.read_image(src.train[0])


def test_a_masks_file_where_the_folder_belongs_is_named(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    for mask in (root / "masks").iterdir():
        mask.unlink()
    (root / "masks").rmdir()
    (root / "masks").write_text("not a folder")
    with pytest.raises(DataError, match=r"masks: a file, not the masks/ folder"):
        folder_source(root)


def test_mask_ids_beyond_the_class_count_are_refused(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    Image.fromarray(np.full((40, 40), 7, dtype=np.uint8), mode="L").save(root / "masks" / "im03.png")
    src = folder_source(root)
    sample = next(s for s in src.train if s.name == "im03")
    with pytest.raises(DataError, match=r"im03.png: mask has class id 7 but the dataset has 3 classes"):
        src.read_mask(sample)


def test_mask_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8), mode="L").save(root / "masks" / "im04.png")
    src = folder_source(root)
    with pytest.raises(DataError, match=r"im04.png: mask is 12x10 but its image is 40x40"):
        src.read_pair(next(s for s in src.train if s.name == "im04"))


def test_rgb_masks_are_refused(tmp_path: Path) -> None:
    root = write_folder(tmp_path)
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(root / "masks" / "im05.png")
    src = folder_source(root)
    with pytest.raises(DataError, match="palette or grayscale"):
        src.read_mask(next(s for s in src.train if s.name == "im05"))


def test_folder_class_lists_and_image_names_that_would_mislabel_are_refused(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d")
    classes = root / "classes.txt"
    for text, message in (
        ("background\n\ncat\ndog\n", r"classes.txt:2: blank line"),  # would shift dog to id 3
        ("background\ncat\ncat\n", r"classes.txt:3: class 'cat' already on line 2"),
        ("\n".join(f"c{i}" for i in range(256)) + "\n", r"256 classes; at most 255"),
    ):
        classes.write_text(text)
        with pytest.raises(DataError, match=message):
            folder_source(root)
    classes.write_bytes("\ufeffbackground\r\ncat\r\ndog\r\n\r\n".encode())  # Notepad's BOM and CRLF
    assert folder_source(root).class_names == ["background", "cat", "dog"]
    Image.open(root / "images" / "im03.png").save(root / "images" / "im03.jpg")  # one name, two files
    with pytest.raises(DataError, match=r"im03.png: another image has the same name, im03.jpg"):
        folder_source(root)
    (root / "images" / "im03.jpg").unlink()
    jpg = write_folder(tmp_path / "jpg")
    for mask in (jpg / "masks").iterdir():  # masks saved as JPEG: found nowhere, said so
        mask.rename(mask.with_suffix(".jpg"))
    with pytest.raises(DataError, match=r"masks: no mask is a PNG named after its image \(found im00.jpg"):
        folder_source(jpg)
    (root / "val.txt").write_text("im00\nim01 extra\n")  # a name with a space, which no image has
    with pytest.raises(DataError, match=r"val.txt: names a missing image 'im01 extra'"):
        folder_source(root)


def test_the_synthetic_cache_is_remade_when_damaged_and_must_be_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsweep.config import DataConfig
    from segsweep.data import load_source
    from segsweep.data.synthetic import load_or_generate
    from segsweep.errors import ConfigError

    first = np.array(load_or_generate(tmp_path / "c", 0, 32, 8, 4)["train"][0])
    [cached] = (tmp_path / "c").glob("*/train_images.npy")
    data = cached.read_bytes()
    cached.unlink()  # a new file: the arrays mapped above stay valid
    cached.write_bytes(data[: len(data) // 2])  # cut short (a full disk, a copy interrupted)
    again = load_or_generate(tmp_path / "c", 0, 32, 8, 4)["train"][0]
    assert np.array_equal(first, again)
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("SEGSWEEP_CACHE", str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match=r"SEGSWEEP_CACHE: .*afile is a file, not a folder"):
        load_source(DataConfig())
