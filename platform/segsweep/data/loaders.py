"""Torch datasets and loaders over a Source and a Split.

Training loaders are infinite streams. ``StreamSampler`` yields ``(index, seed, position)``:
the order comes from per-epoch permutations fixed by the seed, and each draw's augmentation
is seeded by its position, so the stream is a pure function of (seed, position). Resuming at
step k means starting the sampler at position k * batch_size: exact resume with any number
of workers, no state to save.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segsweep.data import transforms as T
from segsweep.data.sources import Sample, Source
from segsweep.data.splits import Split
from segsweep.primitives import IGNORE, cutmix_box, rect_masks

Draw = tuple[int, int, int]  # (index into the sample list, stream seed, stream position)

# What the datasets hand over: images (3, H, W) and masks (H, W) as uint8, a quarter of the
# bytes of float32 images and an eighth of int64 masks (16 MiB a batch of 16 at 512 px, not
# 80 MiB): worker processes, pinning and the copy to the GPU move that much less.
# ``to_model`` normalises the images and widens the masks where the model runs.
IMAGE_KEYS = frozenset({"image", "image_l", "image_u_w", "image_u_s"})
MASK_KEYS = frozenset({"mask", "mask_l"})
# Rectangles (the CutMix box, the unpadded area) travel as 4 int32 numbers, (top, left,
# height, width); ``to_model`` makes them (H, W) bool masks. As masks they were 8 of the 20
# MiB of an unlabeled batch of 16 at 512 px.
RECT_KEYS = frozenset({"box_u", "valid_u"})


class StreamSampler(Sampler[Draw]):
    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self) -> Iterator[Draw]:
        position = self.start
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        while True:
            e, k = divmod(position, self.size)
            if e != epoch:
                g = torch.Generator().manual_seed(hash_seed(self.seed, e))
                epoch, order = e, torch.randperm(self.size, generator=g)
            yield int(order[k]), self.seed, position
            position += 1


def hash_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (numpy's SeedSequence: stable across platforms)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def tags_of(mask: np.ndarray, num_classes: int) -> torch.Tensor:
    """(C,) multi-hot of the classes present in a mask (255 ignored); class 0 included."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]  # 2.4x np.unique's speed
    return torch.from_numpy((counts > 0).astype(np.float32))


@dataclass(frozen=True)
class AugmentParams:
    crop: int
    scale: tuple[float, float]
    hflip: bool
    jitter: float
    grayscale_prob: float
    blur_prob: float
    blur_sigma_max: float
    cutmix_prob: float
    blur_sigma_min: float | None = None


class LabeledSet(Dataset):
    """Weak view of labeled images: image_l, mask_l, tags_l.

    ``masks`` (image name -> array) replaces the dataset's masks, e.g. pseudo masks that a
    weakly supervised method generated; tags still come from the dataset's masks.
    """

    def __init__(
        self,
        source: Source,
        samples: list[Sample],
        aug: AugmentParams,
        masks: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.source, self.samples, self.aug, self.masks = source, samples, aug, masks
        self._tags: dict[int, torch.Tensor] = {}  # a sample's tags never change: count once

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, draw: Draw) -> dict[str, torch.Tensor]:
        index, seed, position = draw
        rng = np.random.default_rng([seed, position])
        image, mask = self.source.read_pair(self.samples[index])
        tags = self._tags.get(index)
        if tags is None:  # from the ground truth, always
            tags = self._tags[index] = tags_of(mask, self.source.num_classes)
        if self.masks is not None:  # a method's own masks (e.g. CAM pseudo masks) replace it
            mask = self.masks[self.samples[index].name]
        img, msk, _ = T.weak(
            T.to_tensor(image),
            torch.from_numpy(np.ascontiguousarray(mask)),
            self.aug.crop,
            rng,
            self.aug.scale,
            self.aug.hflip,
        )
        return {"image_l": img, "mask_l": msk.to(torch.uint8), "tags_l": tags}


class UnlabeledSet(Dataset):
    """Weak view of unlabeled images, its strong view's parameters, a CutMix box and the valid
    (unpadded) area (rectangles, 4 numbers each: ``RECT_KEYS``). The strong view itself is
    made from the weak one per batch, on the run's device (``to_model``), where it costs
    little: in a loader process it was most of the work of a sample.

    Masks are never read here, even where the dataset has them: unlabeled ground truth is
    scored only by the evaluation's pseudo-mask diagnostics, never trained on.
    """

    def __init__(self, source: Source, samples: list[Sample], aug: AugmentParams) -> None:
        self.source, self.samples, self.aug = source, samples, aug

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, draw: Draw) -> dict[str, torch.Tensor]:
        index, seed, position = draw
        rng = np.random.default_rng([seed, position])
        image = self.source.read_image(self.samples[index])
        no_mask = torch.full(image.shape[:2], IGNORE, dtype=torch.uint8)
        img, _, valid = T.weak(
            T.to_tensor(image), no_mask, self.aug.crop, rng, self.aug.scale, self.aug.hflip
        )
        strong = T.draw_strong(
            rng,
            self.aug.jitter,
            self.aug.grayscale_prob,
            self.aug.blur_prob,
            self.aug.blur_sigma_max,
            self.aug.blur_sigma_min,
        )
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        box = cutmix_box(self.aug.crop, self.aug.crop, g, prob=self.aug.cutmix_prob)
        return {
            "image_u_w": img,
            "strong_u": strong,  # the strong view's parameters; ``to_model`` makes image_u_s
            "box_u": torch.tensor(box, dtype=torch.int32),
            "valid_u": torch.tensor(valid, dtype=torch.int32),
        }


class EvalSet(Dataset):
    """Unaugmented images and masks, in order: image (3, H, W), mask (H, W), index."""

    def __init__(self, source: Source, samples: list[Sample]) -> None:
        self.source, self.samples = source, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self.source.read_pair(self.samples[index])
        return {
            "image": T.to_tensor(image),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "index": torch.tensor(index),
        }


def stream_loader(
    dataset: Dataset, batch_size: int, seed: int, start_step: int, workers: int, accelerator: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of batches, starting at ``start_step`` (exact resume).

    ``accelerator``: the step runs on a GPU, so batches are pinned and, without worker
    processes, made ahead by a thread while the GPU computes.
    """
    sampler = StreamSampler(len(dataset), seed, start=start_step * batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=accelerator,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: creating the loader must not consume the global RNG, which
        # the checkpoint restores for the methods' own randomness.
        generator=torch.Generator().manual_seed(seed),
    )
    # Worker processes prefetch on their own. Without them, on a GPU, a thread makes the next
    # batches while the step runs, so the step does not wait for its data. Not on a CPU: there
    # the thread takes cores from the step itself (bench: fixmatch 95 img/s without it, 61
    # with it, on 2 cores).
    return Prefetch(iter(loader)) if accelerator and workers == 0 else iter(loader)


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetch(Iterator[dict[str, torch.Tensor]]):
    """Items of ``source`` made ``depth`` ahead by a background thread, in the same order.

    The thread stops when the iterator is garbage-collected (a stage's streams are dropped
    when it ends); an error in ``source`` is raised by ``next`` in the caller. Never
    used beside worker processes: forking while this thread runs torch can deadlock the child.
    """

    def __init__(self, source: Iterator[dict[str, torch.Tensor]], depth: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        # The thread holds the queue and the event, never ``self``: dropping the iterator
        # stops it.
        thread = threading.Thread(
            target=_fill, args=(source, self._queue, self._stop), name="segsweep-prefetch", daemon=True
        )
        thread.start()
        with _THREADS_LOCK:
            _THREADS[:] = [(t, e) for t, e in _THREADS if t.is_alive()] + [(thread, self._stop)]

    def __next__(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, _Raised):
            self._queue.put(item)  # every later call raises it too
            raise item.error
        return item

    def __del__(self) -> None:
        self._stop.set()


# Every prefetch thread with its stop event. At exit they are stopped and joined before the
# interpreter finalizes: a daemon thread still freeing its queued batches then is killed
# inside torch's tensor destructor, and the process aborts (seen at the end of the test
# suite, with Ray's terminate handler loaded: exit status 134 after every test passed).
_THREADS: list[tuple[threading.Thread, threading.Event]] = []
_THREADS_LOCK = threading.Lock()


@atexit.register
def _stop_prefetch_threads(timeout: float = 10.0) -> None:
    with _THREADS_LOCK:
        threads = list(_THREADS)
    for _, stop in threads:
        stop.set()
    deadline = time.monotonic() + timeout
    for thread, _ in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _fill(source: Iterator[Any], out: queue.Queue[Any], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            item: Any = next(source)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            item = _Raised(exc)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                break
            except queue.Full:
                continue
        if isinstance(item, _Raised):
            return


def to_model(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool
) -> dict[str, torch.Tensor]:
    """A loader's batch as the model takes it, on ``device``: images normalised to float
    (B, 3, H, W), in channels_last if asked; masks int64 (B, H, W); rectangles (B, 4) as
    bool masks (B, H, W) the size of the unlabeled images; the rest as it was.
    A batch with strong-view parameters (``strong_u``) gets its strong view, ``image_u_s``,
    made here from the weak view (``transforms.strong_views``)."""
    out = {}
    batch = dict(batch)
    params = batch.pop("strong_u", None)
    if params is not None:
        weak = batch["image_u_w"].to(device, non_blocking=True)
        batch["image_u_w"] = weak
        batch["image_u_s"] = T.strong_views(weak, params)  # params stay on the host
    for key, value in batch.items():
        if key in IMAGE_KEYS:
            out[key] = model_image(value, device, channels_last)
        elif key in RECT_KEYS:
            out[key] = rect_masks(value.to(device, non_blocking=True), *batch["image_u_w"].shape[-2:])
        else:
            value = value.to(device, non_blocking=True)
            out[key] = value.long() if key in MASK_KEYS else value
    return out


def model_image(image: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Loader images (B, 3, H, W) uint8 -> normalised float on ``device``."""
    image = T.normalize(image.to(device, non_blocking=True))
    return image.contiguous(memory_format=torch.channels_last) if channels_last else image


def eval_loader(source: Source, samples: list[Sample], batch_size: int, workers: int) -> DataLoader:
    return DataLoader(
        EvalSet(source, samples),
        batch_size=batch_size if source.fixed_size else 1,
        shuffle=False,
        num_workers=workers,
    )


@dataclass
class Data:
    """What a run trains and evaluates on."""

    source: Source
    split: Split
    aug: AugmentParams

    def labeled(self, masks: dict[str, np.ndarray] | None = None) -> LabeledSet:
        return LabeledSet(self.source, self.split.labeled, self.aug, masks)

    def unlabeled(self) -> UnlabeledSet:
        return UnlabeledSet(self.source, self.split.unlabeled, self.aug)

    def all_images(self) -> UnlabeledSet:
        """Every training image as an unlabeled one (self-supervised stages)."""
        return UnlabeledSet(self.source, self.split.labeled + self.split.unlabeled, self.aug)
