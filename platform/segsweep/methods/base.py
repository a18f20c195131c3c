"""The method contract.

A method is an ``nn.Module`` that owns the student model (``self.model``), any teacher or
auxiliary head, and its pseudo-mask logic. The trainer calls::

    loss, logs = method.training_step(batch, step)   # total loss, named float logs
    loss.backward(); optimizer.step()
    method.after_step(step)                           # e.g. the EMA teacher update

and never branches on a method's name. The optimizer trains every parameter of the method
with ``requires_grad=True``; a teacher keeps ``requires_grad=False``.

Batch keys (``B`` labeled, ``U`` unlabeled images per step; masks use 255 = ignore):

    image_l (B, 3, H, W) float   normalised labeled images (weak view)
    mask_l  (B, H, W)    long    their masks
    tags_l  (B, C)       float   multi-hot image-level tags (background excluded)
    image_u_w (U, 3, H, W) float weak view of unlabeled images
    image_u_s (U, 3, H, W) float strong view: same crop, photometric augmentation (only for
                                 methods with ``uses_strong_view``)
    box_u   (U, H, W)    bool    a CutMix box per strong view (may be empty)
    valid_u (U, H, W)    bool    False on padding added by the crop

Unlabeled ground truth never reaches a method: the trainer keeps it for diagnostics only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from segsweep.models.network import SegModel
from segsweep.primitives import confidence_mask, masked_cross_entropy

Batch = dict[str, Tensor]


class Knobs(BaseModel):
    """Base of a method's knobs: its config section, named after its ``METHODS`` entry (the
    run config is built from that table). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def at_crop(self, crop_size: int) -> Knobs:
        """These knobs with the sizes left unset (None) filled in for ``crop_size`` px crops
        (a method whose sizes follow the crop overrides it and calls it on each batch's side)."""
        return self


@dataclass(frozen=True)
class Stage:
    """One stage of a method's pipeline, run in order by the trainer.

    ``name`` prefixes the stage's metrics (the last stage, ``train``, has no prefix, so
    ``val/mIoU`` means the same thing for every method). ``steps`` is its optimizer-step budget;
    a stage with 0 steps only runs ``Method.run_stage`` (e.g. writing pseudo masks).
    ``batch`` names what its batches hold: "labeled" (images and masks), "tags" (images and
    image-level tags; the trainer removes the masks), "all" (views of every training image,
    no labels) or "semi" (labeled + unlabeled).
    """

    name: str
    steps: int
    batch: str = "semi"
    evaluate: bool = True


def as_floats(logs: dict[str, Tensor | float]) -> dict[str, float]:
    """Scalar tensors -> floats in one device sync (one ``.tolist()``, not one ``.item()`` each)."""
    if not logs:
        return {}
    device = next((v.device for v in logs.values() if isinstance(v, Tensor)), torch.device("cpu"))
    values = torch.stack(
        [torch.as_tensor(v, device=device).detach().float().reshape(()) for v in logs.values()]
    )
    return dict(zip(logs, values.tolist(), strict=True))


class Method(nn.Module):
    """Base class: supervised cross-entropy plumbing shared by every method."""

    Knobs: ClassVar[type[Knobs]] = Knobs
    #: The loader must supply unlabeled views (``image_u_*``) in the main stage.
    uses_unlabeled: ClassVar[bool] = False
    #: The method reads ``image_u_s``. A batch is given its strong view only then: it is the
    #: costliest augmentation, and a method that never reads it should not pay for it.
    uses_strong_view: ClassVar[bool] = False
    #: One line for ``segsweep methods``.
    summary: ClassVar[str] = ""
    #: The Optuna search space a sweep uses with ``search: {<method>: default}``: mixing and
    #: threshold knobs first. Keys are run-config keys; values are sweep ``SearchParam`` specs.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, model: SegModel, knobs: Knobs, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.knobs = knobs
        self.num_classes = num_classes
        #: The loss of labeled pixels, (B, C, H, W) logits and (B, H, W) masks -> scalar:
        #: ``train.loss`` (cross-entropy or OHEM), set by ``training.loop.build_method``.
        self.supervised_loss: Callable[[Tensor, Tensor], Tensor] = masked_cross_entropy
        #: The run's training crop side (``data.crop_size``), set by ``training.loop.build_method``;
        #: sizes that follow the crop (``Knobs.at_crop``) read it outside training steps.
        self.crop_size: int | None = None

    # -- the contract -------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Return the total loss (a scalar with grad) and named float logs (see ``as_floats``)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (EMA updates live here)."""

    def unlabeled_per_micro_batch(self) -> int:
        """Unlabeled images a (micro-)batch must hold at least for this method's step (e.g. a
        CutMix partner within it); the trainer refuses a ``train.accumulate`` that leaves fewer."""
        return 1

    def stages(self, train_steps: int) -> list[Stage]:
        """The pipeline; single-loop methods have one stage with the run's step budget."""
        return [Stage("train", train_steps, batch="semi" if self.uses_unlabeled else "labeled")]

    def encoders(self) -> list[nn.Module]:
        """The encoders of the networks it trains: the trainer gives their parameters the
        base learning rate and every other parameter ``train.decoder_lr_mult`` times it."""
        return [self.model.encoder]

    def begin_stage(self, stage: Stage) -> None:
        """Called before a stage starts (or resumes): switch heads, freeze parts, etc."""

    def run_stage(self, stage: Stage, data: Any) -> dict[str, Any]:
        """Work of a stage with no optimizer steps (``data``: the run's ``Data``). Returns
        what to log under the stage's name: floats as metrics, (H, W, 3) arrays as images."""
        return {}

    def training_masks(self) -> dict[str, np.ndarray] | None:
        """Masks that replace the dataset's for labeled batches from now on (e.g. pseudo
        masks a previous stage made), by image name; None keeps the dataset's masks."""
        return None

    # -- evaluation helpers ------------------------------------------------------------------
    def eval_models(self) -> dict[str, nn.Module]:
        """Models scored at each evaluation: '' is the student; a teacher adds 'teacher'."""
        return {"": self.model}

    @property
    def conf_threshold(self) -> float:
        """Confidence threshold of the pseudo masks (0: every pixel is kept)."""
        return float(getattr(self.knobs, "conf_threshold", 0.0))

    @torch.no_grad()
    def pseudo_label(self, image_u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The pseudo mask this method would train on for a weak view (U, 3, H, W).

        Returns (pseudo (U, H, W) long, confidence (U, H, W) float, keep (U, H, W) bool).
        Used for the pseudo-mask diagnostics and sample panels; methods with a teacher or a
        special mask generation override it.
        """
        return confidence_mask(self.pseudo_teacher()(image_u), self.conf_threshold)

    def pseudo_teacher(self) -> nn.Module:
        """The network whose predictions become pseudo masks (the student, unless overridden)."""
        return self.model
