"""Joint image/mask augmentation on uint8 tensors, with torchvision's semantics.

Every random choice comes from a ``numpy.random.Generator`` passed in, seeded per draw by
the sampler, so a sample's augmentation depends only on (run seed, position in the stream):
the data stream is identical with any number of workers and after a resume.

Weak view: random scale, pad (image 0, mask 255), random crop, horizontal flip.
Strong view (of the weak view's crop): colour jitter, grayscale, Gaussian blur, as in
UniMatch; drawn here per image, applied per batch on the run's device (``strong_views``).
"""

from __future__ import annotations

import functools
import math
import platform
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segsweep.primitives import IGNORE, Rect

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255


# Decoded images (PIL's arrays, the synthetic cache's memory map) are read-only, and torch
# warns on each view of one. Nothing writes through the view (``weak`` copies after the crop),
# so the warning, printed once per process and worker, says nothing to a user. Only for
# views made here: a user's own code importing segsweep keeps the warning.
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning, module=__name__
)


def to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) uint8 tensor, a view of the array (channels-last
    strides, no copy): uint8 resizing runs natively on that layout, and ``weak`` copies once,
    after the crop."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def normalize(image: Tensor) -> Tensor:
    """(..., 3, H, W) uint8 -> float, ImageNet mean/std (what smp encoders expect), on the
    image's device."""
    mean, std = stats_on(image.device)
    # In place on the one new float tensor: a batch at 512 px is 48 MiB, and each temporary
    # of that size is a fresh allocation (and page faults) on a CPU.
    return image.to(torch.float32, copy=True).sub_(mean).div_(std)


@functools.cache
def stats_on(device: torch.device) -> tuple[Tensor, Tensor]:
    # One copy per device, made once: not a host-to-device copy (and sync) per batch.
    return MEAN.to(device), STD.to(device)


def unit_rgb(image: Tensor) -> Tensor:
    """Inverse of ``normalize`` as float RGB in [0, 1], on the image's device (for losses
    that read colour: HFPL's feature similarity, Mix-and-Match's colourisation targets)."""
    mean, std = stats_on(image.device)
    return ((image.float() * std + mean) / 255).clamp(0, 1)


def denormalize(image: Tensor) -> Tensor:
    """Inverse of ``normalize`` for (..., 3, H, W); returns uint8."""
    return (image.float().cpu() * STD + MEAN).round().clamp(0, 255).to(torch.uint8)  # round: x.999 is x+1


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """(3, H, W) uint8 -> (3, height, width) uint8, antialiased bilinear: torchvision's
    ``resize``, with torch's kernel called directly (the wrapper cost as much as the resize
    itself at 64 px). torch resizes uint8 natively with AVX2, AVX-512 or ARM; elsewhere, as
    torchvision does, through float32, rounded."""
    native = image.dtype == torch.uint8 and _native_uint8_resize()
    x = image[None] if native else image[None].float()
    out = F.interpolate(x, size=[height, width], mode="bilinear", align_corners=False, antialias=True)[0]
    return out if native else out.round_().to(image.dtype)


def resize_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """(H, W) class ids -> (height, width), nearest neighbour on the pixel grid the image
    resize uses: output pixel i takes source pixel floor((i + 0.5) * in / out), the one whose
    centre is nearest to its own centre ((i + 0.5) * in / out - 0.5, as the centre-aligned
    bilinear of ``resize_image``: ``align_corners=False``). torch's ``nearest`` takes
    floor(i * in / out) instead, which shifts labels against the image by up to half a source
    pixel; ``nearest-exact`` is the centre-aligned rule."""
    return F.interpolate(mask[None, None], size=[height, width], mode="nearest-exact")[0, 0]


@functools.cache
def _native_uint8_resize() -> bool:
    arm = platform.machine() in ("aarch64", "arm64")
    return arm or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def weak(
    image: Tensor,
    mask: Tensor,
    crop: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    hflip: bool,
) -> tuple[Tensor, Tensor, Rect]:
    """Random scale, pad and crop to ``crop`` x ``crop``, flip.

    image (3, H, W) uint8, mask (H, W) uint8 -> image (3, crop, crop), mask (crop, crop) and
    the valid area, the part of the crop that is image, not padding (a rectangle: (top, left,
    height, width), ``primitives.rect_masks`` makes it a mask).
    """
    h, w = mask.shape
    factor = rng.uniform(*scale)
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    if (nh, nw) != (h, w):
        image = resize_image(image, nh, nw)
        mask = resize_mask(mask, nh, nw)
    pad_h, pad_w = max(crop - nh, 0), max(crop - nw, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE)
    top = int(rng.integers(0, mask.shape[0] - crop + 1))
    left = int(rng.integers(0, mask.shape[1] - crop + 1))
    image = image[:, top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    # Padding is added below and to the right, so the image fills the crop's top-left corner.
    valid_h, valid_w = min(nh - top, crop), min(nw - left, crop)
    valid_left = 0
    if hflip and rng.random() < 0.5:
        image, mask, valid_left = image.flip(-1), mask.flip(-1), crop - valid_w
    return image.contiguous(), mask.contiguous(), (0, valid_left, valid_h, valid_w)


# A strong view's parameters, drawn per image by the loader and applied per batch on the
# run's device by ``strong_views``: the photometric work (the costliest part of a sample, about
# 40 ms of one core at 512 px) runs where the model runs, not in loader processes, and
# batches of methods that never read the strong view skip it. Layout of the (11,) vector:
# [jitter on, op order (4), brightness, contrast, saturation, hue, grayscale on, blur sigma].
STRONG_PARAMS = 11
_ON, _ORDER, _FACTOR, _GRAY, _SIGMA = 0, slice(1, 5), 5, 9, 10


def draw_strong(
    rng: np.random.Generator,
    jitter: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma_max: float = 2.0,
    blur_sigma_min: float | None = None,
) -> Tensor:
    """Parameters of one photometric strong view (UniMatch's): colour jitter with p=0.8
    (ColorJitter(0.5, 0.5, 0.5, 0.25) at jitter=0.5, its four ops in a random order),
    grayscale, Gaussian blur with sigma uniform in [``blur_sigma_min``, ``blur_sigma_max``]
    (min None: 0.05 x max; UniMatch: [0.1, 2.0], ``dataset/transform.py`` L59-63 at 818609d).
    A sigma of 0 means no blur. The draws' order is part of the data stream (the CutMix box is drawn next)."""
    params = torch.zeros(STRONG_PARAMS)
    if jitter > 0 and rng.random() < 0.8:
        ops = rng.permutation(4)
        params[_ON] = 1.0
        params[_ORDER] = torch.from_numpy(ops.astype(np.float32))
        for op in ops:
            if op < 3:  # brightness, contrast, saturation: a factor around 1
                params[_FACTOR + op] = rng.uniform(1 - jitter, 1 + jitter)
            else:  # hue: a shift, in turns of the colour wheel
                params[_FACTOR + op] = rng.uniform(-jitter / 2, jitter / 2)
    if rng.random() < grayscale_prob:
        params[_GRAY] = 1.0
    if rng.random() < blur_prob:
        low = 0.05 * blur_sigma_max if blur_sigma_min is None else blur_sigma_min
        params[_SIGMA] = float(rng.uniform(low, blur_sigma_max))
    return params


def strong_views(images: Tensor, params: Tensor) -> Tensor:
    """Photometric strong views of a batch: (B, 3, H, W) uint8 and (B, 11) parameters from
    ``draw_strong`` -> (B, 3, H, W) uint8, on the images' device; geometry unchanged.

    Each op has torchvision's uint8 semantics (``adjust_*``, ``rgb_to_grayscale``,
    ``gaussian_blur``: the same blends, truncation to uint8 after each op, the same kernel),
    computed for the whole batch at once; pixels may differ from those per-image calls by one
    grey level where float rounding differs.
    """
    x = images.float()
    # Which op each image takes, and its blur kernel's size, are read on the host: on a GPU,
    # reading them from device memory would wait for every queued kernel (the previous
    # training step) before the next step could be queued.
    host = params.cpu()
    values = params.to(x.device, non_blocking=True)
    on, order = host[:, _ON] > 0, host[:, _ORDER].long()
    for position in range(4):  # each image applies its own op at each position
        for op, apply in enumerate((_brightness, _contrast, _saturation, _hue)):
            rows = _rows(on & (order[:, position] == op), x.device)
            if rows is not None:
                x[rows] = apply(x[rows], values[rows, _FACTOR + op].view(-1, 1, 1, 1))
    rows = _rows(host[:, _GRAY] > 0, x.device)
    if rows is not None:
        x[rows] = _gray(x[rows]).floor_().expand(-1, 3, -1, -1)
    blurred = host[:, _SIGMA] > 0
    rows = _rows(blurred, x.device)
    if rows is not None:
        sizes = [2 * math.ceil(3 * float(s)) + 1 for s in host[blurred, _SIGMA]]
        x[rows] = _blur(x[rows], values[rows, _SIGMA], sizes).round_()
    return x.to(torch.uint8)


def _rows(selected: Tensor, device: torch.device) -> Tensor | None:
    """Indices of the True entries of a host bool vector, on ``device``; None if none."""
    rows = selected.nonzero().flatten()
    return rows.to(device, non_blocking=True) if len(rows) else None


def _gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, ITU-R 601-2 weights as torchvision and PIL."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    return (x * ratio + other * (1 - ratio)).clamp_(0, 255).floor_()


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor).clamp_(0, 255).floor_()


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x).floor_().mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x).floor_(), factor)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` turns, keeping HSV's value and saturation (as torchvision's
    RGB -> HSV -> RGB round trip, in one pass: each channel is max - chroma * a tent of the
    shifted hue)."""
    rgb = x * (1.0 / 255)  # torchvision's uint8 -> float conversion
    bottom, top = rgb.aminmax(dim=1, keepdim=True)
    chroma = top - bottom
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    red = top == r
    green = (top == g) & ~red
    # hue in sixths of the wheel: (g - b) / chroma where red is the largest, 2 + (b - r) /
    # chroma where green is, 4 + (r - g) / chroma where blue is; 0 for greys
    sixths = torch.where(red, g - b, torch.where(green, b - r, r - g))
    sixths.div_(torch.where(chroma > 0, chroma, 1.0)).add_(green * 2.0 + (~red & ~green) * 4.0)
    sixths.add_(shift * 6)
    # per channel (R, G, B): 5, 3, 1 sixths ahead; made on the device (a tensor copied from the
    # host would make a GPU wait for its queue)
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)
    k = (offsets + sixths).remainder_(6)
    tent = torch.minimum(k, 4 - k).clamp_(0, 1)
    return tent.mul_(chroma).neg_().add_(top).mul_(255 + 1 - 1e-3).floor_()  # torchvision's float -> uint8


def _blur(x: Tensor, sigma: Tensor, sizes: list[int]) -> Tensor:
    """Gaussian blur, each image with its own sigma and torchvision's kernel (``sizes``:
    2 * ceil(3 sigma) + 1 taps, reflect padding), as two 1-D passes instead of one 2-D pass:
    the same separable kernel, a fraction of the work."""
    n, c, h, w = x.shape
    radius = max(sizes) // 2
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    reach = torch.tensor([size // 2 for size in sizes], dtype=x.dtype).to(x.device, non_blocking=True)
    weights = torch.exp(-(taps**2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    weights = weights * (taps.abs() <= reach.view(-1, 1))  # each image's own kernel size
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    out = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    out = F.conv2d(out, weights.view(n * c, 1, 1, -1), groups=n * c)
    out = F.conv2d(out, weights.view(n * c, 1, -1, 1), groups=n * c)
    return out.view(n, c, h, w)


def pad_to_multiple(image: Tensor, multiple: int = 32) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad (..., H, W) on the bottom/right to a multiple of ``multiple``; returns (H, W)."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
    return image, (h, w)
