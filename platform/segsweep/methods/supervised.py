"""Supervised-only baseline: cross-entropy on the labeled images, nothing else.

The reference every semi-supervised method must beat at the same label ratio and the same
number of optimizer steps (the sweep gives every method of a cell the same ``train.steps``).
Shapes: image_l (B, 3, H, W) -> logits (B, C, H, W) vs mask_l (B, H, W), 255 ignored.

Departures shared by every method (docs/methods.md): the embedded runs use the run's smp
encoder trained from scratch, AdamW at 0.006 and a poly schedule at 64 px on a CPU, where the
papers use ImageNet-pretrained ResNets at 321-769 px with SGD (the published specs in
``experiments/`` follow the papers' settings); every method of a cell gets the same
``train.steps`` in its main stage, auxiliary stages their own stated budgets. Masks are resized
on the images' pixel grid (``nearest-exact``, centre-aligned as the bilinear image resize).
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
