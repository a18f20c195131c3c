"""Joint augmentation keeps image and mask aligned; the stream is a function of (seed, position)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from segsweep.data import transforms as T
from segsweep.data.loaders import StreamSampler


def coded_pair(h: int = 48, w: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask of large blocks and an image whose red channel is 40 * class id."""
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[: h // 2, : w // 2], mask[: h // 2, w // 2 :], mask[h // 2 :, : w // 3] = 1, 2, 3
    image = torch.stack([mask * 40, torch.full_like(mask, 7), torch.full_like(mask, 9)])
    return image, mask


@pytest.mark.parametrize("seed", range(20))
def test_weak_crop_and_flip_keep_alignment_exactly(seed: int) -> None:
    image, mask = coded_pair()
    rng = np.random.default_rng(seed)
    img, msk, valid = T.weak(image, mask, 64, rng, scale=(1.0, 1.0), hflip=True)
    assert img.shape == (3, 64, 64) and msk.shape == (64, 64)
    assert (img[0][valid] == msk[valid] * 40).all()
    assert (msk[~valid] == 255).all() and (img[:, ~valid] == 0).all()


@pytest.mark.parametrize("seed", range(20))
def test_weak_scaling_keeps_alignment_inside_regions(seed: int) -> None:
    image, mask = coded_pair(96, 96)
    img, msk, valid = T.weak(image, mask, 64, np.random.default_rng(seed), scale=(0.5, 2.0), hflip=True)
    decoded = (img[0].float() / 40).round()
    inside = valid & (msk != 255)
    agree = (decoded[inside] == msk[inside].float()).float().mean()
    assert agree > 0.95  # only pixels on resampled block edges may differ


def test_strong_view_changes_colour_not_geometry() -> None:
    image, _ = coded_pair(64, 64)
    rng = np.random.default_rng(0)
    out = T.strong(image, rng, jitter=0.5, grayscale_prob=0.0, blur_prob=0.0)
    assert out.shape == image.shape and out.dtype == torch.uint8
    # a photometric map is monotone per channel: equal input pixels stay equal
    flat_in, flat_out = image.reshape(3, -1).T, out.reshape(3, -1).T
    for colour in torch.unique(flat_in, dim=0):
        same = (flat_in == colour).all(1)
        assert len(torch.unique(flat_out[same], dim=0)) == 1


def test_stream_sampler_restarts_at_any_position() -> None:
    full = StreamSampler(10, seed=5)
    it = iter(full)
    first = [next(it) for _ in range(35)]
    later = iter(StreamSampler(10, seed=5, start=17))
    assert [next(later) for _ in range(18)] == first[17:]
    assert sorted(d[0] for d in first[:10]) == list(range(10))  # each epoch is a permutation


def test_prefetched_batches_come_in_order_and_errors_reach_the_caller() -> None:
    import gc
    import threading

    from segsweep.data.loaders import Prefetch

    def counting():
        yield from range(5)
        raise ValueError("broken sample 5")

    it = Prefetch(counting())
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="broken sample 5"):
        next(it)

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    streams = [Prefetch(endless()) for _ in range(3)]
    assert [next(s) for s in streams] == [0, 0, 0]
    del streams
    gc.collect()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:  # dropped: threads end
        time.sleep(0.05)
    assert threading.active_count() == before


def test_a_prefetched_stream_is_the_same_stream(tiny) -> None:
    from segsweep.data.loaders import Prefetch, stream_loader
    from segsweep.runner import prepare

    data = prepare(tiny()).data
    # The worker process first: forking while another thread runs torch can deadlock the child
    # (which is why the trainer never mixes the prefetch thread with worker processes).
    plain = stream_loader(data.labeled(), 4, 7, 3, 1, False)  # a worker process
    fetched = Prefetch(stream_loader(data.labeled(), 4, 7, 3, 0, False))  # a thread, as on a GPU
    for _ in range(4):
        a, b = next(plain), next(fetched)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_loaders_hand_over_uint8_and_to_model_normalises_on_the_device(tiny) -> None:
    # The wire format: uint8 images and masks (a quarter and an eighth of the bytes of float32
    # and int64), normalised and widened only by ``to_model``, to the values the model took
    # before (ImageNet mean/std of the same pixels; the same class ids).
    from segsweep.data.loaders import IMAGE_KEYS, MASK_KEYS, eval_loader, stream_loader, to_model
    from segsweep.runner import prepare

    data = prepare(tiny()).data
    batches = [
        next(stream_loader(data.labeled(), 4, 7, 0, 0, False)),
        next(stream_loader(data.unlabeled(), 4, 7, 0, 0, False)),
        next(iter(eval_loader(data.source, data.source.val, 4, 0))),
    ]
    seen = set()
    for batch in batches:
        model_batch = to_model(batch, torch.device("cpu"), channels_last=True)
        for key, value in batch.items():
            out = model_batch[key]
            if key in IMAGE_KEYS:
                assert value.dtype == torch.uint8 and value.shape[1] == 3
                assert out.dtype == torch.float32
                assert out.is_contiguous(memory_format=torch.channels_last)
                mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
                std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
                assert torch.allclose(out, (value.float() - mean) / std)
                assert torch.equal(T.denormalize(out), value)
            elif key in MASK_KEYS:
                assert value.dtype == torch.uint8
                assert out.dtype == torch.int64 and torch.equal(out, value.long())
            else:
                assert torch.equal(out, value)
            seen.add(key)
    assert {"image", "image_l", "image_u_w", "image_u_s", "mask", "mask_l"} <= seen


def test_prefetch_threads_are_stopped_and_joined_before_the_interpreter_exits(tmp_path) -> None:
    # A daemon thread still freeing its queued tensors while the interpreter finalizes is
    # killed inside torch's destructor and the process aborts (exit 134 at the end of the
    # suite). An exit handler registered before segsweep's runs after it: by then no prefetch
    # thread may be left, even one busy making a batch and one whose iterator was dropped.
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit, threading, time, gc\n"
        "atexit.register(lambda: print('left:', sorted(t.name for t in threading.enumerate()"
        " if t.name == 'segsweep-prefetch'), flush=True))\n"
        "import torch\n"
        "from segsweep.data.loaders import Prefetch\n"
        "def slow():\n"
        "    while True:\n"
        "        time.sleep(0.3)\n"
        "        yield {'x': torch.zeros(4, 4)}\n"
        "def fast():\n"
        "    while True:\n"
        "        yield {'x': torch.zeros(4, 4)}\n"
        "busy = Prefetch(slow())\n"
        "dropped = Prefetch(fast(), depth=8)\n"
        "next(dropped)\n"
        "del dropped\n"
        "gc.collect()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left: []" in proc.stdout, proc.stdout
