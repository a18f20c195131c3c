"""The released-code forms: GuidedMix-Net's official objective, UniMatch's FixMatch weighting
and partner masks, S4MIM's masked pass leaving batch-norm statistics alone, and masks resized
on the images' pixel grid."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from segsweep.data import transforms as T
from segsweep.methods import fixmatch as fixmatch_module
from segsweep.methods import guidedmix as guidedmix_module
from segsweep.methods import s4mim as s4mim_module
from segsweep.methods.guidedmix import GuidedMixKnobs, official_lambda
from segsweep.methods.s4mim import cells_to_pixels
from segsweep.primitives import IGNORE, class_map, sigmoid_focal_loss

from .test_contract import build, make_batch, step_once


def main_stage(method):
    return [s for s in method.stages(10) if s.steps > 0][-1]


# -- the sigmoid focal loss -------------------------------------------------------------------


def test_sigmoid_focal_loss_matches_a_hand_computation_on_a_2x2_map() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]], [[-0.5, 1.5], [0.0, -2.0]]]])  # (1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [1, IGNORE]]])
    gamma, alpha = 0.5, 0.5

    def element(x: float, t: int) -> float:
        p = 1 / (1 + math.exp(-x))
        if t:
            return -alpha * (1 - p) ** gamma * math.log(p)
        return -(1 - alpha) * p**gamma * math.log(1 - p)

    total = 0.0
    for i in range(2):
        for j in range(2):
            t = int(target[0, i, j])
            if t == IGNORE:
                continue  # weight 0, still counted in the mean (mmseg's valid_mask)
            for c in range(2):
                total += element(float(logits[0, c, i, j]), int(c == t))
    expected = total / 8  # mean over B x C x H x W = 1 x 2 x 2 x 2 elements
    got = sigmoid_focal_loss(logits, target, gamma=gamma, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_focal_loss_has_finite_gradients_on_saturated_logits() -> None:
    logits = torch.tensor([[[[40.0]], [[-40.0]]]], requires_grad=True)
    sigmoid_focal_loss(logits, torch.tensor([[[0]]])).backward()
    assert torch.isfinite(logits.grad).all()


# -- GuidedMix-Net, official ------------------------------------------------------------------


def test_guidedmix_defaults_to_the_official_objective_and_rejects_unknown_ones() -> None:
    assert GuidedMixKnobs().objective == "official"
    with pytest.raises(ValidationError) as err:
        GuidedMixKnobs(objective="nope")
    assert "'official' or 'paper'" in str(err.value)


def test_official_lambda_is_uniform_below_half_and_below_the_mix_strength() -> None:
    torch.manual_seed(0)
    draws = torch.tensor([official_lambda(0.9) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() < 0.5 and draws.mean().item() == pytest.approx(0.25, abs=0.02)
    assert max(official_lambda(0.2) for _ in range(200)) < 0.2


def _spy(monkeypatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_official_subtracts_the_labeled_pass_logits_with_gradients_through_them(monkeypatch) -> None:
    method = build("guidedmix", objective="official")
    decoupled = _spy(monkeypatch, guidedmix_module, "decoupled_logits")
    feats = []
    forward = method.model.forward_features
    monkeypatch.setattr(method.model, "forward_features", lambda x: feats.append(forward(x)) or feats[-1])
    batch = make_batch()
    method.train()
    loss, logs = method.training_step(batch, 3)
    (logits_mix, logits_l, lam), _, remains = decoupled[0]
    logits_l.retain_grad()
    remains.retain_grad()
    loss.backward()
    b = batch["image_l"].shape[0]
    assert len(feats) == 1  # one pass over labeled and unlabeled images
    assert torch.equal(logits_l, feats[0].logits[:b])  # the labeled pass's own logits
    assert lam == pytest.approx(logs["mix_lambda"]) and 0 <= lam < 0.5
    assert torch.allclose(remains, logits_mix - lam * logits_l)
    # not detached: the gradient reaching them is -lam times the one reaching the remainder
    assert logits_l.grad is not None and logits_l.grad.abs().sum() > 0
    assert torch.allclose(logits_l.grad, -lam * remains.grad, atol=1e-9)


def test_official_mix_head_is_trained_by_the_mixed_branch_only() -> None:
    method = build("guidedmix", objective="official")
    assert method.mix_head is not None and method.mitrans is None  # no config turns MITrans on
    step_once(method, main_stage(method), make_batch())
    grads = [p.grad for p in method.mix_head.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    off = build("guidedmix", objective="official", focal_weight=0.0)
    loss, logs = step_once(off, main_stage(off), make_batch())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in off.mix_head.parameters())
    # no loss on the unlabeled image's own prediction: with the mixed loss off, only L_x
    assert set(logs) == {"loss", "loss_sup", "loss_mix", "mix_lambda"}
    assert loss.item() == pytest.approx(logs["loss_sup"])


def test_official_target_is_the_unlabeled_argmax_made_without_dropout(monkeypatch) -> None:
    method = build("guidedmix", objective="official")
    dropouts = [m for m in method.model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts, "the test model must have dropout for this check to mean anything"
    seen: list[bool] = []
    for m in dropouts:
        m.register_forward_pre_hook(lambda mod, _: seen.append(mod.training))
    focal = _spy(monkeypatch, guidedmix_module, "sigmoid_focal_loss")
    feats = []
    forward = method.model.forward_features
    monkeypatch.setattr(method.model, "forward_features", lambda x: feats.append(forward(x)) or feats[-1])
    batch = make_batch()
    for key in ("image_u_w", "valid_u"):  # one unlabeled image: its partner is known
        batch[key] = batch[key][:1]
    method.train()
    method.training_step(batch, 3)
    assert seen and not any(seen)
    assert all(m.training for m in dropouts)  # restored after the step
    (remains, target), kwargs, _ = focal[0]
    assert kwargs == {"gamma": 0.5, "alpha": 0.5}
    expected = class_map(feats[0].logits[4:].detach())
    expected = torch.where(batch["valid_u"], expected, torch.full_like(expected, IGNORE))
    assert torch.equal(target, expected)  # every pixel, no threshold (padding aside)
    assert remains.shape == (1, 7, 32, 32)


def test_official_pseudo_labels_keep_every_pixel() -> None:
    method = build("guidedmix").eval()
    assert method.conf_threshold == 0.0
    pseudo, _, keep = method.pseudo_label(make_batch()["image_u_w"])
    assert keep.all()
    with torch.no_grad():
        assert torch.equal(pseudo, method.model(make_batch()["image_u_w"]).argmax(1))


# -- FixMatch in UniMatch's form --------------------------------------------------------------


def test_unimatch_form_means_the_losses_and_makes_the_partner_mask_in_eval_mode(monkeypatch) -> None:
    method = build("fixmatch", conf_threshold=0.0, loss_weighting="mean", partner_mask="eval")
    ce = _spy(monkeypatch, fixmatch_module, "masked_cross_entropy")
    batch = make_batch()
    bn = {k: v.clone() for k, v in method.model.state_dict().items() if "running" in k}
    method.train()
    with torch.no_grad():  # what each pass should give, in the step's order
        with fixmatch_module.dropout_off(method.model):
            train_pred = method.model(batch["image_u_w"]).argmax(1)
        method.model.eval()
        eval_pred = method.model(batch["image_u_w"]).argmax(1)
        method.model.train()
        for k, v in method.model.state_dict().items():  # undo the training-mode pass's update
            if k in bn:
                v.copy_(bn[k])
    loss, logs = method.training_step(batch, 3)
    assert all(m.training for m in method.modules())  # back in training mode
    assert loss.item() == pytest.approx((logs["loss_sup"] + logs["loss_unsup"]) / 2, rel=1e-5)
    (_, pseudo), _, _ = ce[0]
    box, valid = batch["box_u"], batch["valid_u"]
    inside = box & valid.roll(1, 0)
    assert torch.equal(pseudo[inside], eval_pred.roll(1, 0)[inside])  # the partner: eval mode
    outside = ~box & valid
    assert torch.equal(pseudo[outside], train_pred[outside])  # its own: the training-mode pass
    assert not torch.equal(eval_pred, train_pred), "the two modes must differ for this to test"


def test_fixmatch_defaults_are_segsweeps_form() -> None:
    knobs = fixmatch_module.FixMatchKnobs()
    assert (knobs.loss_weighting, knobs.partner_mask) == ("sum", "train")


# -- S4MIM: the masked pass leaves batch-norm statistics as they were --------------------------


def _bn_stats(method) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in method.model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_s4mim_masked_passes_leave_batch_norm_statistics_as_they_were(monkeypatch) -> None:
    batch = make_batch()

    def step(method) -> None:
        torch.manual_seed(3)  # the same dropout masks in the shared passes (builds draw apart)
        step_once(method, main_stage(method), batch)

    with_mim = build("s4mim")
    step(with_mim)
    without = build("s4mim", mim=False, semantic_mim=False)
    step(without)
    a, b = _bn_stats(with_mim), _bn_stats(without)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # and the check bites: without the freeze the masked passes move the statistics
    monkeypatch.setattr(s4mim_module, "bn_stats_frozen", lambda module: contextlib.nullcontext())
    leaky = build("s4mim")
    step(leaky)
    c = _bn_stats(leaky)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_semantic_cells_cover_their_stride_of_the_padded_input() -> None:
    cells = torch.tensor([[[True, False], [False, True]]])  # a 40 px input pads to 64: stride 32
    pix = cells_to_pixels(cells, (40, 40))
    assert pix.shape == (1, 40, 40)
    assert pix[0, :32, :32].all() and not pix[0, :32, 32:].any() and pix[0, 32:, 32:].all()


# -- masks resized on the images' pixel grid ---------------------------------------------------


@pytest.mark.parametrize("factor", [0.75, 1.25, 1.5])
def test_a_one_pixel_stripe_lands_on_the_same_columns_in_image_and_mask(factor: float) -> None:
    """A stripe in column s of an image and of its mask, resized by ``weak``: the mask's
    stripe columns are where the resized image's stripe is brightest (its peak among them,
    each at least half the peak). torch's ``nearest`` fails this at 0.75 and 1.25."""
    width = 16
    checked = 0
    for s in range(width):
        image = torch.zeros(3, 4, width, dtype=torch.uint8)
        image[:, :, s] = 200
        mask = torch.zeros(4, width, dtype=torch.uint8)
        mask[:, s] = 1
        crop = math.ceil(width * factor) + 1
        rng = np.random.default_rng(0)
        out_image, out_mask, _ = T.weak(image, mask, crop, rng, (factor, factor), hflip=False)
        nw = round(width * factor)
        row = out_image[0, 1, :nw].float()
        cols = (out_mask[1, :nw] == 1).nonzero().flatten().tolist()
        if not cols:  # a downscale drops some one-pixel stripes from a nearest-neighbour mask
            assert factor < 1
            continue
        checked += 1
        assert int(row.argmax()) in cols, (s, row.tolist(), cols)
        assert all(row[c] >= row.max() / 2 for c in cols), (s, row.tolist(), cols)
        nh = round(4 * factor)  # every row of the stripe alike
        assert (out_mask[:nh, :nw] == 1).all(0).tolist() == (out_mask[1, :nw] == 1).tolist()
    assert checked >= width // 2


def test_floor_aligned_nearest_would_fail_the_stripe_check() -> None:
    """The guard: torch's ``nearest`` shifts the 0.75 x stripe off the image's."""
    image = torch.zeros(3, 4, 16, dtype=torch.uint8)
    image[:, :, 2] = 200
    mask = torch.zeros(1, 1, 4, 16, dtype=torch.uint8)
    mask[..., 2] = 1
    row = T.resize_image(image, 4, 12)[0, 1].float()
    floor = (F.interpolate(mask, size=[4, 12], mode="nearest")[0, 0, 1] == 1).nonzero().flatten().tolist()
    exact = (T.resize_mask(mask[0, 0], 4, 12)[1] == 1).nonzero().flatten().tolist()
    assert int(row.argmax()) not in floor and int(row.argmax()) in exact
