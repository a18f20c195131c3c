"""The embedded synthetic dataset: generated offline from a seed, cached on disk.

Scenes hold several objects on a textured, cluttered background. A class is a pair
(shape, texture): disk, box or triangle, filled with stripes or dots. Neither cue alone names
the class; each class has a typical hue, spread so wide (std 35 degrees, classes 60 apart) that
colour only hints at it; and every object varies in size, aspect ratio, rotation, texture
period and orientation. Distractors (the same shapes with a third texture, and other shapes
with the class textures, in any hue) are background, objects occlude each other, and a
one-pixel band on every object border is ignored (255), as in VOC. A model must learn shape
and texture jointly, which takes many labeled images: the label ratio matters.

Everything is a pure function of (seed, index, image_size), so the same config gives the
same bytes on any machine; arrays are cached as ``.npy`` files and memory-mapped.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from segsweep.errors import DataError
from segsweep.files import write_atomic
from segsweep.primitives import IGNORE

SHAPES = ("disk", "box", "triangle")
TEXTURES = ("stripes", "dots")
CLASS_NAMES = ["background"] + [f"{s}-{t}" for s in SHAPES for t in TEXTURES]
NUM_CLASSES = len(CLASS_NAMES)  # 7
CLASS_HUES = [0.0] + [60.0 * i for i in range(NUM_CLASSES - 1)]  # degrees, per class
HUE_SPREAD = 35.0  # std of an object's hue around its class hue (neighbours are 60 apart)
GENERATOR_VERSION = 2  # bump when the drawing code changes: the cache key includes it


def _rotated(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, angle: float) -> tuple:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    return c * dx + s * dy, -s * dx + c * dy


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, radius: float, aspect: float) -> np.ndarray:
    a, b = radius * aspect, radius / aspect
    if kind == "disk":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "box":
        return (np.abs(u) <= a * 0.85) & (np.abs(v) <= b * 0.85)
    if kind == "triangle":  # isoceles, pointing along -v, about as large as the disk
        return (v <= b * 0.8) & (v >= -b * 1.2 + 1.6 * np.abs(u) * b / a)
    if kind == "cross":
        return ((np.abs(u) <= a * 0.3) & (np.abs(v) <= b)) | ((np.abs(v) <= b * 0.3) & (np.abs(u) <= a))
    if kind == "ring":
        r = (u / a) ** 2 + (v / b) ** 2
        return (r <= 1.0) & (r >= 0.35)
    raise ValueError(kind)


def _texture(
    kind: str, u: np.ndarray, v: np.ndarray, period: float, phase: float, rng: np.random.Generator
) -> np.ndarray:
    """Texture pattern in [0, 1] in the object's own (rotated) frame."""
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / period + phase) > 0).astype(np.float32)
    if kind == "dots":
        pu = np.mod(u + phase, period) - period / 2
        pv = np.mod(v + phase * 0.7, period) - period / 2
        return ((pu**2 + pv**2) <= (0.3 * period) ** 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "noise":
        return (rng.random(u.shape) > 0.5).astype(np.float32)
    raise ValueError(kind)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV (h in degrees) -> RGB in [0, 255]."""
    h = (h % 360) / 60
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return (np.array(rgb) + (v - c)) * 255


def _colour_pair(rng: np.random.Generator, hue: float) -> tuple[np.ndarray, np.ndarray]:
    """A light and a dark colour of about ``hue``: the texture shows as lightness."""
    sat = rng.uniform(0.45, 1.0)
    return _hsv(hue, sat, rng.uniform(0.75, 1.0)), _hsv(hue + rng.normal(0, 10), sat, rng.uniform(0.2, 0.45))


def render_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image (size, size, 3) uint8 and mask (size, size) uint8 in [0, 6] or 255."""
    rng = np.random.default_rng([seed, index, size, GENERATOR_VERSION])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size / 64.0  # textures and objects scale with the image

    # Background: a smooth colour gradient, fine noise and a few random lines (clutter).
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    t = (xx * np.cos(rng.uniform(0, np.pi)) + yy * np.sin(rng.uniform(0, np.pi))) / size
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(rng.integers(2, 6)):
        a, off = rng.uniform(0, np.pi), rng.uniform(-size / 2, size / 2)
        dist = np.abs((xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a) - off)
        image[dist < rng.uniform(0.5, 1.5) * scale] = rng.uniform(0, 255, 3)
    mask = np.zeros((size, size), dtype=np.uint8)
    instance = np.zeros((size, size), dtype=np.int32)

    n_objects = int(rng.integers(2, 5))
    n_distractors = int(rng.integers(1, 4))
    kinds: list[tuple[int, str, str]] = []
    for _ in range(n_objects):
        cls = int(rng.integers(1, NUM_CLASSES))
        shape, texture = SHAPES[(cls - 1) // 2], TEXTURES[(cls - 1) % 2]
        kinds.append((cls, shape, texture))
    for _ in range(n_distractors):
        if rng.random() < 0.5:  # a class shape with a texture no class has
            kinds.append((0, SHAPES[rng.integers(3)], ("checker", "noise")[rng.integers(2)]))
        else:  # a class texture on a shape no class has
            kinds.append((0, ("cross", "ring")[rng.integers(2)], TEXTURES[rng.integers(2)]))
    rng.shuffle(kinds)  # drawing order decides who occludes whom

    for obj_id, (cls, shape, texture) in enumerate(kinds, start=1):
        radius = rng.uniform(7, 15) * scale
        cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
        angle = rng.uniform(0, 2 * np.pi)
        u, v = _rotated(xx, yy, cx, cy, angle)
        region = _shape_mask(shape, u, v, radius, rng.uniform(0.75, 1.3))
        if region.sum() < 12 * scale * scale:
            continue
        period = rng.uniform(3.5, 6.0) * scale
        pattern = _texture(texture, u, v, period, rng.uniform(0, 2 * np.pi), rng)
        # Each class has a typical hue, but hues spread wide enough that neighbours overlap:
        # colour hints at the class, only shape and texture settle it.
        hue = CLASS_HUES[cls] + rng.normal(0, HUE_SPREAD) if cls else rng.uniform(0, 360)
        fg, bg = _colour_pair(rng, hue)
        shade = 1.0 + 0.25 * ((u / radius) * rng.uniform(-1, 1))  # some lighting variation
        obj = (pattern[..., None] * fg + (1 - pattern[..., None]) * bg) * shade[..., None]
        image[region] = obj[region]
        mask[region] = cls
        instance[region] = obj_id

    image += rng.normal(0, 8, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Ignore a one-pixel band where two objects (or object and background) meet.
    edge = np.zeros_like(mask, dtype=bool)
    edge[:, 1:] |= instance[:, 1:] != instance[:, :-1]
    edge[1:, :] |= instance[1:, :] != instance[:-1, :]
    labeled_edge = edge & ((mask > 0) | np.roll(mask > 0, 1, 0) | np.roll(mask > 0, 1, 1))
    mask[labeled_edge] = IGNORE
    return image, mask


def cache_key(seed: int, size: int, num_train: int, num_val: int) -> str:
    spec = json.dumps([GENERATOR_VERSION, seed, size, num_train, num_val])
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def generate(seed: int, size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.empty((count, size, size), dtype=np.uint8)
    for i in range(count):
        images[i], masks[i] = render_scene(seed, start + i, size)
    return images, masks


def _cached(
    img_path: Path, mask_path: Path, img_shape: tuple[int, ...], mask_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, memory-mapped, if both files are whole and of the expected shapes."""
    try:
        images, masks = np.load(img_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # missing, truncated, not an .npy
        return None
    if images.shape != img_shape or masks.shape != mask_shape:
        return None
    return images, masks


def load_or_generate(
    root: Path, seed: int, size: int, num_train: int, num_val: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Arrays of both splits, memory-mapped from ``root/synthetic-<key>/``; generated if absent.

    Validation scenes use indices after the training pool, so they never repeat a training
    scene. Files are written to temporaries and renamed: an interrupted generation leaves no
    half-written cache.
    """
    folder = root / f"synthetic-{cache_key(seed, size, num_train, num_val)}"
    out = {}
    for split, start, count in (("train", 0, num_train), ("val", num_train, num_val)):
        img_path, mask_path = folder / f"{split}_images.npy", folder / f"{split}_masks.npy"
        arrays = _cached(img_path, mask_path, (count, size, size, 3), (count, size, size))
        if arrays is None:  # absent, or damaged by hand: it is a cache, so make it again
            images, masks = generate(seed, size, start, count)
            try:  # a cache already made may sit in a read-only folder; a new one needs to write
                write_atomic(img_path, functools.partial(np.save, arr=images))
                write_atomic(mask_path, functools.partial(np.save, arr=masks))
            except OSError as exc:
                raise DataError(
                    f"{folder}: cannot write the synthetic dataset's cache ({exc.strerror or exc}); "
                    "point data.root or SEGSWEEP_CACHE at a writable folder"
                ) from None
            arrays = _cached(img_path, mask_path, images.shape, masks.shape)
            assert arrays is not None
        out[split] = arrays
    return out
