"""Sample panels: rows of image tiles (RGB arrays) for MLflow's image slider."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from segsweep.data.transforms import denormalize
from segsweep.primitives import IGNORE


def palette() -> np.ndarray:
    """A fixed colour per class id (256 x 3); background black, ignore (255) white."""
    rng = np.random.default_rng(7)
    pal = rng.integers(40, 256, size=(256, 3)).astype(np.uint8)
    pal[0] = (0, 0, 0)
    pal[IGNORE] = (255, 255, 255)
    return pal


PALETTE = palette()


def colour(mask: Tensor | np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8."""
    ids = mask.cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    return PALETTE[ids.astype(np.uint8)]


def heat(values: Tensor) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, blue (0) to red (1)."""
    v = (values.float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return np.stack([v, v // 2, 255 - v], -1)


def image_tile(image: Tensor) -> np.ndarray:
    """A normalised (3, H, W) image -> (H, W, 3) uint8."""
    return denormalize(image).permute(1, 2, 0).numpy()


def compose(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tiles of equal height side by side, rows stacked; grey gaps between tiles."""
    lines = []
    for tiles in rows:
        h = tiles[0].shape[0]
        sep = np.full((h, gap, 3), 128, dtype=np.uint8)
        parts = []
        for tile in tiles:
            parts += [tile, sep]
        lines.append(np.concatenate(parts[:-1], axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [
        np.pad(line, ((0, gap), (0, width - line.shape[1]), (0, 0)), constant_values=128) for line in lines
    ]
    return np.concatenate(lines, axis=0)


__all__ = ["PALETTE", "colour", "compose", "heat", "image_tile"]
