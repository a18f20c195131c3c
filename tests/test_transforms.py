"""Joint augmentation keeps image and mask aligned; the stream is a function of (seed, position)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from segsweep.data import transforms as T
from segsweep.data.loaders import StreamSampler
from segsweep.primitives import rect_masks


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
    img, msk, rect = T.weak(image, mask, 64, rng, scale=(1.0, 1.0), hflip=True)
    valid = rect_masks(torch.tensor([rect]), 64, 64)[0]
    assert valid.sum() == 48 * 40  # the whole image, once
    assert img.shape == (3, 64, 64) and msk.shape == (64, 64)
    assert (img[0][valid] == msk[valid] * 40).all()
    assert (msk[~valid] == 255).all() and (img[:, ~valid] == 0).all()


@pytest.mark.parametrize("seed", range(20))
def test_weak_scaling_keeps_alignment_inside_regions(seed: int) -> None:
    image, mask = coded_pair(96, 96)
    img, msk, rect = T.weak(image, mask, 64, np.random.default_rng(seed), scale=(0.5, 2.0), hflip=True)
    valid = rect_masks(torch.tensor([rect]), 64, 64)[0]
    assert (msk[~valid] == 255).all() and (img[:, ~valid] == 0).all()  # padding: outside
    assert (msk[valid] != 255).all()  # the image: inside
    decoded = (img[0].float() / 40).round()
    inside = valid & (msk != 255)
    agree = (decoded[inside] == msk[inside].float()).float().mean()
    assert agree > 0.95  # only pixels on resampled block edges may differ


def test_resize_is_torchvisions_on_any_layout(monkeypatch) -> None:
    import torchvision.transforms.v2.functional as TF

    g = torch.Generator().manual_seed(0)
    for h, w, nh, nw in ((64, 64, 80, 80), (64, 48, 40, 97), (375, 500, 188, 250), (7, 9, 64, 64)):
        hwc = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
        expected = TF.resize(hwc.permute(2, 0, 1).contiguous(), [nh, nw], antialias=True)
        for image in (hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()):  # as loaded, or copied
            out = T.resize_image(image, nh, nw)
            assert out.dtype == torch.uint8 and torch.equal(out, expected)
        # a CPU without a native uint8 kernel resizes through float32: the same to a grey level
        monkeypatch.setattr(T, "_native_uint8_resize", lambda: False)
        assert (T.resize_image(hwc.permute(2, 0, 1), nh, nw).int() - expected.int()).abs().max() <= 1
        monkeypatch.undo()


def textured(count: int, size: int = 48) -> torch.Tensor:
    """(N, 3, size, size) uint8 images: smooth colour fields plus noise (every hue and
    saturation, flat and busy regions), deterministic."""
    g = torch.Generator().manual_seed(0)
    fields = torch.rand(count, 3, 6, 6, generator=g) * 255
    x = torch.nn.functional.interpolate(fields, size=(size, size), mode="bilinear", align_corners=False)
    return (x + torch.randn(x.shape, generator=g) * 20).clamp(0, 255).to(torch.uint8)


def torchvision_strong(image: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The specification of one strong view: torchvision's per-image uint8 ops, in the
    order and with the factors the parameters name."""
    import math

    import torchvision.transforms.v2.functional as TF

    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if p[0] > 0:
        for op in p[1:5].long().tolist():
            if op < 4:  # an index past the four ops: nothing (isolates one op below)
                image = ops[op](image, float(p[5 + op]))
    if p[9] > 0:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if p[10] > 0:
        sigma = float(p[10])
        size = 2 * math.ceil(3 * sigma) + 1
        image = TF.gaussian_blur(image, [size, size], [sigma, sigma])
    return image


def test_strong_views_are_torchvisions_ops_made_per_batch() -> None:
    # 200 views drawn as the loader draws them (UniMatch's settings), made in one batch,
    # against torchvision's ops image by image: float rounding may move a pixel by a grey
    # level (about 1 in 10,000 per op here), nothing more.
    images = textured(200)
    params = torch.stack([T.draw_strong(np.random.default_rng(i), 0.5, 0.2, 0.5) for i in range(200)])
    assert 0.7 < params[:, 0].mean() < 0.9 and 0.35 < (params[:, 10] > 0).float().mean() < 0.65
    out = T.strong_views(images, params)
    assert out.shape == images.shape and out.dtype == torch.uint8
    ref = torch.stack([torchvision_strong(images[i], params[i]) for i in range(200)])
    diff = (out.int() - ref.int()).abs()
    assert (diff > 0).float().mean() < 1e-3 and (diff > 1).float().mean() < 1e-4 and diff.max() <= 4
    # each op alone, with factors over its whole range
    g = torch.Generator().manual_seed(1)
    for op, (low, high) in enumerate(((0.5, 1.5), (0.5, 1.5), (0.5, 1.5), (-0.25, 0.25))):
        single = torch.zeros(200, T.STRONG_PARAMS)
        single[:, 0], single[:, 1], single[:, 2:5] = 1, op, 9  # the op first, then none
        single[:, 5 + op] = torch.empty(200).uniform_(low, high, generator=g)
        out = T.strong_views(images, single)
        ref = torch.stack([torchvision_strong(images[i], single[i]) for i in range(200)])
        diff = (out.int() - ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_strong_views_and_rect_masks_on_a_gpu_match_the_cpu_and_never_wait_for_it() -> None:
    # Made in to_model while the previous step may still run on the GPU: any device-to-host
    # read (or a blocking host-to-device copy) would stall the step queue. Sync debug mode
    # turns such a wait into an error.
    images = textured(32)
    params = torch.stack([T.draw_strong(np.random.default_rng(i), 0.5, 0.2, 0.5) for i in range(32)])
    on_cpu = T.strong_views(images, params)
    rects = torch.tensor([[i % 5, i % 7, 9 + i % 4, 3 + i % 20] for i in range(32)], dtype=torch.int32)
    device_images, pinned_rects = images.cuda(), rects.pin_memory()  # the loader pins its batches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = T.strong_views(device_images, params)
        masks = rect_masks(pinned_rects.to("cuda", non_blocking=True), 32, 32)  # as to_model does
    finally:
        torch.cuda.set_sync_debug_mode("default")
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs()
    assert diff.max() <= 4 and (diff > 1).float().mean() < 1e-3
    assert torch.equal(masks.cpu(), rect_masks(rects, 32, 32))


def test_strong_view_changes_colour_not_geometry() -> None:
    image, _ = coded_pair(64, 64)
    params = T.draw_strong(np.random.default_rng(0), jitter=0.5, grayscale_prob=0.0, blur_prob=0.0)
    assert params[0] == 1  # jitter drawn
    out = T.strong_views(image[None], params[None])[0]
    assert out.shape == image.shape and out.dtype == torch.uint8 and not torch.equal(out, image)
    # a photometric map is the same function at every pixel: equal input pixels stay equal
    flat_in, flat_out = image.reshape(3, -1).T, out.reshape(3, -1).T
    for colour in torch.unique(flat_in, dim=0):
        same = (flat_in == colour).all(1)
        assert len(torch.unique(flat_out[same], dim=0)) == 1


def test_a_strong_view_without_ops_is_the_weak_view_and_draws_nothing() -> None:
    images = textured(4)
    rng = np.random.default_rng(3)
    params = torch.stack([T.draw_strong(rng, 0.0, 0.0, 0.0) for _ in range(4)])
    assert torch.equal(T.strong_views(images, params), images)
    # jitter 0 draws nothing; each probability still takes one draw (the stream stays aligned)
    assert rng.random() == pytest.approx(np.random.default_rng(3).random(9)[-1])


def test_stream_sampler_restarts_at_any_position() -> None:
    full = StreamSampler(10, seed=5)
    it = iter(full)
    first = [next(it) for _ in range(35)]
    later = iter(StreamSampler(10, seed=5, start=17))
    assert [next(later) for _ in range(18)] == first[17:]
    assert sorted(d[0] for d in first[:10]) == list(range(10))  # each epoch is a permutation


@pytest.mark.slow
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

    def prefetching() -> int:  # this module's threads only: others may come and go meanwhile
        return sum(t.name == "segsweep-prefetch" for t in threading.enumerate())

    deadline = time.time() + 5
    while prefetching() and time.time() < deadline:  # the first stream's ends after its error
        time.sleep(0.05)
    assert prefetching() == 0
    streams = [Prefetch(endless()) for _ in range(3)]
    assert [next(s) for s in streams] == [0, 0, 0]
    assert prefetching() == 3
    del streams
    gc.collect()
    deadline = time.time() + 5
    while prefetching() and time.time() < deadline:  # dropped: threads end
        time.sleep(0.05)
    assert prefetching() == 0


def test_a_prefetched_stream_is_the_same_stream(tiny) -> None:
    from segsweep.data.loaders import Prefetch, stream_loader
    from segsweep.training.runner import prepare

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
    from segsweep.data.loaders import IMAGE_KEYS, MASK_KEYS, RECT_KEYS, eval_loader, stream_loader, to_model
    from segsweep.training.runner import prepare

    data = prepare(tiny()).data
    batches = [
        next(stream_loader(data.labeled(), 4, 7, 0, 0, False)),
        next(stream_loader(data.unlabeled(), 4, 7, 0, 0, False)),
        next(iter(eval_loader(data.source, data.source.val, 4, 0))),
    ]
    seen = set()
    for batch in batches:
        model_batch = to_model(batch, torch.device("cpu"), channels_last=True)
        if "strong_u" in batch:  # the strong view is made here, from the weak one
            assert "image_u_s" not in batch
            params = batch.pop("strong_u")
            batch = {**batch, "image_u_s": T.strong_views(batch["image_u_w"], params)}
            seen.add("strong_u")
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
            elif key in RECT_KEYS:  # 4 numbers per image on the wire, a mask for the model
                assert value.shape == (4, 4)
                assert out.shape == (4, 64, 64) and torch.equal(out, rect_masks(value, 64, 64))
            else:
                assert torch.equal(out, value)
            seen.add(key)
    assert {
        "image",
        "image_l",
        "image_u_w",
        "image_u_s",
        "strong_u",
        "mask",
        "mask_l",
        "box_u",
        "valid_u",
    } <= seen


@pytest.mark.slow
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


@pytest.mark.parametrize("method", ["fixmatch", "guidedmix"])
def test_the_trainer_makes_a_strong_view_only_for_methods_that_read_it(tiny, method: str) -> None:
    # FixMatch reads image_u_s; GuidedMix-Net does not, and its batches skip the view's cost.
    from segsweep.training.loop import Trainer
    from segsweep.training.runner import prepare

    cfg = tiny(method=method)
    trainer = Trainer(cfg, prepare(cfg).data)
    stage = trainer.stages[-1]
    batch = trainer._streams(stage, 0)()
    assert "strong_u" not in batch
    assert ("image_u_s" in batch) == trainer.method.uses_strong_view == (method == "fixmatch")
    if "image_u_s" in batch:  # normalised like the weak view, same geometry, other colours
        weak, strong = T.denormalize(batch["image_u_w"]), T.denormalize(batch["image_u_s"])
        assert strong.shape == weak.shape and not torch.equal(strong, weak)


def test_tags_are_the_classes_present_in_the_ground_truth() -> None:
    from segsweep.data.loaders import tags_of

    mask = np.array([[0, 0, 3], [255, 3, 5], [7, 255, 0]], dtype=np.uint8)  # 7: not a class of 6
    assert tags_of(mask, 6).tolist() == [1, 0, 0, 1, 0, 1]
    assert tags_of(np.full((4, 4), 255, dtype=np.uint8), 3).tolist() == [0, 0, 0]
