"""The shared primitives, each tested once on inputs with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segsweep.primitives import (
    IGNORE,
    class_map,
    confidence_mask,
    confusion_matrix,
    cutmix_box,
    ema_decay_at,
    ema_update,
    masked_cross_entropy,
    one_hot_ignore,
    poly_lr,
    rect_masks,
    scores_from_confusion,
)


def test_miou_matches_a_hand_computed_confusion_matrix() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, 3)
    # rows = truth, cols = prediction; the ignored pixel is not counted
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    s = scores_from_confusion(conf)
    iou = [1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 2 / (3 + 2 - 2)]  # tp / (row + col - tp)
    assert s["iou"] == pytest.approx(iou)
    assert s["mIoU"] == pytest.approx(sum(iou) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 7)


def test_confusion_matrix_counts_uint8_masks_without_overflow() -> None:
    # 21 classes (VOC): class 20's cell is 20 * 21 + 20 = 440, past uint8's 255
    target = torch.tensor([20, 20, 3, IGNORE], dtype=torch.uint8)
    pred = torch.tensor([20, 3, 3, 0], dtype=torch.uint8)
    conf = confusion_matrix(pred, target, 21)
    assert conf.sum() == 3
    assert conf[20, 20] == 1 and conf[20, 3] == 1 and conf[3, 3] == 1


def test_classes_absent_everywhere_are_left_out_of_the_mean() -> None:
    conf = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 4)
    s = scores_from_confusion(conf)
    assert s["mIoU"] == 1.0
    assert math.isnan(s["iou"][2]) and math.isnan(s["iou"][3])


def test_a_class_predicted_but_absent_from_the_truth_counts_as_zero() -> None:
    # Class 2 is never in the ground truth but predicted once: IoU 0, and it is in the mean
    # (VOC's rule: only classes absent from both truth and prediction are left out).
    conf = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 1, 1]), 4)
    s = scores_from_confusion(conf)
    assert s["iou"][:3] == pytest.approx([1.0, 0.5, 0.0]) and math.isnan(s["iou"][3])
    assert s["mIoU"] == pytest.approx(1.5 / 3)


def test_class_map_is_argmax_and_takes_the_first_class_on_a_tie() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, 9, generator=g)
    assert torch.equal(class_map(logits), logits.argmax(1))
    assert torch.equal(class_map(logits[0], dim=0), logits[0].argmax(0))
    tied = torch.zeros(1, 4, 2, 2)
    tied[:, 2:] = 1.0  # classes 2 and 3 share the top score
    assert class_map(tied).unique().tolist() == [2]
    assert class_map(torch.zeros(2, 3, 4, 4)).unique().tolist() == [0]
    nan = torch.tensor([0.0, float("nan"), 5.0, float("nan")]).view(1, 4, 1, 1)
    assert class_map(nan).item() == nan.argmax(1).item() == 1  # a NaN wins, the first one


def test_confidence_mask_thresholds_the_softmax() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = 5.0  # confident class 1
    pseudo, conf, keep = confidence_mask(logits, 0.9)
    assert pseudo.tolist() == [[[1, 0]]]
    assert conf[0, 0, 0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    assert conf[0, 0, 1] == pytest.approx(0.5)
    assert keep.tolist() == [[[True, False]]]


def test_masked_cross_entropy_ignores_255_and_never_nans() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[:, :2] = IGNORE
    valid = target != IGNORE
    # the mean cross-entropy of the labeled pixels alone, computed another way
    reference = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert masked_cross_entropy(logits, target).item() == pytest.approx(reference.item())
    # whatever the logits say at ignored pixels changes nothing
    noisy = logits.clone()
    noisy[:, :, :2] = 100.0 * torch.randn(2, 3, 2, 4, generator=g)
    assert masked_cross_entropy(noisy, target).item() == pytest.approx(reference.item())
    assert masked_cross_entropy(logits, torch.full_like(target, IGNORE)).item() == 0.0
    # Weights scale pixels, but the mean stays over every non-ignored pixel: half the
    # labeled pixels weighted 0 leaves their share out of the sum, not out of the divisor.
    weight = torch.zeros(2, 4, 4)
    weight[:, 2:3] = 1.0
    per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    expected = (per_pixel * weight).sum() / valid.sum()
    assert masked_cross_entropy(logits, target, weight=weight).item() == pytest.approx(expected.item())
    assert masked_cross_entropy(logits, target, weight=torch.zeros(2, 4, 4)).item() == 0.0


def test_cutmix_box_is_a_rectangle_of_bounded_area_inside_the_image() -> None:
    g = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(200):
        top, left, h, w = cutmix_box(32, 24, g, prob=1.0)
        assert h > 0 and w > 0 and 0 <= top <= 32 - h and 0 <= left <= 24 - w
        areas.append(h * w / (32 * 24))
    assert 0.01 < min(areas) and max(areas) < 0.45
    empty = [cutmix_box(32, 32, g, prob=0.3) for _ in range(400)]
    assert 240 < sum(box == (0, 0, 0, 0) for box in empty) < 320  # ~30% of draws carry a box


def test_rect_masks_are_the_rectangles_pixels() -> None:
    rects = [(0, 0, 0, 0), (0, 0, 5, 7), (2, 3, 1, 4), (4, 6, 1, 1), (0, 2, 5, 5)]
    masks = rect_masks(torch.tensor(rects, dtype=torch.int32), 5, 7)
    assert masks.shape == (5, 5, 7) and masks.dtype == torch.bool
    for (top, left, h, w), mask in zip(rects, masks, strict=True):
        expected = torch.zeros(5, 7, dtype=torch.bool)
        expected[top : top + h, left : left + w] = True
        assert torch.equal(mask, expected)


def test_ema_update_blends_parameters_and_float_buffers_and_copies_counters() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    student.train()(torch.randn(8, 3, 5, 5))  # moves the student's running statistics
    student.train()(torch.randn(8, 3, 5, 5))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, decay=0.75)
    after, source = teacher.state_dict(), student.state_dict()
    for key, value in after.items():
        if value.dtype.is_floating_point:  # weights, biases, running mean and variance
            assert torch.allclose(value, 0.75 * before[key] + 0.25 * source[key]), key
        else:  # num_batches_tracked: a counter, copied
            assert torch.equal(value, source[key]) and source[key].item() == 2, key
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])


def test_ema_decay_warms_up_then_holds() -> None:
    # Mean Teacher's warm-up: step 0 copies the student, then 1 - 1/(step+1) until the cap
    assert ema_decay_at(0, 0.99) == 0.0
    assert ema_decay_at(1, 0.99) == pytest.approx(0.5)
    assert ema_decay_at(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_at(99, 0.99) == pytest.approx(0.99)
    assert ema_decay_at(10_000, 0.99) == 0.99


def test_poly_lr_and_one_hot() -> None:
    assert poly_lr(0.1, 0, 10, 0.9) == pytest.approx(0.1)
    assert poly_lr(0.1, 10, 10, 0.9) == 0.0
    assert poly_lr(0.1, 5, 10, 1.0) == pytest.approx(0.05)
    oh = one_hot_ignore(torch.tensor([[[0, IGNORE]]]), 2)
    assert oh[0, :, 0, 0].tolist() == [1.0, 0.0] and oh[0, :, 0, 1].tolist() == [0.0, 0.0]
