"""Joint image/mask augmentation on tensors (torchvision.transforms.v2 functional ops).

Every random choice comes from a ``numpy.random.Generator`` passed in, seeded per draw by
the sampler, so a sample's augmentation depends only on (run seed, position in the stream):
the data stream is identical with any number of workers and after a resume.

Weak view: random scale, pad (image 0, mask 255), random crop, horizontal flip.
Strong view (of the weak view's crop): colour jitter, grayscale, Gaussian blur, as in
UniMatch; its CutMix box is drawn here too (``primitives.cutmix_box``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from segsweep.primitives import IGNORE

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255


def to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


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


def weak(
    image: Tensor,
    mask: Tensor,
    crop: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    hflip: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random scale, pad and crop to ``crop`` x ``crop``, flip.

    image (3, H, W) uint8, mask (H, W) uint8 -> image (3, crop, crop), mask (crop, crop) and
    valid (crop, crop) bool (False where the crop padded past the image).
    """
    h, w = mask.shape
    factor = rng.uniform(*scale)
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    if (nh, nw) != (h, w):
        image = TF.resize(image, [nh, nw], antialias=True)
        mask = TF.resize(mask[None], [nh, nw], interpolation=TF.InterpolationMode.NEAREST)[0]
    valid = torch.ones(nh, nw, dtype=torch.bool)
    pad_h, pad_w = max(crop - nh, 0), max(crop - nw, 0)
    if pad_h or pad_w:
        image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0)
        mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE)
        valid = torch.nn.functional.pad(valid, (0, pad_w, 0, pad_h), value=False)
    top = int(rng.integers(0, mask.shape[0] - crop + 1))
    left = int(rng.integers(0, mask.shape[1] - crop + 1))
    image = image[:, top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    valid = valid[top : top + crop, left : left + crop]
    if hflip and rng.random() < 0.5:
        image, mask, valid = image.flip(-1), mask.flip(-1), valid.flip(-1)
    return image.contiguous(), mask.contiguous(), valid.contiguous()


def strong(
    image: Tensor,
    rng: np.random.Generator,
    jitter: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma_max: float = 2.0,
) -> Tensor:
    """Photometric strong view of a (3, H, W) uint8 crop; geometry is unchanged."""
    if jitter > 0 and rng.random() < 0.8:
        # ColorJitter(0.5, 0.5, 0.5, 0.25) at jitter=0.5*2, in a random order like torchvision.
        ops = rng.permutation(4)
        for op in ops:
            if op == 0:
                image = TF.adjust_brightness(image, rng.uniform(1 - jitter, 1 + jitter))
            elif op == 1:
                image = TF.adjust_contrast(image, rng.uniform(1 - jitter, 1 + jitter))
            elif op == 2:
                image = TF.adjust_saturation(image, rng.uniform(1 - jitter, 1 + jitter))
            else:
                image = TF.adjust_hue(image, rng.uniform(-jitter / 2, jitter / 2))
    if rng.random() < grayscale_prob:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < blur_prob:
        sigma = float(rng.uniform(0.05 * blur_sigma_max, blur_sigma_max))
        size = 2 * math.ceil(3 * sigma) + 1
        image = TF.gaussian_blur(image, [size, size], [sigma, sigma])
    return image


def pad_to_multiple(image: Tensor, multiple: int = 32) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad (..., H, W) on the bottom/right to a multiple of ``multiple``; returns (H, W)."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        image = torch.nn.functional.pad(image, (0, pw, 0, ph))
    return image, (h, w)
