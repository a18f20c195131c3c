"""Up-front dataset checks: a missing, truncated or inconsistent file is reported before
any training starts, with its path.

``missing_files`` only stats files (cheap; every run does it). ``verify`` decodes every image
and mask that a run would read (``segsweep check-data``, or ``data.verify: true``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from segsweep.data.loaders import Data
from segsweep.data.sources import Sample
from segsweep.errors import DataError, one_line


def _files(data: Data) -> list[tuple[Sample, bool]]:
    """(sample, whether its mask is read) for every image a run touches."""
    s = data.split
    return [(x, True) for x in s.labeled + s.tune + data.source.val] + [(x, False) for x in s.unlabeled]


def missing_files(data: Data) -> list[str]:
    """Paths named by the dataset or its split lists that do not exist."""
    root = data.source.root
    missing = []
    for sample, with_mask in _files(data):
        paths = [sample.image] + ([sample.mask] if with_mask else [])
        missing += [str(root / p) for p in paths if isinstance(p, str) and not (root / p).is_file()]
    return missing


def missing_problem(path: str) -> str:
    """What is wrong with a path ``missing_files`` returned, as one line naming it."""
    return f"{path}: is a folder, not a file" if Path(path).is_dir() else f"{path}: file not found"


def verify(data: Data, workers: int = 8) -> tuple[int, list[str]]:
    """Decode every image (and mask) a run would read; returns (files checked, problems)."""

    def check(item: tuple[Sample, bool]) -> str | None:
        sample, with_mask = item
        try:
            if with_mask:
                data.source.read_pair(sample)
            else:
                data.source.read_image(sample)
        except DataError as exc:
            return one_line(exc)
        return None

    items = _files(data)
    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(check, items) if p]
    return len(items), problems


def require_files(data: Data) -> None:
    missing = missing_files(data)
    if missing:
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise DataError(f"{missing_problem(missing[0])}{more}")


def require_valid(data: Data) -> int:
    count, problems = verify(data)
    if problems:
        more = (
            f" (and {len(problems) - 1} more problems; run segsweep check-data)" if len(problems) > 1 else ""
        )
        raise DataError(f"{problems[0]}{more}")
    return count


__all__ = ["missing_files", "missing_problem", "require_files", "require_valid", "verify"]
