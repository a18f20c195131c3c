"""Evaluation's two modes: whole images and sliding windows (for images larger than the crop)."""

from __future__ import annotations

import torch
from torch import nn

from segsweep.training.devices import Numerics
from segsweep.training.evaluation import predict_logits

CPU = Numerics(torch.device("cpu"), None, False)


class Recording(nn.Module):
    """A per-pixel model (a 1x1 convolution) that records the sizes it was called on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_sliding_windows_cover_the_image_and_average_to_the_whole_image_logits() -> None:
    # 70 x 100 with 32-px windows every 20 px: neither side is a multiple of the stride, so
    # the last window of each row and column must be placed flush with the border.
    image = torch.randn(2, 3, 70, 100, generator=torch.Generator().manual_seed(1))
    model = Recording()
    whole = predict_logits(model, image, "whole", 32, 20, CPU)
    assert model.sizes == [(96, 128)]  # one pass, padded to a multiple of 32
    model.sizes.clear()
    sliding = predict_logits(model, image, "sliding", 32, 20, CPU)
    # rows 0, 20, 38 and columns 0, 20, 40, 60, 68: 3 x 5 windows of 32 x 32
    assert model.sizes == [(32, 32)] * 15
    assert sliding.shape == whole.shape == (2, 5, 70, 100)
    # A per-pixel model gives the same logits in every window, so the mean over overlapping
    # windows is the whole-image logit wherever the counts are right.
    assert torch.allclose(sliding, whole, atol=1e-6)


def test_sliding_mode_takes_one_pass_when_the_image_fits_the_window() -> None:
    image = torch.randn(1, 3, 40, 48)
    model = Recording()
    sliding = predict_logits(model, image, "sliding", 64, 32, CPU)
    assert model.sizes == [(64, 64)]
    assert torch.allclose(sliding, model.conv(image), atol=1e-6)
