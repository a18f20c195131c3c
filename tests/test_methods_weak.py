"""HFPL and Mix-and-Match pieces on tiny inputs with known answers, and multi-stage resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segsweep.methods.hfpl import (
    THRESHOLD_GRID,
    HFPLKnobs,
    best_threshold,
    cam_pseudo_mask,
    expected_is_loss,
    feature_similarity_loss,
    gap_loss,
    importance_sampling_loss,
    min_pool_loss,
    normalised_cams,
    sampling_mass_on_objects,
)
from segsweep.methods.mixandmatch import (
    box_iou,
    class_graph_triplets,
    hue_chroma_bins,
    sample_patches,
    triplet_loss,
)
from segsweep.primitives import IGNORE
from segsweep.tracking.protocol import NullTracker
from segsweep.training.runner import prepare

from .helpers import Recorder

# -- HFPL ------------------------------------------------------------------------------------


def test_importance_sampling_matches_its_expected_value() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 4, generator=g) * 2
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    draws = torch.stack([importance_sampling_loss(z, tags, 2000, 1.0, g) for _ in range(10)])
    expected = expected_is_loss(z, tags, 1.0)
    assert draws.mean().item() == pytest.approx(expected.item(), rel=0.01)
    # it weights pixels by their activation, unlike GAP (a uniform average)
    assert not torch.isclose(expected, gap_loss(z, tags))


def test_importance_sampling_takes_channels_last_cams() -> None:
    # On a GPU the trainer runs channels_last: the CAMs arrive with (N, K) not contiguous.
    # The same draws must come out as from a contiguous copy (this once raised on the H200).
    z = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    strided = z.to(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    got = importance_sampling_loss(strided, tags, 50, 1.0, torch.Generator().manual_seed(2))
    want = importance_sampling_loss(z, tags, 50, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(got, want)


def test_sampling_temperature_flattens_the_pixel_distribution() -> None:
    z = torch.tensor([[[[8.0, -8.0]]]])
    tags = torch.ones(1, 1)
    sharp, flat = expected_is_loss(z, tags, 1.0), expected_is_loss(z, tags, 100.0)
    # a hot temperature samples the low (costly, for a positive tag) pixel more often
    assert flat > sharp


def test_sampling_mass_on_objects_known_answers() -> None:
    objects = torch.zeros(1, 4, 4, dtype=torch.bool)
    objects[0, :2, :2] = True  # a quarter of the image
    flat = torch.zeros(1, 4, 4)
    # flat logits: pixels drawn uniformly, so the object gets its share of the image
    assert sampling_mass_on_objects(flat, objects, 1.0).item() == pytest.approx(0.25)
    # far above zero on the object and far below elsewhere: (almost) every draw on the object
    split = torch.where(objects, 20.0, -20.0).float()
    assert sampling_mass_on_objects(split, objects, 1.0).item() == pytest.approx(1.0, abs=1e-4)
    # a background just below zero still draws most pixels there; a cold temperature less so
    mild = torch.where(objects, 4.0, -0.5).float()
    warm, cold = (sampling_mass_on_objects(mild, objects, t).item() for t in (1.0, 0.25))
    assert warm == pytest.approx(0.982 / (0.982 + 3 * 0.3775), abs=1e-3) and cold > warm


def test_min_pool_loss_known_answers() -> None:
    # one image, one tagged class on a 2 x 2 grid: the lowest quarter is the single pixel 1.0
    z = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    tags = torch.ones(1, 1)
    assert min_pool_loss(z, tags).item() == pytest.approx(1.0)
    assert min_pool_loss(z, tags, share=0.5).item() == pytest.approx(1.5)
    # a background already at or below zero costs nothing
    assert min_pool_loss(z - 1, tags).item() == 0.0
    # per pixel the strongest tagged class counts; an absent class never does
    two = torch.stack([z[0, 0], torch.full((2, 2), -5.0), torch.full((2, 2), 9.0)])[None]
    assert min_pool_loss(two, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(1.0)
    # the mean over images: the second image has its low quarter at 0
    batch = torch.cat([z, z - 4])
    assert min_pool_loss(batch, torch.ones(2, 1)).item() == pytest.approx(0.5)


def test_feature_similarity_loss_on_constant_images() -> None:
    image = torch.full((1, 3, 6, 6), 0.4)
    flat_cam = torch.full((1, 2, 6, 6), 0.3)
    assert feature_similarity_loss(image, flat_cam, 2.0, 2.5).item() == pytest.approx(0.0, abs=1e-7)
    varying = flat_cam.clone()
    varying[:, 0, :, :3] = 1.0
    assert feature_similarity_loss(image, varying, 2.0, 2.5).item() > 0  # smoothness on uniform colour


def test_feature_similarity_prefers_cam_edges_on_colour_edges() -> None:
    image = torch.zeros(1, 3, 6, 6)
    image[..., 3:] = 1.0  # a vertical colour edge between columns 2 and 3
    on_edge = torch.zeros(1, 1, 6, 6)
    on_edge[..., 3:] = 1.0
    off_edge = torch.zeros(1, 1, 6, 6)
    off_edge[..., 1:] = 1.0
    assert feature_similarity_loss(image, on_edge, 2.0, 2.5) < feature_similarity_loss(
        image, off_edge, 2.0, 2.5
    )


def test_cam_pseudo_masks_threshold_the_background() -> None:
    cams = torch.tensor([[[0.9, 0.1, 0.5]], [[0.2, 0.2, 0.7]]])  # 2 classes, a 1 x 3 image
    assert cam_pseudo_mask(cams, 0.3).tolist() == [[1, 0, 2]]
    assert cam_pseudo_mask(cams, 0.8).tolist() == [[1, 0, 0]]
    z = torch.tensor([[[[1.0, 3.0]], [[2.0, 4.0]]]])
    cams = normalised_cams(z, torch.tensor([[1.0, 0.0]]))
    assert cams[0, 1].abs().sum() == 0  # an absent tag has no CAM
    assert cams[0, 0, 0, 1] == pytest.approx(1.0, abs=1e-4) and cams[0, 0, 0, 0] == 0


def test_the_tuned_threshold_is_the_one_whose_pseudo_masks_score_best() -> None:
    from segsweep.primitives import confusion_matrix

    # one image, truth [0, 1, 1, 0]; CAM of class 1 [0.2, 0.9, 0.6, 0.5]: thresholds in
    # [0.5, 0.6) give back the truth exactly (a tie goes to background); ties pick the lowest
    truth = torch.tensor([[0, 1, 1, 0]])
    cams = torch.tensor([[[0.2, 0.9, 0.6, 0.5]]])
    confusions = {t: confusion_matrix(cam_pseudo_mask(cams, t), truth, 2) for t in THRESHOLD_GRID}
    threshold, score = best_threshold(confusions)
    assert threshold == 0.5 and score == pytest.approx(1.0)
    assert best_threshold({t: confusions[t] for t in (0.55, 0.6, 0.7)})[0] == 0.55
    assert HFPLKnobs().bg_threshold == "tune" and HFPLKnobs(bg_threshold=0.4).bg_threshold == 0.4
    with pytest.raises(ValueError, match="must be in"):
        HFPLKnobs(bg_threshold=1.5)


# -- Mix-and-Match ---------------------------------------------------------------------------


def test_patch_sampling_respects_overlap_and_dominant_class() -> None:
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[:, 32:] = 2
    mask[40:, :20] = 1
    mask[10:14] = IGNORE
    g = torch.Generator().manual_seed(0)
    patches = sample_patches(mask, 12, 8, 24, overlap=0.2, dominant=0.7, generator=g)
    assert len(patches) >= 4
    for i, (top, left, side, cls) in enumerate(patches):
        region = mask[top : top + side, left : left + side]
        labels = region[region != IGNORE]
        assert (labels == cls).sum() >= 0.7 * labels.numel()
        assert int(torch.bincount(labels).argmax()) == cls
        for other in patches[i + 1 :]:
            assert box_iou((top, left, side), other[:3]) <= 0.2
    noise = torch.randint(0, 5, (32, 32), generator=g)  # no region has a dominant class
    assert sample_patches(noise, 8, 8, 16, 0.5, 0.6, g) == []


def test_patch_centres_are_class_balanced() -> None:
    """A small object gets patches of its own, not only the background around it."""
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[20:32, 20:32] = 1  # 3.5% of the image
    g = torch.Generator().manual_seed(0)
    draws = [sample_patches(mask, 8, 8, 12, 0.5, 0.6, g) for _ in range(10)]
    share = sum(cls == 1 for d in draws for *_, cls in d) / sum(len(d) for d in draws)
    assert share > 0.2  # centres drawn uniformly over the image would give about 0.04


def test_the_first_layer_answers_colour_as_it_learned_brightness() -> None:
    from segsweep.data.transforms import MEAN, STD
    from segsweep.methods.mixandmatch import colour_first_layer, to_gray_input

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    rgb = torch.rand(2, 3, 8, 8) * 255
    colour = (rgb - MEAN) / STD
    before = encoder[0](to_gray_input(colour))
    colour_first_layer(encoder)
    after = encoder[0](colour)
    shift = (after - before).mean(dim=(0, 2, 3), keepdim=True)  # a constant per filter
    assert torch.allclose(after - shift, before, atol=1e-3)
    assert not torch.allclose(encoder[0].weight[:, 0], torch.zeros_like(encoder[0].weight[:, 0]))


def test_class_graph_links_same_class_positives_and_other_class_negatives() -> None:
    classes = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    a, p, n = class_graph_triplets(classes, torch.Generator().manual_seed(3))
    assert sorted(a.tolist()) == list(range(8))  # every patch anchors one triplet
    assert (classes[a] == classes[p]).all() and (classes[a] != classes[n]).all() and (a != p).all()
    for c in classes.unique():  # positive edges connect each class
        nodes = (classes == c).nonzero().flatten().tolist()
        parent = {i: i for i in nodes}
        for i, j in zip(a.tolist(), p.tolist(), strict=True):
            if i in parent:
                parent[_root(parent, i)] = _root(parent, j)
        assert len({_root(parent, i) for i in nodes}) == 1


def _root(parent: dict[int, int], i: int) -> int:
    while parent[i] != i:
        i = parent[i]
    return i


def test_triplet_loss_is_zero_when_margins_are_met() -> None:
    f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]]), dim=1)
    a, p, n = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    assert triplet_loss(f, a, p, n, margin=1.0).item() == 0.0  # d_an = 4, d_ap ~ 0.01
    assert triplet_loss(f, a, n, p, margin=1.0).item() > 0  # roles swapped: violated


def test_colourisation_targets() -> None:
    rgb = torch.tensor([[[[1.0, 0.5]], [[0.0, 0.5]], [[0.0, 0.5]]]])  # a red and a grey pixel
    hue, chroma_bin, chroma = hue_chroma_bins(rgb, 32)
    assert (
        hue[0, 0, 0] == 0 and chroma_bin[0, 0, 0] == 31 and chroma[0, 0, 1] == 0 and chroma_bin[0, 0, 1] == 0
    )


# -- pipelines resume from the last finished stage ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "stage", "fail_at"),
    # at step 1 of hfpl's train stage the last checkpoint is the pseudo stage's (no optimizer)
    [("hfpl", "train", 3), ("hfpl", "train", 1), ("mixandmatch", "match", 3)],
)
def test_multi_stage_runs_resume_from_the_last_stage_and_step(
    tiny, tmp_path: Path, method: str, stage: str, fail_at: int
) -> None:
    over = {
        "method": method,
        "train.steps": 4,
        "train.eval_every": 2,
        "hfpl.cam_steps": 4,
        "mixandmatch.proxy_steps": 2,
        "mixandmatch.mm_steps": 4,
        "data.label_ratio": 0.5,
    }
    full = Recorder()
    a = prepare(tiny(**over))
    a.trainer.run(tmp_path / "a", full)
    crash = {**over, "debug.fail_at_step": fail_at, "debug.fail_stage": stage}
    with pytest.raises(RuntimeError, match="injected failure"):
        prepare(tiny(**crash)).trainer.run(tmp_path / "b", Recorder())
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    if fail_at == 1 and method == "hfpl":  # a stage of no steps keeps no optimizer (the CAM one's)
        assert saved["progress"]["stage"] == 1 and saved["optimizer"] is None
        # as older versions wrote it, with the previous stage's optimizer: not loaded into the next
        saved["optimizer"] = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).state_dict()
        torch.save(saved, tmp_path / "b" / "checkpoints" / "last.pt")
    resumed = Recorder()
    b = prepare(tiny(**crash))
    b.trainer.run(tmp_path / "b", resumed, resume_from=tmp_path / "b" / "checkpoints" / "last.pt")
    prefix = "" if stage == "train" else f"{stage}/"
    checkpointed = (fail_at - 1) // 2 * 2  # the stage's step of the last checkpoint (eval_every 2)
    assert (f"{prefix}train/loss", fail_at) in resumed.metrics
    assert not any((f"{prefix}train/loss", s) in resumed.metrics for s in range(1, checkpointed + 1))
    first_stage = {"hfpl": "cam", "mixandmatch": "proxy"}[method]
    assert not any(k.startswith(first_stage) for k, _ in resumed.metrics)  # finished stages are not redone
    assert resumed.metrics[("val/mIoU", 4)] == full.metrics[("val/mIoU", 4)]
    # Each finished stage's weights are kept apart; the last stage's are last.pt / best.pt.
    names = [s.name for s in a.trainer.stages]
    kept = {p.stem for p in (tmp_path / "a" / "checkpoints").glob("*.pt")} - {"last", "best"}
    assert kept == set(names[:-1])
    assert (
        torch.load(tmp_path / "a" / "checkpoints" / f"{first_stage}.pt", weights_only=True)["stage"]
        == first_stage
    )
    if method == "hfpl":
        assert full.metrics[("pseudo/mIoU", 0)] > 0
        assert full.metrics[("pseudo/bg_threshold", 0)] in THRESHOLD_GRID  # tuned by default
        assert ("pseudo/tune_mIoU", 0) in full.metrics
        assert 0 < full.metrics[("pseudo/is_object_mass", 0)] < 1  # the sampling diagnostic


@pytest.mark.slow
def test_a_fixed_threshold_is_kept_and_the_sampling_diagnostic_still_logged(tiny, tmp_path: Path) -> None:
    cfg = tiny(**{"method": "hfpl", "train.steps": 2, "hfpl.cam_steps": 2, "hfpl.bg_threshold": 0.35})
    got = Recorder()
    prepare(cfg).trainer.run(tmp_path / "fixed", got)
    assert got.metrics[("pseudo/bg_threshold", 0)] == 0.35  # the knob's value, not a tuned one
    assert ("pseudo/tune_mIoU", 0) not in got.metrics
    assert 0 < got.metrics[("pseudo/is_object_mass", 0)] < 1


def test_blurring_removes_texture_edges_from_the_feature_similarity_loss() -> None:
    """Stripes inside an object are colour edges; blurred at their period they are not, and the
    loss stops rewarding CAM contours along them."""
    from segsweep.methods.hfpl import gaussian_blur

    stripes = torch.zeros(1, 3, 16, 16)
    stripes[..., ::2] = 1.0  # a 2-pixel period
    blurred = gaussian_blur(stripes, 2.0)
    assert blurred.std() < 0.05 * stripes.std() and abs(blurred.mean() - 0.5) < 0.05
    cams = torch.rand(1, 2, 16, 16)
    raw = feature_similarity_loss(stripes, cams, 2.0, 2.5)
    smooth = feature_similarity_loss(blurred, cams, 2.0, 2.5)
    assert smooth > raw  # raw stripes pay the CAM for varying; a uniform patch penalises it
    assert gaussian_blur(torch.full((1, 3, 8, 8), 0.3), 1.5).sub(0.3).abs().max() < 1e-6


def test_the_addon_switches_on_after_its_warm_up() -> None:
    """``addon_start``: the first share of the CAM steps trains the baseline loss (GAP and
    min-pooling) alone; from then on importance sampling and the feature-similarity loss join
    it."""
    from segsweep.methods.base import Stage
    from segsweep.methods.hfpl import HFPL
    from segsweep.models.network import build_model

    from .test_contract import C, make_batch

    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tu-mobilenetv3_small_050", C, decoder_channels=16)
    method = HFPL(model, HFPLKnobs(cam_steps=10, addon_start=0.5), C)
    method.begin_stage(Stage("cam", 10, batch="tags"))
    batch = make_batch()
    _, before = method.training_step(batch, 4)
    loss, after = method.training_step(batch, 5)
    assert set(before) == {"loss", "loss_gap", "loss_min"}
    assert before["loss"] == pytest.approx(before["loss_gap"] + before["loss_min"], rel=1e-5)
    assert {"loss_is", "loss_fs", "loss_min"} <= set(after)
    assert after["loss"] != pytest.approx(after["loss_gap"] + after["loss_min"], rel=1e-5)
    assert torch.isfinite(loss)
    # the baseline arm trains the same min-pooling term; weight 0 leaves plain GAP
    method.knobs = HFPLKnobs(cam_steps=10, addon=False)
    _, logs = method.training_step(batch, 9)
    assert set(logs) == {"loss", "loss_gap", "loss_min"}
    method.knobs = HFPLKnobs(cam_steps=10, addon=False, min_pool_weight=0)
    _, logs = method.training_step(batch, 9)
    assert set(logs) == {"loss", "loss_gap"} and logs["loss"] == logs["loss_gap"]


def test_multiscale_cams_sum_every_scale_and_flip_at_the_image_size() -> None:
    """``cam_scales``: the CAM logits of each scale and its flip, resized back to the image and
    summed (the official inference). With a per-pixel CAM network the answer is known: a
    constant image gives the same logit at every scale, so the sum is 2 x scales x it."""
    from segsweep.methods.hfpl import HFPL
    from segsweep.models.network import build_model

    from .test_contract import C

    model = build_model("unet", "tu-mobilenetv3_small_050", C, decoder_channels=16)
    scales = (0.5, 1.0, 1.5, 2.0)
    method = HFPL(model, HFPLKnobs(cam_scales=scales), C)
    method.cam_logits = lambda x: 3 * x[:, :2] + 1  # type: ignore[method-assign]  # per pixel
    image = torch.rand(2, 3, 37, 50)  # sizes that no scale divides evenly
    single = HFPL(model, HFPLKnobs(cam_scales=(1.0,)), C)
    single.cam_logits = method.cam_logits  # type: ignore[method-assign]
    torch.testing.assert_close(single.multiscale_cam_logits(image), 2 * (3 * image[:, :2] + 1))
    z = method.multiscale_cam_logits(image)
    assert z.shape == (2, 2, 37, 50)
    flat = torch.full((1, 3, 37, 50), 0.25)
    torch.testing.assert_close(
        method.multiscale_cam_logits(flat), torch.full((1, 2, 37, 50), 2 * len(scales) * 1.75)
    )
    with pytest.raises(ValueError, match="scale"):
        HFPLKnobs(cam_scales=(0.1,))


def test_a_proxy_trained_once_starts_later_runs(tiny, tmp_path: Path) -> None:
    from segsweep.errors import ConfigError
    from segsweep.methods import Stage
    from segsweep.methods.mixandmatch import colour_first_layer

    base = {"method": "mixandmatch", "data.label_ratio": 0.5, "train.steps": 2}
    prepare(tiny(**base, **{"mixandmatch.proxy_steps": 3, "mixandmatch.mm": False})).trainer.run(
        tmp_path / "proxy", NullTracker()
    )
    stage_file = tmp_path / "proxy" / "checkpoints" / "proxy.pt"
    saved = torch.load(stage_file, weights_only=True)["method"]
    later = prepare(tiny(**base, **{"mixandmatch.proxy_from": str(stage_file), "mixandmatch.mm_steps": 2}))
    method = later.trainer.method
    assert [s.name for s in later.trainer.stages] == ["match", "train"]  # no proxy stage of its own
    encoder = method.model.encoder.state_dict()
    assert all(torch.equal(v, saved[f"model.net.encoder.{k}"]) for k, v in encoder.items())
    fresh = prepare(tiny(**base, **{"mixandmatch.proxy_steps": 0})).trainer.method.model.encoder.state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in encoder.items())  # trained, not an init
    # The proxy saw gray input: its first layer is handed over to colour before tuning.
    first = next(k for k, v in encoder.items() if v.ndim == 4 and v.shape[1] == 3)
    method.begin_stage(Stage("match", 2, batch="labeled", evaluate=False))
    handed = method.model.encoder.state_dict()[first]
    gray = torch.nn.Conv2d(3, handed.shape[0], handed.shape[-1], bias=False)
    gray.weight.data.copy_(saved[f"model.net.encoder.{first}"])
    colour_first_layer(gray)
    assert torch.equal(handed, gray.weight) and not torch.equal(handed, saved[f"model.net.encoder.{first}"])
    assert method.colour_input

    wrong = {
        "missing.pt": "file not found",
        "last.pt": "give the weights of a finished proxy stage",
    }
    for name, message in wrong.items():
        path = tmp_path / "proxy" / "checkpoints" / name if name == "last.pt" else tmp_path / name
        with pytest.raises(ConfigError, match=message):
            prepare(tiny(**base, **{"mixandmatch.proxy_from": str(path)}))
    with pytest.raises(ConfigError, match="does not fit this run's model"):
        prepare(tiny(**base, **{"mixandmatch.proxy_from": str(stage_file), "model.encoder": "resnet18"}))
    with pytest.raises(ConfigError, match="proxy_from replaces the proxy stage"):
        tiny(**base, **{"mixandmatch.proxy_from": str(stage_file), "mixandmatch.proxy_steps": 5})


def test_the_cam_network_keeps_a_pretrained_encoder_trained_at_the_encoder_lr(tiny, tmp_path: Path) -> None:
    from segsweep.models.network import build_model

    donor = build_model("deeplabv3plus", "tu-mobilenetv3_small_050", 4, None, 32)
    with torch.no_grad():
        for p in donor.encoder.parameters():
            p.fill_(0.0123)  # recognisable "pretrained" weights
    torch.save(donor.encoder.state_dict(), tmp_path / "enc.pt")
    over = {"method": "hfpl", "train.decoder_lr_mult": 10.0}
    pretrained = prepare(tiny(**over, **{"model.encoder_weights": str(tmp_path / "enc.pt")})).trainer
    scratch = prepare(tiny(**over)).trainer
    for trainer, kept in ((pretrained, True), (scratch, False)):
        method = trainer.method
        cam_encoder = list(method.cam_net.encoder.parameters())
        assert all(bool((p == 0.0123).all()) for p in cam_encoder) is kept
        # its own initial weights otherwise, head included
        assert not torch.equal(
            next(method.cam_net.net.segmentation_head.parameters()),
            next(method.model.net.segmentation_head.parameters()),
        )
        method.begin_stage(trainer.stages[0])  # the CAM stage trains cam_net
        groups = {g["lr_mult"]: {id(p) for p in g["params"]} for g in trainer._optimizer().param_groups}
        assert {id(p) for p in cam_encoder} <= groups[1.0]  # the encoder's lr, not 10x
        assert groups[10.0] and not groups[10.0] & {id(p) for p in cam_encoder}
