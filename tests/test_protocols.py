"""The published protocols: specs of VOC and Cityscapes label-ratio curves, checked against
trees generated in the real layouts; any crop size; UniMatch's head settings; OHEM; gradient
accumulation; budgets in epochs; sizes that follow the crop. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segsweep.config import validate_run_config
from segsweep.models.network import HeadOptions, build_model
from segsweep.primitives import IGNORE, dropout_off, ohem_cross_entropy
from segsweep.sweep.spec import plan_sweep, run_config_of
from segsweep.training.budget import epoch_steps, planned_steps
from segsweep.training.devices import Numerics
from segsweep.training.evaluation import predict_logits
from segsweep.training.loop import build_method, micro_batches

from .conftest import tiny_tree
from .helpers import assert_user_error, segsweep, segsweep_here
from .published_trees import make_cityscapes, make_voc

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SMALL = ["model.encoder=resnet18", "model.encoder_weights=null"]  # fast, and never downloads


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc(tmp_path_factory.mktemp("data") / "VOC2012")


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cityscapes(tmp_path_factory.mktemp("data") / "cityscapes")


def roots(voc: Path, cityscapes: Path) -> dict[str, Path]:
    return {
        "voc_classic": voc,
        "voc_blended": voc,
        "voc_wsss": voc,
        "voc_mixandmatch": voc,
        "cityscapes": cityscapes,
    }


# --------------------------------------------------------------------------------------------
# The specs hold the published settings


#: Each published setting, from its source (LiheYoung/UniMatch at 818609d: configs/*.yaml,
#: unimatch.py, util/ohem.py, dataset/transform.py, supervised.py evaluate()), beside the key
#: the spec sets it with.
UNIMATCH_VOC = {
    "data.crop_size": 321,
    "data.augment.scale_min": 0.5,
    "data.augment.scale_max": 2.0,
    "data.augment.blur_prob": 0.5,
    "data.augment.blur_sigma_min": 0.1,
    "data.augment.blur_sigma_max": 2.0,
    "data.augment.cutmix_prob": 0.5,
    "data.augment.grayscale_prob": 0.2,
    "model.arch": "deeplabv3plus",
    "model.encoder": "resnet101",
    "model.encoder_weights": "imagenet",
    "model.output_stride": 16,
    "model.aspp_rates": (6, 12, 18),
    "model.aspp_dropout": 0.0,
    "model.aspp_separable": False,
    "train.epochs": 80,
    "train.batch_size": 8,
    "train.unlabeled_batch_size": 8,
    "train.optimizer": "sgd",
    "train.lr": 0.001,
    "train.lr_reference_batch_size": 8,
    "train.momentum": 0.9,
    "train.weight_decay": 0.0001,
    "train.poly_power": 0.9,
    "train.decoder_lr_mult": 10.0,
    "train.loss": "ce",
    "eval.mode": "whole",
    "fixmatch.conf_threshold": 0.95,
    "fixmatch.loss_weighting": "mean",  # fixmatch.py L166
    "fixmatch.partner_mask": "eval",  # fixmatch.py L132-137
    "guidedmix.objective": "official",
}
UNIMATCH_CITYSCAPES = {
    **UNIMATCH_VOC,
    "data.crop_size": 801,
    "train.epochs": 240,
    "train.lr": 0.005,
    "train.decoder_lr_mult": 1.0,
    "train.loss": "ohem",
    "train.ohem_threshold": 0.7,
    "train.ohem_min_kept": 200_000 * 4,  # 200,000 per GPU of 2 images, 4 GPUs: one batch of 8
    "eval.mode": "sliding",
    "eval.window": 801,
    "eval.stride": 534,  # int(801 * 2 / 3)
    "fixmatch.conf_threshold": 0.0,
}


def setting(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize(
    ("spec", "published", "splits"),
    [
        ("voc_classic", UNIMATCH_VOC, ["pascal/92", "pascal/183", "pascal/366", "pascal/732", "pascal/1464"]),
        ("voc_blended", UNIMATCH_VOC, ["pascal/1_16", "pascal/1_8", "pascal/1_4", "pascal/u2pl_1_16"]),
        (
            "cityscapes",
            UNIMATCH_CITYSCAPES,
            ["cityscapes/1_16", "cityscapes/1_8", "cityscapes/1_4", "cityscapes/1_2"],
        ),
    ],
)
def test_each_published_setting_is_the_specs(
    spec: str, published: dict[str, object], splits: list[str], voc_root: Path, cityscapes_root: Path
) -> None:
    root = roots(voc_root, cityscapes_root)[spec]
    plan = plan_sweep(EXPERIMENTS / f"{spec}.yaml", [f"data.root={root}"])
    assert {c.method for c in plan.cells} == {"supervised", "fixmatch", "guidedmix", "s4mim"}
    folders = {"/".join(Path(str(c.tree["data"]["split"])).parts[-2:]) for c in plan.cells}
    assert set(splits) <= folders
    for cell in plan.cells:
        cfg = run_config_of(cell, {})
        crop = published["data.crop_size"]
        if "u2pl" in str(cfg.data.split):
            crop = 513  # UniMatch's table runs U2PL's lists at 513 px
        for key, value in {**published, "data.crop_size": crop}.items():
            assert setting(cfg, key) == value, (cell.id, key)
        # the lists read are the shipped copies of the published ones
        assert Path(cfg.data.split).is_dir() and (Path(cfg.data.split) / "labeled.txt").is_file()


#: arvijj/hfpl at 1038a68 (train_cam_voc.py L41-61, infer_cam_voc.py L39, config_voc2012.py L40)
HFPL_VOC = {
    "data.crop_size": 448,
    "train.batch_size": 8,
    "train.lr": 0.01,
    "train.weight_decay": 0.0005,
    "train.steps": 20000,
    "hfpl.cam_steps": 10583,  # 8 epochs of 10,582 images at 8 per step
    "hfpl.is_weight": 0.2,
    "hfpl.num_samples": 10,
    "hfpl.fs_mu": 2.5,
    "hfpl.cam_scales": (0.5, 1.0, 1.5, 2.0),
    "data.label_ratio": 1.0,
}
#: XiaohangZhan/mix-and-match at 8d4c9df (VGG/colorize_pascal train_graph.prototxt L10, L17,
#: L33; solver_graph max_iter; solver_seg base_lr, max_iter, weight_decay)
MIXANDMATCH_VOC = {
    "data.crop_size": 512,
    "model.encoder_weights": None,
    "mixandmatch.mm_steps": 8000,
    "mixandmatch.patches_per_image": 9,  # 144 patches over 16 images
    "mixandmatch.patch_min": 64 / 512,
    "mixandmatch.patch_max": 256 / 512,
    "train.steps": 42000,
    "train.lr": 0.01,
    "train.weight_decay": 0.0005,
}


@pytest.mark.parametrize(
    ("spec", "published"), [("voc_wsss", HFPL_VOC), ("voc_mixandmatch", MIXANDMATCH_VOC)]
)
def test_the_weak_and_self_supervised_specs_hold_their_papers_settings(
    spec: str, published: dict[str, object], voc_root: Path
) -> None:
    plan = plan_sweep(EXPERIMENTS / f"{spec}.yaml", [f"data.root={voc_root}"])
    for cell in plan.cells:
        cfg = run_config_of(cell, {})
        for key, value in published.items():
            if key.split(".")[0] in ("hfpl", "mixandmatch") and cfg.method != key.split(".")[0]:
                continue
            assert setting(cfg, key) == value, (cell.id, key)
    # sizes that follow the crop land on the official ones at the official crop
    if spec == "voc_wsss":
        knobs = run_config_of(plan.cells[0], {}).hfpl.at_crop(448)
        assert (knobs.work_side, knobs.fs_sigma) == (56, 5.0)
    else:
        cfg = run_config_of(next(c for c in plan.cells if c.method == "mixandmatch"), {})
        assert cfg.mixandmatch.at_crop(cfg.data.crop_size).patch_input == 128


@pytest.mark.slow
def test_a_voc_classic_dry_run_shows_every_cell_its_steps_and_its_published_point(voc_root: Path) -> None:
    import contextlib
    import io

    from segsweep.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["sweep", str(EXPERIMENTS / "voc_classic.yaml"), "--dry-run", "--set", f"data.root={voc_root}",
                     *[a for s in SMALL for a in ("--set", s)]])  # fmt: skip
    text = out.getvalue()
    assert code == 0, text
    assert "20 cells" in text
    # 80 epochs over the unlabeled list: 10,490 unlabeled at 92 labeled, 8 per step
    assert "method=supervised,ratio=0.0087,data.split=unimatch/pascal/92,seed=0" in text
    assert f"{80 * -(-10490 // 8):,} steps (80 epochs)" in text
    assert f"{80 * -(-9118 // 8):,} steps (80 epochs)" in text  # 1,464 labeled
    for published in ("45.1", "55.3", "64.8", "69.7", "73.5"):  # UniMatch's supervised-only row
        assert f"published {published} (ResNet-101" in text
    assert "val/mIoU_best" in text
    assert "gpu: deeplabv3plus resnet18 at 321 px" in text and "train.accumulate" in text


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["voc_blended", "cityscapes", "voc_wsss", "voc_mixandmatch"])
def test_every_published_spec_dry_runs_against_a_tree_of_its_dataset(
    spec: str, voc_root: Path, cityscapes_root: Path, tmp_path: Path
) -> None:
    root = roots(voc_root, cityscapes_root)[spec]
    # voc_mixandmatch tunes from a proxy trained once beforehand: here, a short proxy per run
    extra = ["mixandmatch.proxy_from=null", "mixandmatch.proxy_steps=1"] if spec == "voc_mixandmatch" else []
    sets = [a for s in [f"data.root={root}", *SMALL, *extra] for a in ("--set", s)]
    proc = segsweep_here("sweep", str(EXPERIMENTS / f"{spec}.yaml"), "--dry-run", *sets, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "dry run: every trial's config, dataset and model checked" in proc.stdout
    assert "trial(s) x " in proc.stdout and " steps" in proc.stdout
    if spec in ("voc_blended", "cityscapes"):  # budgets in epochs, counted over each cell's split
        assert "epochs)" in proc.stdout


def test_a_plan_reads_each_dataset_once_and_each_split_once(
    voc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--dry-run`` and a sweep's start: the checks and the ASHA horizons of 24 cells share
    one read of the tree and of each split's lists, and every split's files are still checked."""
    from collections import Counter

    import segsweep.data as data_module
    from segsweep.data import DataCache
    from segsweep.data.check import missing_files

    plan = plan_sweep(EXPERIMENTS / "voc_blended.yaml", [f"data.root={voc_root}", *SMALL])
    reads: Counter[str] = Counter()
    name = run_config_of(plan.cells[0], {}).data.name
    reader = data_module.DATASETS[name]
    count = lambda what, real: lambda *a, **k: reads.update([what]) or real(*a, **k)  # noqa: E731
    monkeypatch.setitem(data_module.DATASETS, name, reader._replace(load=count("tree", reader.load)))
    monkeypatch.setattr(data_module, "make_split", count("split", data_module.make_split))
    monkeypatch.setattr("segsweep.data.check.missing_files", count("files", missing_files))
    cache = DataCache()
    steps = [planned_steps(run_config_of(c, {}), cache) for c in plan.cells]
    configs = [run_config_of(c, {}).data for c in plan.cells]
    checked = [cache.checked(c) for c in configs]
    splits = {c.model_dump_json() for c in configs}
    assert len(plan.cells) == 24 and len(splits) == 6
    assert reads == {"tree": 1, "split": len(splits), "files": len(splits)}
    assert all(d.source is checked[0].source for d in checked)  # one source, read once
    one_per_split = {c.model_dump_json(): i for i, c in enumerate(configs)}.values()
    for i in one_per_split:  # as read alone
        assert steps[i] == planned_steps(run_config_of(plan.cells[i], {}))


@pytest.mark.slow
def test_check_data_reads_every_list_a_spec_names(cityscapes_root: Path, tmp_path: Path) -> None:
    spec, root = str(EXPERIMENTS / "cityscapes.yaml"), f"data.root={cityscapes_root}"
    proc = segsweep("check-data", spec, "--set", root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for labeled in (186, 372, 744, 1488):
        assert (
            f"cityscapes at {cityscapes_root}: {labeled} labeled, {2975 - labeled} unlabeled" in proc.stdout
        )
    assert "ok: " in proc.stdout
    # a file a list names, gone: named in the report, exit 2
    victim = next((cityscapes_root / "gtFine" / "val").rglob("*_labelTrainIds.png"))
    victim.unlink()
    try:
        proc = segsweep_here("check-data", spec, "--set", root, cwd=tmp_path)
        assert proc.returncode == 2
        assert f"{victim}: file not found" in proc.stdout
    finally:
        make_cityscapes(cityscapes_root)  # links it again


def test_the_colourisation_proxy_config_is_valid() -> None:
    from segsweep.config import load_run_config

    cfg = load_run_config(EXPERIMENTS / "voc_colourisation.yaml", ["data.root=/data/VOC2012"])
    assert (
        cfg.method == "mixandmatch" and cfg.mixandmatch.proxy_steps > 0 and cfg.model.encoder_weights is None
    )


def test_a_published_spec_without_its_data_root_is_one_line(tmp_path: Path) -> None:
    for spec, name in (("voc_classic", "voc_aug"), ("cityscapes", "cityscapes")):
        proc = segsweep_here("sweep", str(EXPERIMENTS / f"{spec}.yaml"), "--dry-run", cwd=tmp_path)
        assert_user_error(proc, "data.root", name)


def test_an_encoder_smp_does_not_know_is_one_line(voc_root: Path, tmp_path: Path) -> None:
    proc = segsweep_here(
        "sweep", str(EXPERIMENTS / "voc_classic.yaml"), "--dry-run", "--set", f"data.root={voc_root}",
        "--set", "model.encoder=resnet1001", "--set", "model.encoder_weights=null", cwd=tmp_path,
    )  # fmt: skip
    assert_user_error(proc, "model.encoder", "resnet1001")


# --------------------------------------------------------------------------------------------
# A few CPU steps of each protocol at its real crop, with a small encoder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "method"),
    [
        ("voc_classic", "fixmatch"),
        ("voc_blended", "s4mim"),
        ("cityscapes", "supervised"),
        ("voc_wsss", "hfpl"),
        ("voc_mixandmatch", "mixandmatch"),
    ],
)
def test_a_training_step_runs_at_the_published_crop(
    spec: str, method: str, voc_root: Path, cityscapes_root: Path
) -> None:
    """Each spec's first training stage takes a step at its real crop (321, 801, 448, 512 px),
    with a small encoder and 2 images per batch: the shapes hold end to end."""
    from segsweep.training.runner import prepare

    root = roots(voc_root, cityscapes_root)[spec]
    sets = [f"data.root={root}", *SMALL, "train.batch_size=2"]
    sets += ["train.unlabeled_batch_size=2"] if spec not in ("voc_wsss", "voc_mixandmatch") else []
    # voc_mixandmatch tunes from a proxy trained beforehand: here, its own proxy stage
    sets += ["mixandmatch.proxy_from=null", "mixandmatch.proxy_steps=1"] if spec == "voc_mixandmatch" else []
    plan = plan_sweep(EXPERIMENTS / f"{spec}.yaml", sets)
    cell = next(c for c in plan.cells if c.method == method)
    prepared = prepare(run_config_of(cell, {}))
    cfg, trainer = prepared.cfg, prepared.trainer
    crop = cfg.data.crop_size
    stage = next(s for s in trainer.stages if s.steps > 0)
    trainer.method.begin_stage(stage)
    batch = trainer._streams(stage, 0)()
    images = [k for k in ("image_l", "image_u_w", "image_u_s") if k in batch]
    assert images and all(batch[k].shape[-2:] == (crop, crop) for k in images)
    trainer.method.train()
    loss, _ = trainer.method.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        logits = trainer.method.model(batch[images[0]])
    assert logits.shape == (2, prepared.data.source.num_classes, crop, crop)
    if cfg.data.split is not None and spec != "voc_mixandmatch":  # epochs became steps
        assert cfg.train.steps == planned_steps(run_config_of(cell, {})) > 1000


@pytest.mark.slow
def test_a_cityscapes_image_is_scored_by_a_sliding_window_at_full_resolution() -> None:
    model = build_model("deeplabv3plus", "resnet18", 19, head=HeadOptions(16, (6, 12, 18), 0.0, False)).eval()
    numerics = Numerics(torch.device("cpu"), None, False, 0)
    image = torch.randn(1, 3, 1024, 2048)
    calls: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape[-2:])))
    logits = predict_logits(model, image, "sliding", 801, 534, numerics)
    assert logits.shape == (1, 19, 1024, 2048) and torch.isfinite(logits).all()
    # rows 0 and 223 (the last window ends at the border), columns 0, 534, 1068, 1247
    assert len(calls) == 2 * 4 and set(calls) == {(832, 832)}  # each window padded to a multiple of 32


# --------------------------------------------------------------------------------------------
# Any crop, UniMatch's head, pseudo masks without dropout


@pytest.mark.parametrize("size", [321, 513, 801, (100, 77)])
def test_any_input_size_gives_logits_of_its_size_aligned_with_the_image(size: int | tuple[int, int]) -> None:
    h, w = size if isinstance(size, tuple) else (size, size)
    model = build_model("deeplabv3plus", "resnet18", 3, decoder_channels=32).eval()
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.logits.shape == (1, 3, h, w)
        # head() of the features recovers the same logits (methods classify edited features)
        assert torch.allclose(model.head(feats.decoder, (h, w)), feats.logits)
        # what lies right of the image (padding) does not move the image's logits: the input
        # is padded to a multiple of 32 the same way whatever the crop holds there
        padded = F.pad(x, (0, (-w) % 32, 0, (-h) % 32))
        assert torch.allclose(model(padded)[..., :h, :w], feats.logits, atol=1e-5)


def test_the_head_options_reach_smps_deeplabv3plus() -> None:
    model = build_model("deeplabv3plus", "resnet18", 21, head=HeadOptions(16, (6, 12, 18), 0.0, False))
    aspp = model.net.decoder.aspp[0]
    rates = [m.dilation[0] for m in aspp.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert rates == [6, 12, 18]
    assert not any(m.groups > 1 for m in aspp.modules() if isinstance(m, nn.Conv2d))  # not separable
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.net.encoder.output_stride == 16
    eight = build_model("deeplabv3plus", "resnet18", 21, head=HeadOptions(output_stride=8))
    assert eight.net.encoder.output_stride == 8
    with pytest.raises(Exception, match="DeepLabV3\\+ setting"):
        validate_run_config({"model": {"arch": "unet", "aspp_rates": [6, 12, 18]}}, "test")


def test_pseudo_masks_are_never_made_through_dropout(cache_dir: Path) -> None:
    """smp's DeepLabV3+ has Dropout(0.5) in its ASPP: FixMatch's (and S4MIM's) weak-view pass
    is made with it off, batch norm untouched, and dropout is back on afterwards."""
    cfg = validate_run_config(tiny_tree(cache_dir, method="fixmatch"), "test")
    method = build_method(cfg, 7).train()
    dropouts = [m for m in method.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    assert dropouts  # smp's default head
    batch = {"image_u_w": torch.randn(4, 3, 64, 64), "valid_u": torch.ones(4, 64, 64, dtype=torch.bool)}
    torch.manual_seed(0)
    first = method.unlabeled_targets(batch)[1]
    torch.manual_seed(1)
    second = method.unlabeled_targets(batch)[1]
    assert torch.equal(first, second)  # no random dropout mask in between
    assert all(m.training for m in dropouts)
    with dropout_off(method):
        assert not any(m.training for m in dropouts)
        assert any(m.training for m in method.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in dropouts)


# --------------------------------------------------------------------------------------------
# OHEM, accumulation, budgets, sizes that follow the crop


def test_ohem_keeps_the_hard_pixels_as_unimatch_does() -> None:
    # 2 x 2 pixels, 2 classes; target probabilities by hand: softmax of (a, b) for class 0 is
    # 1 / (1 + e^(b - a)).
    logits = torch.tensor([[[[2.0, 0.0], [0.0, -1.0]], [[0.0, 0.0], [3.0, 1.0]]]])  # (1, 2, 2, 2)
    target = torch.tensor([[[0, 0], [1, IGNORE]]])
    p = [1 / (1 + torch.e**-2), 0.5, 1 / (1 + torch.e**-3)]  # 0.881, 0.5, 0.953 (valid pixels)
    ce = [-torch.log(torch.tensor(v)) for v in p]
    # threshold 0.7, min_kept 1: only the pixel at p = 0.5 is hard enough
    assert ohem_cross_entropy(logits, target, 0.7, 1).item() == pytest.approx(ce[1].item(), rel=1e-5)
    # min_kept 2: the threshold rises to the 2nd smallest probability (0.881): two kept
    assert ohem_cross_entropy(logits, target, 0.7, 2).item() == pytest.approx(
        ((ce[0] + ce[1]) / 2).item(), rel=1e-5
    )
    # more to keep than valid pixels: plain cross-entropy over the valid ones
    assert ohem_cross_entropy(logits, target, 0.7, 4).item() == pytest.approx((sum(ce) / 3).item(), rel=1e-5)
    # the ignored pixel never counts, whatever its logits
    assert ohem_cross_entropy(logits.clone().index_put_((torch.tensor([0]), torch.tensor([0]), torch.tensor([1]),
                              torch.tensor([1])), torch.tensor(50.0)), target, 0.7, 1).item() == pytest.approx(
        ce[1].item(), rel=1e-5)  # fmt: skip


def test_ohem_is_what_train_loss_ohem_trains(cache_dir: Path) -> None:
    cfg = validate_run_config(
        tiny_tree(cache_dir, **{"train.loss": "ohem", "train.ohem_min_kept": 10}), "test"
    )
    method = build_method(cfg, 7)
    logits, target = torch.randn(2, 7, 8, 8), torch.randint(0, 7, (2, 8, 8))
    assert method.supervised_loss(logits, target).item() == pytest.approx(
        ohem_cross_entropy(logits, target, 0.7, 10).item()
    )


def test_accumulating_two_micro_batches_of_four_is_one_step_of_eight(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch norm frozen (always in eval mode), no dropout, every pixel labeled (no padding:
    each micro-batch's loss is the mean over its own pixels, as each GPU's is under DDP): the
    summed gradients of 2 x 4 images are those of 8, so the weights after a step are the same."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from segsweep.data import build_data
    from segsweep.training.loop import Trainer

    monkeypatch.setattr(_BatchNorm, "train", lambda self, mode=True: nn.Module.train(self, False))
    weights = []
    for accumulate in (1, 2):
        tree = tiny_tree(cache_dir, **{"train.steps": 1, "train.batch_size": 8, "train.accumulate": accumulate,
                                       "model.aspp_dropout": 0.0, "train.optimizer": "sgd",
                                       "data.augment.scale_min": 1.0, "data.augment.scale_max": 1.0,
                                       "output_dir": str(tmp_path / str(accumulate))})  # fmt: skip
        cfg = validate_run_config(tree, "test")
        trainer = Trainer(cfg, build_data(cfg.data))
        trainer.run(tmp_path / str(accumulate))
        weights.append(torch.cat([p.detach().flatten() for p in trainer.method.model.parameters()]))
    start = validate_run_config(tiny_tree(cache_dir), "test")
    initial = torch.cat([p.detach().flatten() for p in build_method(start, 7).model.parameters()])
    one, two = weights[0] - initial, weights[1] - initial
    assert one.abs().max() > 1e-3  # the step moved the weights
    # the same step, up to float summation order (about 1e-7 of the weights)
    assert (one - two).abs().max() < 1e-3 * one.abs().max()


def test_micro_batches_split_every_key_alike() -> None:
    batch = {"image_l": torch.arange(8).view(8, 1), "mask_l": torch.arange(8).view(8, 1) + 10}
    parts = micro_batches(batch, 4)
    assert [p["image_l"].flatten().tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [p["mask_l"].flatten().tolist() for p in parts] == [[10, 11], [12, 13], [14, 15], [16, 17]]
    with pytest.raises(Exception, match="does not split into accumulate=3"):
        validate_run_config({"train": {"batch_size": 8, "accumulate": 3}}, "test")


def test_an_epoch_is_one_pass_over_the_unlabeled_list() -> None:
    cfg = validate_run_config({"train": {"epochs": 80, "batch_size": 8}}, "test")
    assert epoch_steps(cfg, 92, 10490) == 80 * 1312  # ceil(10,490 / 8) steps an epoch
    half = validate_run_config(
        {"train": {"epochs": 0.5, "batch_size": 8, "unlabeled_batch_size": 16}}, "test"
    )
    assert epoch_steps(half, 92, 10490) == round(0.5 * 656)
    assert epoch_steps(cfg, 1464, 0) == 80 * 183  # fully labeled: a pass over the labeled list
    assert epoch_steps(validate_run_config({"train": {"steps": 7}}, "test"), 92, 10490) == 7


def test_hfpl_and_mixandmatch_sizes_follow_the_crop() -> None:
    from segsweep.methods.hfpl import HFPLKnobs
    from segsweep.methods.mixandmatch import MixAndMatchKnobs

    # HFPL: the official ResNet-38 works at 1/8 of the crop (448 -> 56) with sigma 5.0 there
    official = HFPLKnobs().at_crop(448)
    assert (official.work_side, official.fs_sigma) == (56, 5.0)
    assert HFPLKnobs().at_crop(321).work_side == 40
    embedded = HFPLKnobs().at_crop(64)  # what the embedded results used
    assert (embedded.work_side, embedded.fs_sigma) == (16, 2.0)
    assert HFPLKnobs(work_side=24, fs_sigma=3.0).at_crop(448).work_side == 24  # set: kept
    # Mix-and-Match: patches resized to 128 px at the official 512 px crops, 32 at 64 px
    assert MixAndMatchKnobs().at_crop(512).patch_input == 128
    assert MixAndMatchKnobs().at_crop(64).patch_input == 32


def test_the_blur_sigma_range_is_settable() -> None:
    import numpy as np

    from segsweep.data import transforms as T

    def sigmas(*bounds: float) -> list[float]:
        return [
            float(T.draw_strong(np.random.default_rng(i), 0.0, 0.0, 1.0, *bounds)[-1]) for i in range(300)
        ]

    unimatch = sigmas(2.0, 0.1)  # sigma uniform in [0.1, 2.0]
    assert 0.1 <= min(unimatch) < 0.2 and 1.9 < max(unimatch) <= 2.0
    narrow = sigmas(1.0, 0.5)
    assert min(narrow) >= 0.5 and max(narrow) <= 1.0
    default = sigmas(1.0)  # min unset: 0.05 x max, as the embedded results used
    assert 0.05 <= min(default) < 0.1


def test_accumulation_keeps_each_parts_share_of_ohem_and_a_cutmix_partner(cache_dir: Path) -> None:
    from segsweep.data import build_data
    from segsweep.errors import ConfigError
    from segsweep.training.loop import Trainer, supervised_loss_of

    four = validate_run_config(
        {"train": {"loss": "ohem", "ohem_min_kept": 800_000, "batch_size": 8, "accumulate": 4}}, "test"
    )
    assert supervised_loss_of(four.train).keywords["min_kept"] == 200_000  # UniMatch's per GPU of 2
    # FixMatch's CutMix partner comes from the same micro-batch: one unlabeled image is refused
    cfg = validate_run_config(
        tiny_tree(cache_dir, method="fixmatch", **{"train.batch_size": 4, "train.accumulate": 4}), "test"
    )
    with pytest.raises(ConfigError, match=r"train\.accumulate: 4 micro-batches leave 1 unlabeled image"):
        Trainer(cfg, build_data(cfg.data))
    # a budget in epochs and one in steps: one line naming both
    with pytest.raises(Exception, match="steps and epochs are both set"):
        validate_run_config({"train": {"epochs": 2, "steps": 5}}, "test")
