"""The linear probe: its pieces against direct computations, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segsweep.errors import ConfigError
from segsweep.methods.mixandmatch import colour_first_layer
from segsweep.tracking.protocol import NullTracker
from segsweep.training.probe import ProbeSettings, fit, network, probe_logits, read_at
from segsweep.training.runner import prepare

from .helpers import assert_user_error, segsweep, segsweep_here


def test_reading_features_at_pixels_matches_upsampling() -> None:
    torch.manual_seed(0)
    level = torch.randn(1, 5, 3, 4)
    size = (13, 17)  # not a multiple of the level's size: edges and interior both clamp
    full = F.interpolate(level, size=size, mode="bilinear", align_corners=False)[0]
    ys = torch.tensor([0, 12, 6, 0, 12, 3])
    xs = torch.tensor([0, 16, 8, 16, 0, 1])
    assert torch.allclose(read_at(level, ys, xs, size), full[:, ys, xs].t(), atol=1e-5)


def test_level_wise_logits_equal_the_probe_on_upsampled_standardised_features() -> None:
    torch.manual_seed(0)
    levels = [torch.randn(2, 3, 4, 4), torch.randn(2, 2, 8, 8), torch.randn(2, 4, 16, 16)]
    k, d, size = 3, 9, (16, 16)
    probe = (torch.randn(d), torch.rand(d) + 0.5, torch.randn(k, d), torch.randn(k))
    mean, std, weight, bias = probe
    up = torch.cat([F.interpolate(lv, size=size, mode="bilinear", align_corners=False) for lv in levels], 1)
    z = (up - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    direct = torch.einsum("kd,bdhw->bkhw", weight, z) + bias.view(1, -1, 1, 1)
    assert torch.allclose(probe_logits(levels, probe, size), direct, atol=1e-4)


def test_the_probe_separates_linearly_separable_classes() -> None:
    torch.manual_seed(0)
    y = torch.randint(0, 3, (600,))
    x = torch.randn(600, 8) * 0.3
    x[torch.arange(600), y] += 2.0  # class c raises feature c
    mean, std, weight, bias = fit(x, y, 3, ProbeSettings(iters=200))
    pred = (((x - mean) / std) @ weight.t() + bias).argmax(1)
    assert (pred == y).float().mean() > 0.98
    noise = torch.randn(600, 8)  # features that say nothing of the class
    mean, std, weight, bias = fit(noise, y, 3, ProbeSettings(iters=200))
    assert ((((noise - mean) / std) @ weight.t() + bias).argmax(1) == y).float().mean() < 0.6


@pytest.mark.slow
def test_probe_command_reports_the_start_and_each_checkpoint(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(**{"method": "mixandmatch", "mixandmatch.proxy_steps": 2, "mixandmatch.mm": False})
    prepare(cfg).trainer.run(tmp_path / "run", NullTracker())
    ckpts = tmp_path / "run" / "checkpoints"
    out = tmp_path / "probe.json"
    args = ["probe", str(ckpts / "proxy.pt"), str(ckpts / "last.pt"), "--iters", "20"]
    proc = segsweep(*args, "--pixels-per-image", "64", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["at"] for r in rows] == ["start", "end of proxy", "train step 4"]
    run = prepare(cfg)
    assert report["labeled_images"] == len(run.data.split.labeled) and report["val_images"] == 16
    assert all(0 <= r["val_mIoU"] <= 1 for r in rows)
    # every encoder level but the input, and the decoder map
    model = run.trainer.method.model
    assert rows[0]["features"] == sum(model.encoder_channels[1:]) + model.decoder_channels
    assert rows[0]["pixels"] <= 64 * len(run.data.split.labeled)
    assert "end of proxy" in proc.stdout and "val mIoU on 16 images" in proc.stdout

    # The start is probed as the first stage sees it (no hand-over: the proxy trains on gray
    # input); a proxy's end as the next stage sees it (first layer handed over to colour).
    first = next(k for k, v in model.encoder.state_dict().items() if v.ndim == 4 and v.shape[1] == 3)
    start, _ = network(None, cfg, run.data.source.num_classes, "start")
    assert torch.equal(start.encoder.state_dict()[first], model.encoder.state_dict()[first])
    saved = torch.load(ckpts / "proxy.pt", weights_only=True)
    after, where = network(saved, cfg, run.data.source.num_classes, "proxy.pt")
    gray = torch.nn.Conv2d(3, 1, 1)
    gray.weight.data = saved["method"][f"model.net.encoder.{first}"].clone()
    colour_first_layer(gray)
    assert where == "end of proxy" and torch.equal(after.encoder.state_dict()[first], gray.weight)

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert_user_error(segsweep("probe", "missing.pt", cwd=tmp_path), "missing.pt", "file not found")
    # the other refusals in this process (the same exit code and lines, no new interpreter)
    assert_user_error(segsweep_here("probe", "notes.txt", cwd=tmp_path), "notes.txt", "cannot read")
    assert_user_error(segsweep_here("probe", str(ckpts / "last.pt"), "--iters", "0", cwd=tmp_path), "--iters")
    wrong = segsweep_here("probe", str(ckpts / "last.pt"), "--set", "model.encoder=resnet18", cwd=tmp_path)
    assert_user_error(wrong, "--set model.encoder", "checkpoint's own config")
    # a checkpoint whose network predicts other classes (trained on another dataset) is
    # refused before anything is fitted, with the counts and the file
    other = torch.load(ckpts / "last.pt", weights_only=False)
    for key, value in list(other["method"].items()):
        if "segmentation_head.0." in key:
            other["method"][key] = torch.zeros(21, *value.shape[1:])
    torch.save(other, tmp_path / "voc.pt")
    mixed = segsweep_here("probe", str(ckpts / "last.pt"), str(tmp_path / "voc.pt"), cwd=tmp_path)
    assert_user_error(mixed, "voc.pt: its network predicts 21 classes", "has 7", "or choose the data")
    chosen = segsweep_here(
        "probe", str(ckpts / "last.pt"), str(tmp_path / "voc.pt"), "--set", "data.split_seed=3", cwd=tmp_path
    )
    assert_user_error(chosen, "config with --set data.split_seed=3) has 7", "one dataset together")
    assert "or choose" not in chosen.stderr
    from segsweep.training import probe as probe_module

    def no_fit(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("fitted before the check")

    monkeypatch.setattr(probe_module, "training_pixels", no_fit)
    with pytest.raises(ConfigError, match="predicts 21 classes"):
        probe_module.probe_checkpoints([ckpts / "last.pt", tmp_path / "voc.pt"], [], ProbeSettings())
