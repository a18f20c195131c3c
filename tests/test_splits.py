"""Label-ratio splits: deterministic, disjoint, right sizes, nested; published lists as they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsweep.data.sources import Sample, Source
from segsweep.data.splits import generated_split, make_split, published_split
from segsweep.errors import ConfigError, DataError

from .conftest import SHARED


def pool(n: int, masked: int | None = None) -> list[Sample]:
    masked = n if masked is None else masked
    return [
        Sample(f"img{i:04d}", f"images/img{i:04d}.png", f"masks/img{i:04d}.png" if i < masked else None)
        for i in range(n)
    ]


def names(samples: list[Sample]) -> list[str]:
    return [s.name for s in samples]


def test_generated_split_sizes_and_disjointness() -> None:
    s = generated_split(pool(1000), label_ratio=1 / 8, seed=0, tune_size=40)
    assert len(s.tune) == 40
    assert len(s.labeled) == round((1000 - 40) / 8)
    assert len(s.labeled) + len(s.unlabeled) + len(s.tune) == 1000
    sets = [set(names(x)) for x in (s.labeled, s.unlabeled, s.tune)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert s.family == "generated/seed0"


def test_generated_split_is_deterministic_and_independent_of_listing_order() -> None:
    a = generated_split(pool(300), 0.25, seed=3, tune_size=10)
    b = generated_split(list(reversed(pool(300))), 0.25, seed=3, tune_size=10)
    assert sorted(names(a.labeled)) == sorted(names(b.labeled))
    assert sorted(names(a.tune)) == sorted(names(b.tune))
    c = generated_split(pool(300), 0.25, seed=4, tune_size=10)
    assert set(names(c.labeled)) != set(names(a.labeled))


def test_a_known_split_is_the_same_on_every_machine() -> None:
    # Hash-based order: this exact list is what any machine and Python version produces.
    s = generated_split(pool(40), 0.1, seed=0, tune_size=2)
    assert names(s.tune) == names(generated_split(pool(40), 0.5, seed=0, tune_size=2).tune)
    assert len(s.labeled) == 4
    import hashlib

    def key(name: str, salt: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "big")

    expected_tune = sorted((f"img{i:04d}" for i in range(40)), key=lambda n: key(n, "tune:0"))[:2]
    assert names(s.tune) == expected_tune


def test_labeled_sets_are_nested_and_tune_is_shared_across_ratios() -> None:
    small = generated_split(pool(500), 1 / 16, seed=1, tune_size=20)
    large = generated_split(pool(500), 1 / 4, seed=1, tune_size=20)
    assert set(names(small.labeled)) < set(names(large.labeled))
    assert names(small.tune) == names(large.tune)


def test_labeled_images_must_have_masks() -> None:
    s = generated_split(pool(100, masked=30), 0.2, seed=0, tune_size=5)
    assert all(x.mask is not None for x in s.labeled + s.tune)
    assert any(x.mask is None for x in s.unlabeled)
    with pytest.raises(ConfigError, match="label_ratio"):
        generated_split(pool(100, masked=10), 0.5, seed=0, tune_size=0)


def test_num_labeled_overrides_the_ratio() -> None:
    assert len(generated_split(pool(100), 0.5, 0, 0, num_labeled=7).labeled) == 7


def test_the_logged_ratio_is_what_the_split_holds_when_a_count_overrides_it(tiny) -> None:
    from segsweep.data import build_data
    from segsweep.training.runner import label_ratio_of

    # 96 training images, 8 held out for tuning: 88 left, of which 6 labeled
    cfg = tiny(**{"data.num_labeled": 6, "data.label_ratio": 0.5})
    assert label_ratio_of(cfg, build_data(cfg.data)) == pytest.approx(6 / 88)
    cfg = tiny(**{"data.label_ratio": 0.25})
    assert label_ratio_of(cfg, build_data(cfg.data)) == 0.25  # the nominal ratio, as configured


def fake_source(root: Path) -> Source:
    return Source("voc", root, ["a", "b"], [], [], from_list_line=lambda i, m: Sample(Path(i).stem, i, m))


@pytest.mark.skipif(not SHARED.is_dir(), reason="published split lists not present")
@pytest.mark.parametrize(
    ("family", "n_labeled", "n_total"),
    [("pascal/92", 92, 10582), ("pascal/1464", 1464, 10582), ("cityscapes/1_16", 186, 2975)],
)
def test_published_lists_are_read_as_they_are(
    tmp_path: Path, family: str, n_labeled: int, n_total: int
) -> None:
    folder = SHARED / family
    # No mask file exists under this fake root, so no tuning image can be taken (asking for
    # some is an error, tested below).
    split = published_split(fake_source(tmp_path), folder, seed=0, tune_size=0)
    assert len(split.labeled) == n_labeled
    assert len(split.labeled) + len(split.unlabeled) == n_total
    first = (folder / "labeled.txt").read_text().split()[0]
    assert split.labeled[0].image == first
    assert split.family == f"published/{family}"


def test_published_split_takes_tune_images_only_from_unlabeled_with_masks(tmp_path: Path) -> None:
    (tmp_path / "splits").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "splits" / "labeled.txt").write_text("images/a.jpg masks/a.png\nimages/b.jpg masks/b.png")
    lines = [f"images/u{i}.jpg masks/u{i}.png" for i in range(10)]
    (tmp_path / "splits" / "unlabeled.txt").write_text("\n".join(lines) + "\n")
    for i in range(0, 10, 2):  # only even unlabeled images have a mask on disk
        (tmp_path / "masks" / f"u{i}.png").write_bytes(b"")
    split = published_split(fake_source(tmp_path), tmp_path / "splits", seed=0, tune_size=3)
    assert names(split.labeled) == ["a", "b"]
    assert len(split.tune) == 3 and all(int(s.name[1:]) % 2 == 0 for s in split.tune)
    assert len(split.unlabeled) == 7
    with pytest.raises(ConfigError, match=r"data.tune_size: holds out 6 .* only 5 images of .*unlabeled.txt"):
        published_split(fake_source(tmp_path), tmp_path / "splits", seed=0, tune_size=6)


def test_bad_published_lists_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "labeled.txt").write_text("only-one-field\n")
    (tmp_path / "s" / "unlabeled.txt").write_text("")
    with pytest.raises(DataError, match=r"labeled.txt:1: expected 'IMAGE MASK'"):
        published_split(fake_source(tmp_path), tmp_path / "s", 0, 0)
    with pytest.raises(DataError, match="split folder not found"):
        make_split(fake_source(tmp_path), 0.5, 0, 0, split_folder=tmp_path / "missing")
    # a line twice; an image the dataset scores its runs on; a BOM is not part of a name
    (tmp_path / "s" / "labeled.txt").write_text("images/a.jpg masks/a.png\nimages/a.jpg masks/a.png\n")
    with pytest.raises(DataError, match=r"labeled.txt: 'a' is listed twice"):
        published_split(fake_source(tmp_path), tmp_path / "s", 0, 0)
    (tmp_path / "s" / "labeled.txt").write_text("images/v0.jpg masks/v0.png\n")
    scored = fake_source(tmp_path)
    scored.val.append(Sample("v0", "images/v0.jpg", "masks/v0.png"))
    with pytest.raises(DataError, match=r"'v0' is a validation image of the dataset"):
        published_split(scored, tmp_path / "s", 0, 0)
    for line in ("/etc/a.jpg masks/a.png", "images/a.jpg ../../masks/a.png"):  # outside the root
        (tmp_path / "s" / "labeled.txt").write_text(line + "\n")
        with pytest.raises(DataError, match=r"labeled.txt:1: '.*' is not a path inside data.root"):
            published_split(fake_source(tmp_path), tmp_path / "s", 0, 0)
    (tmp_path / "s" / "labeled.txt").write_bytes("\ufeffimages/a.jpg masks/a.png\r\n".encode())
    assert names(published_split(fake_source(tmp_path), tmp_path / "s", 0, 0).labeled) == ["a"]
