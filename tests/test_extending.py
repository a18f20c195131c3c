"""Extending segsweep: a method is a class plus one entry in ``METHODS``, a dataset a reader
plus one entry in ``DATASETS``; nothing else is edited. Here a toy method (its ``Knobs``
become its config section from that entry) and a toy reader are registered, named in a
config file, validated, trained a few steps and evaluated through the real entry points.
docs/contributing.md walks through the same two steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import Field
from torch import Tensor

from segsweep.config import dump_yaml, load_run_config
from segsweep.data import DATASETS, Reader
from segsweep.data.sources import Sample, Source
from segsweep.errors import ConfigError
from segsweep.methods import METHODS
from segsweep.methods.base import Batch, Knobs, Method, as_floats
from segsweep.tracking.protocol import NullTracker
from segsweep.training.runner import prepare

# -- a toy method: one file's worth -------------------------------------------------------------


class ToyKnobs(Knobs):
    """The toy's config section, ``toy:`` in a run config."""

    weight: float = Field(1.0, gt=0, description="scale of the supervised loss")


class Toy(Method):
    """Supervised cross-entropy, scaled by ``toy.weight``."""

    Knobs = ToyKnobs
    summary = "a toy: scaled supervised cross-entropy"
    knobs: ToyKnobs

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        loss = self.knobs.weight * self.supervised_loss(self.model(batch["image_l"]), batch["mask_l"])
        return loss, as_floats({"loss": loss})


# -- a toy reader: two classes, the left part of each image one colour, the rest another -------


def toy_arrays(count: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (N, H, W, 3) uint8 and masks (N, H, W) uint8: class 1 left of a
    random column (red), class 0 right of it (blue), a 255 (ignored) column between."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for i, edge in enumerate(rng.integers(4, size - 4, count)):
        images[i, :, :edge, 0] = 200
        images[i, :, edge:, 2] = 200
        masks[i, :, :edge] = 1
        masks[i, :, edge] = 255
    return images, masks


def load_toy(cfg: object) -> Source:
    """The toy dataset, held in memory (a reader of files would read ``cfg.root``)."""
    arrays = {"train": toy_arrays(24, 0), "val": toy_arrays(8, 1)}
    return Source(
        name="toy",
        root=Path("."),
        class_names=["blue", "red"],
        train=[Sample(f"train/{i}", i, i) for i in range(24)],
        val=[Sample(f"val/{i}", i, i) for i in range(8)],
        fixed_size=True,  # every image the same size: evaluated in batches
        arrays=arrays,
    )


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two entries, for this test only."""
    monkeypatch.setitem(METHODS, "toy", Toy)
    monkeypatch.setitem(DATASETS, "toy", Reader("two colours, two classes (a test's toy)", load_toy))


def write_config(tmp_path: Path, **toy: object) -> Path:
    tree = {
        "method": "toy",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "toy", "crop_size": 32, "label_ratio": 0.5, "tune_size": 4},
        "model": {"arch": "unet", "encoder": "tu-mobilenetv3_small_050", "decoder_channels": 16},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 2},
        "eval": {"diag_samples": 0},
        "tracking": {"enabled": False},
        "toy": toy,
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


class Recorder(NullTracker):
    """Keeps the metrics a run logs."""

    def __init__(self) -> None:
        self.metrics: dict[tuple[str, int], float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update({(key, step): value for key, value in metrics.items()})


def test_a_toy_method_and_reader_validate_train_and_evaluate(registered: None, tmp_path: Path) -> None:
    cfg = load_run_config(write_config(tmp_path, weight=0.5), ["train.steps=4"])
    assert cfg.method == "toy" and cfg.data.name == "toy"
    assert cfg.knobs() == ToyKnobs(weight=0.5)  # the section its entry added
    assert cfg.flat()["toy.weight"] == 0.5 and "fixmatch.conf_threshold" not in cfg.flat()
    assert yaml.safe_load(dump_yaml(cfg))["toy"] == {"weight": 0.5}

    prepared = prepare(cfg)
    assert isinstance(prepared.trainer.method, Toy) and prepared.data.source.name == "toy"
    assert len(prepared.data.split.labeled) == 10  # half of the 20 left beside 4 tune images
    recorder = Recorder()
    result = prepared.trainer.run(tmp_path / "run", recorder)
    assert result.status == "finished"
    # trained: the loss logged at steps 2 and 4; evaluated at both, on val and tune
    assert {step for (key, step) in recorder.metrics if key == "train/loss"} == {2, 4}
    for step in (2, 4):
        assert 0.0 <= recorder.metrics[("val/mIoU", step)] <= 1.0
        assert ("val/iou/red", step) in recorder.metrics and ("tune/mIoU", step) in recorder.metrics
    assert result.metrics["val/mIoU_last"] == recorder.metrics[("val/mIoU", 4)]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_a_toy_sections_values_are_checked_and_its_names_listed(registered: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"toy.yaml: toy.weight: Input should be greater than 0"):
        load_run_config(write_config(tmp_path, weight=-1))
    with pytest.raises(ConfigError, match=r"toy.yaml: toy.size: unknown key"):
        load_run_config(write_config(tmp_path, size=3))
    with pytest.raises(
        ConfigError, match=r"method: unknown method 'toys'; valid methods: .*mixandmatch, toy$"
    ):
        load_run_config(write_config(tmp_path), ["method=toys"])
    with pytest.raises(ConfigError, match=r"data.name: Input should be .*'folder' or 'toy'$"):
        load_run_config(write_config(tmp_path), ["data.name=toys"])


def test_without_their_entries_a_config_naming_them_is_refused(tmp_path: Path) -> None:
    # The registries are the one source: no entry, no section, no name.
    with pytest.raises(ConfigError, match=r"method: unknown method 'toy'"):
        load_run_config(write_config(tmp_path), ["data.name=synthetic"])
    with pytest.raises(ConfigError, match=r"data.name: Input should be 'synthetic', "):
        load_run_config(write_config(tmp_path), ["method=supervised"])


def test_the_names_a_config_accepts_are_the_registries() -> None:
    from typing import get_args

    from segsweep.config import DataConfig, ModelConfig, RunConfig
    from segsweep.models.network import ARCHS

    assert RunConfig.method_names() == tuple(METHODS)
    assert list(RunConfig.model_fields)[-len(METHODS) :] == list(METHODS)  # a section each, in order
    assert get_args(DataConfig.model_fields["name"].annotation) == tuple(DATASETS)
    assert get_args(ModelConfig.model_fields["arch"].annotation) == tuple(ARCHS)
