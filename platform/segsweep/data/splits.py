"""Label-ratio splits: labeled / unlabeled / tuning partitions of a training pool.

Generated splits order the pool by a hash of (seed, image name), so they depend on nothing
but the names and the seed: the same on every machine and for any listing order. The tuning
split is drawn first and independently of the label ratio, so every ratio of a sweep is tuned
on the same images; labeled sets are nested (the 1/16 set is inside the 1/8 set of the same
seed), as with the published lists.

Published lists (UniMatch's ``labeled.txt`` / ``unlabeled.txt``, ``IMAGE MASK`` per line) are
read as they are; the masks named on unlabeled lines are never given to training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from segsweep.data.sources import Sample, Source, read_list, stable_fraction
from segsweep.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    labeled: list[Sample]
    unlabeled: list[Sample]
    #: Held-out training images with masks: what sweeps tune and early-stop on.
    tune: list[Sample]
    #: e.g. "generated/seed0" or "published/pascal/92": runs compare only within a family.
    family: str


def _ordered(samples: list[Sample], salt: str) -> list[Sample]:
    return sorted(samples, key=lambda s: (stable_fraction(s.name, salt), s.name))


def _take_tune(
    pool: list[Sample],
    tune_size: int,
    seed: int,
    has_mask: Callable[[Sample], bool] = lambda s: s.mask is not None,
) -> tuple[list[Sample], list[Sample]]:
    """The first ``tune_size`` images with masks, in a seed-fixed order; and the rest."""
    tune: list[Sample] = []
    for sample in _ordered(pool, f"tune:{seed}"):
        if len(tune) == tune_size:
            break
        if has_mask(sample):
            tune.append(sample)
    chosen = {s.name for s in tune}
    return tune, [s for s in pool if s.name not in chosen]


def labeled_count(pool_size: int, label_ratio: float, num_labeled: int | None) -> int:
    if num_labeled is not None:
        return num_labeled
    return max(1, round(label_ratio * pool_size))


def generated_split(
    pool: list[Sample],
    label_ratio: float,
    seed: int,
    tune_size: int,
    num_labeled: int | None = None,
) -> Split:
    """Hold out ``tune_size`` images, then label ``round(ratio * rest)`` of the rest."""
    masked = sum(s.mask is not None for s in pool)
    if tune_size and tune_size >= masked:
        raise ConfigError(
            f"data.tune_size: holds out {tune_size} images for tuning but only {masked} training "
            "images have masks, and at least one must stay for training"
        )
    tune, rest = _take_tune(pool, tune_size, seed)
    n = labeled_count(len(rest), label_ratio, num_labeled)
    candidates = [s for s in _ordered(rest, f"label:{seed}") if s.mask is not None]
    if n > len(candidates):
        field = "data.num_labeled" if num_labeled is not None else "data.label_ratio"
        raise ConfigError(
            f"{field}: asks for {n} labeled images but only {len(candidates)} training images "
            f"have masks (after {len(tune)} held out by data.tune_size)"
        )
    labeled = candidates[:n]
    chosen = {s.name for s in labeled}
    unlabeled = [s for s in rest if s.name not in chosen]
    return Split(labeled, unlabeled, tune, f"generated/seed{seed}")


def published_split(source: Source, folder: Path, seed: int, tune_size: int) -> Split:
    """Read ``folder/labeled.txt`` and ``folder/unlabeled.txt`` (paths relative to the root)."""
    if source.from_list_line is None:
        raise ConfigError(f"data.split: the {source.name} dataset has no published split lists")
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder not found (expected labeled.txt, unlabeled.txt)")

    def read(name: str) -> list[Sample]:
        path = folder / name
        rows = read_list(path)
        out = []
        for number, row in enumerate(rows, start=1):
            if len(row) != 2:
                raise DataError(f"{path}:{number}: expected 'IMAGE MASK', got {len(row)} fields")
            for field in map(PurePosixPath, row):  # absolute or '..': a file outside data.root
                if field.is_absolute() or ".." in field.parts:
                    raise DataError(f"{path}:{number}: '{field}' is not a path inside data.root")
            out.append(source.from_list_line(row[0], row[1]))
        return out

    labeled, unlabeled = read("labeled.txt"), read("unlabeled.txt")
    for name, listed in (("labeled.txt", labeled), ("unlabeled.txt", unlabeled)):
        seen: set[str] = set()
        for sample in listed:
            if sample.name in seen:
                raise DataError(f"{folder / name}: '{sample.name}' is listed twice")
            seen.add(sample.name)
    overlap = {s.name for s in labeled} & {s.name for s in unlabeled}
    if overlap:
        raise DataError(f"{folder}: '{sorted(overlap)[0]}' is both labeled and unlabeled")
    scored = {s.name for s in source.val} & {s.name for s in labeled + unlabeled}
    if scored:  # a run would train on the images it is scored on
        raise DataError(f"{folder}: '{sorted(scored)[0]}' is a validation image of the dataset")
    # Tuning images come from the unlabeled pool (their masks exist in the benchmarks but are
    # never trained on); the labeled set stays exactly the published one.
    tune, unlabeled = _take_tune(
        unlabeled, tune_size, seed, lambda s: isinstance(s.mask, str) and (source.root / s.mask).is_file()
    )
    if len(tune) < tune_size:  # fewer would quietly weaken (or, with none, drop) model selection
        raise ConfigError(
            f"data.tune_size: holds out {tune_size} images for tuning but only {len(tune)} images "
            f"of {folder / 'unlabeled.txt'} have a mask on disk; set data.tune_size: {len(tune)}"
            + (" (no tuning split)" if not tune else "")
        )
    family = "published/" + "/".join(folder.resolve().parts[-2:])
    return Split(labeled, unlabeled, tune, family)


#: The published split lists shipped with segsweep (see its README.md for their source).
SHIPPED_SPLITS = Path(__file__).resolve().parents[1] / "reference" / "splits"


def split_folder_of(folder: Path) -> Path:
    """``data.split`` as a folder: the path as given when it exists, else (relative paths)
    the same path among the lists shipped with segsweep, e.g. ``unimatch/pascal/92``."""
    if folder.is_dir() or folder.is_absolute():
        return folder
    shipped = SHIPPED_SPLITS / folder
    return shipped if shipped.is_dir() else folder


def make_split(
    source: Source,
    label_ratio: float,
    seed: int,
    tune_size: int,
    num_labeled: int | None = None,
    split_folder: Path | None = None,
) -> Split:
    if split_folder is not None:
        return published_split(source, split_folder_of(split_folder), seed, tune_size)
    return generated_split(source.train, label_ratio, seed, tune_size, num_labeled)
