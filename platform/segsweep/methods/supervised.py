"""Supervised-only baseline: cross-entropy on the labeled images, nothing else.

The reference every semi-supervised method must beat at the same label ratio and the same
number of optimizer steps (the sweep gives every method of a cell the same ``train.steps``).
Shapes: image_l (B, 3, H, W) -> logits (B, C, H, W) vs mask_l (B, H, W), 255 ignored.
"""

from __future__ import annotations

from torch import Tensor

from segsweep.methods.base import Batch, Knobs, Method, as_floats


class SupervisedKnobs(Knobs):
    """No knobs: the baseline's only choices are the shared train/model settings."""


class Supervised(Method):
    Knobs = SupervisedKnobs
    uses_unlabeled = False
    summary = "labeled images only (cross-entropy); the reference baseline"

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        logits = self.model(batch["image_l"])
        loss = self.supervised_loss(logits, batch["mask_l"])
        return loss, as_floats({"loss": loss, "loss_sup": loss})
