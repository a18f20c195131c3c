"""FixMatch for segmentation: weak-to-strong consistency with a confidence threshold.

Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", NeurIPS 2020, Sec. 2.3 (Eq. 4), in the segmentation form of UniMatch's
FixMatch baseline (Yang et al., CVPR 2023, Sec. 3.1): a pseudo mask is the arg-max of the
prediction on the weak view, kept where its confidence reaches ``conf_threshold``, and
supervises the prediction on the strong view; the strong view also gets a CutMix box
(Yun et al. 2019) pasted from another unlabeled image of the batch, with the pseudo masks
mixed the same way (French et al., BMVC 2020).

Shapes: labeled (B, 3, H, W) + (B, H, W); unlabeled weak/strong views (U, 3, H, W),
CutMix boxes and valid masks (U, H, W). Optionally an EMA teacher (Mean Teacher,
Tarvainen & Valpola 2017) makes the pseudo masks instead of the student.

Two knobs choose between segsweep's form (the defaults) and UniMatch's (LiheYoung/UniMatch
``fixmatch.py`` at 818609d):

* ``loss_weighting``: "sum" is L_x + unsup_weight * L_u; "mean" is
  (L_x + unsup_weight * L_u) / 2, UniMatch's ``loss = (loss_x + loss_u_s) / 2.0`` (L166)
  when unsup_weight is 1.
* ``partner_mask``: where the CutMix partner's pseudo mask comes from. "train": the rolled
  pseudo mask of the same weak-view pass as the batch's own (batch norm in training mode, as
  the pseudo teacher is). "eval": the partner's mask is predicted again in eval mode under
  ``no_grad`` (running batch-norm statistics, dropout off) and the model then goes back to
  training mode, as UniMatch makes ``mask_u_w_mix`` (``torch.no_grad(); model.eval()``
  L132-137, ``model.train()`` L142). UniMatch's partner is an image of a second unlabeled
  loader (``zip(trainloader_l, trainloader_u, trainloader_u)``, L120); here the loader gives
  one unlabeled batch per step, so the partner image is another image of the same batch
  (the batch rolled by one), only its pseudo mask is made as UniMatch makes it.

Departures (docs/methods.md): the pseudo masks come from a forward pass of the weak views
alone (no gradient, dropout off); the labeled and strong views share the training pass, and
a strong view's CutMix partner is another image of the same batch. UniMatch batches labeled
with weak views, strong views alone, takes the partner from a second unlabeled batch and
weighs the losses as (L_x + L_u) / 2: ``loss_weighting: mean`` and ``partner_mask: eval`` do
what UniMatch does (the published specs set both; the defaults, ``sum`` and ``train``, are
what the embedded results were measured with). Strong augmentation: the blur range scales
with the crop (UniMatch blurs up to 2 px at 321 px; at 64 px that would erase the textures
that define the classes), and CutMix box aspect ratios are log-uniform in [0.3, 1/0.3]
(UniMatch: uniform, mostly tall boxes). ``s4mim`` inherits all of this.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from segsweep.methods.base import Batch, Knobs, Method, as_floats
from segsweep.models.network import SegModel
from segsweep.primitives import (
    IGNORE,
    confidence_mask,
    dropout_off,
    ema_decay_at,
    ema_update,
    eval_mode,
    masked_cross_entropy,
)


class FixMatchKnobs(Knobs):
    conf_threshold: float = Field(0.95, ge=0, le=1, description="keep pseudo pixels this sure")
    unsup_weight: float = Field(1.0, ge=0, description="weight of the unlabeled loss")
    cutmix: bool = Field(True, description="paste CutMix boxes between strong views")
    ema_teacher: bool = Field(False, description="pseudo masks from an EMA teacher")
    ema_decay: float = Field(0.99, ge=0, lt=1)
    loss_weighting: Literal["sum", "mean"] = Field(
        "sum", description="sum: L_x + w L_u; mean: (L_x + w L_u) / 2, as UniMatch"
    )
    partner_mask: Literal["train", "eval"] = Field(
        "train",
        description="CutMix partner's pseudo mask: the shared train-mode pass, or eval mode as UniMatch",
    )


def mix_in_boxes(box: Tensor, inside: Tensor, outside: Tensor) -> Tensor:
    """Where ``box`` (U, H, W) is set take ``inside``, elsewhere ``outside``; images or masks."""
    if inside.dim() == box.dim() + 1:  # images (U, 3, H, W)
        box = box.unsqueeze(1)
    return torch.where(box, inside, outside)


class FixMatch(Method):
    Knobs = FixMatchKnobs
    uses_unlabeled = True
    uses_strong_view = True
    summary = "weak-to-strong consistency, confidence threshold, CutMix; EMA teacher optional"
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "fixmatch.conf_threshold": {"type": "float", "low": 0.6, "high": 0.98},
        "data.augment.cutmix_prob": {"type": "float", "low": 0.0, "high": 1.0},
        "fixmatch.unsup_weight": {"type": "logfloat", "low": 0.25, "high": 4.0},
    }

    def __init__(self, model: SegModel, knobs: FixMatchKnobs, num_classes: int) -> None:
        super().__init__(model, knobs, num_classes)
        self.knobs: FixMatchKnobs = knobs
        self.teacher: nn.Module | None = None
        if knobs.ema_teacher:
            self.teacher = copy.deepcopy(model).eval()
            self.teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> FixMatch:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher always predicts with its running statistics
        return self

    def pseudo_teacher(self) -> nn.Module:
        return self.teacher if self.teacher is not None else self.model

    def unlabeled_targets(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Pseudo mask, confidence and keep mask (U, H, W) of the weak views, padding ignored.
        Made with dropout off (smp's DeepLabV3+ has Dropout(0.5) in its ASPP; UniMatch's head
        has none), batch norm as the teacher is (the student's: training mode)."""
        teacher = self.pseudo_teacher()
        with torch.no_grad(), dropout_off(teacher):
            logits_w = teacher(batch["image_u_w"])
        pseudo, conf, keep = confidence_mask(logits_w, self.knobs.conf_threshold)
        pseudo = torch.where(batch["valid_u"], pseudo, torch.full_like(pseudo, IGNORE))
        return pseudo, conf, keep & batch["valid_u"]

    def partner_targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Pseudo mask and keep mask (U, H, W) of the weak views predicted in eval mode under
        ``no_grad`` (``partner_mask: eval``; UniMatch ``fixmatch.py`` L132-137, L142): the
        model's training flags are restored afterwards."""
        teacher = self.pseudo_teacher()
        with torch.no_grad(), eval_mode(teacher):
            logits_w = teacher(batch["image_u_w"])
        pseudo, _, keep = confidence_mask(logits_w, self.knobs.conf_threshold)
        pseudo = torch.where(batch["valid_u"], pseudo, torch.full_like(pseudo, IGNORE))
        return pseudo, keep & batch["valid_u"]

    def strong_targets(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The strong views with their CutMix boxes pasted and their targets: (image_s
        (U, 3, H, W), pseudo (U, H, W), keep (U, H, W)), then the weak views' own pseudo and
        keep masks before mixing (for methods that reuse them)."""
        pseudo_w, _, keep_w = self.unlabeled_targets(batch)
        image_s, pseudo, keep = batch["image_u_s"], pseudo_w, keep_w
        if self.knobs.cutmix:
            # Paste each strong view's box from the next image of the batch (a fixed roll
            # keeps the step deterministic and costs no extra forward pass).
            box = batch["box_u"]
            if self.knobs.partner_mask == "eval":
                partner, partner_keep = self.partner_targets(batch)
            else:
                partner, partner_keep = pseudo_w, keep_w
            image_s = mix_in_boxes(box, image_s.roll(1, 0), image_s)
            pseudo = mix_in_boxes(box, partner.roll(1, 0), pseudo_w)
            keep = mix_in_boxes(box, partner_keep.roll(1, 0), keep_w)
        return image_s, pseudo, keep, pseudo_w, keep_w

    def unlabeled_per_micro_batch(self) -> int:
        """CutMix pastes each strong view's box from another image of its batch: two at least."""
        return 2 if self.knobs.cutmix else 1

    def combine(self, loss_sup: Tensor, loss_unsup: Tensor) -> Tensor:
        """The labeled and unlabeled losses as ``loss_weighting`` says."""
        loss = loss_sup + self.knobs.unsup_weight * loss_unsup
        return loss / 2 if self.knobs.loss_weighting == "mean" else loss

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        image_l, mask_l = batch["image_l"], batch["mask_l"]
        image_s, pseudo, keep, _, _ = self.strong_targets(batch)

        # One forward pass over labeled and strong views: the batch-norm statistics see both.
        logits = self.model(torch.cat([image_l, image_s]))
        logits_l, logits_s = logits.split([image_l.shape[0], image_s.shape[0]])
        loss_sup = self.supervised_loss(logits_l, mask_l)
        loss_unsup = masked_cross_entropy(logits_s, pseudo, weight=keep.float())
        loss = self.combine(loss_sup, loss_unsup)

        valid = (pseudo != IGNORE).float()
        mask_ratio = (keep.float() * valid).sum() / valid.sum().clamp_min(1)
        return loss, as_floats(
            {"loss": loss, "loss_sup": loss_sup, "loss_unsup": loss_unsup, "mask_ratio": mask_ratio}
        )

    def after_step(self, step: int) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.model, ema_decay_at(step, self.knobs.ema_decay))

    def eval_models(self) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {"": self.model}
        if self.teacher is not None:
            models["teacher"] = self.teacher
        return models
