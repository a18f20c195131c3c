"""S4MIM: masked image modeling as a regularizer for semi-supervised segmentation.

Li, Hao, Shang, Jiao, "Exploring Masked Image Modeling for Semi-Supervised Semantic
Segmentation" (arXiv 2411.08756, 2024); official code haoxt/S4MIM (empty when we looked).
The three components of the abstract, on the weak-to-strong FixMatch base of this platform
(``fixmatch.py``; the abstract names no base), each switchable:

* **Class-wise MIM**: image patches are masked (``mask_ratio`` of a ``patch_size`` grid) and
  reconstructed one class at a time. For a class c of an image (ground truth for labeled
  images, confident pseudo labels for unlabeled ones), the input keeps only the visible
  pixels of class c, and the loss covers only the masked pixels of class c: whatever
  connection the mask induces stays inside one class. A light decoder (3x3 conv, ReLU, 1x1
  conv) on the segmentation decoder's features predicts pixels; L2 on normalised pixels.
  Off: plain MIM (the whole visible image as context, every masked pixel as target).
* **Feature aggregation**: decoder features of the masked part of class c are pulled
  towards those of its visible part (cosine distance of their means; the visible side is the
  target, stop-gradient).
* **MIM in semantic space**: patches (``sem_mask_ratio``) of the encoder's deepest, most
  semantic feature map are replaced by a learned mask token, and the decoder and head must
  still predict the labels (ground truth / confident pseudo masks) of the masked pixels from
  the context around them (and the shallow skip features): masked modeling of semantics
  rather than of pixels. Cross-entropy averaged over the masked labelled pixels.
  (Masking the decoder's output instead leaves the head, a 1x1 or 3x3 conv, nothing to
  predict from: its logits there are its bias.)

Both masked passes (the class-wise MIM input, mostly zeros, and the decoder over mask
tokens) normalise with their own batch's statistics but leave the running batch-norm
statistics as they were (``primitives.bn_stats_frozen``): evaluation normalises real images
with those, which must not have absorbed near-blank ones.

Shapes: images (N, 3, H, W), labels (N, H, W) with 255 = ignore, decoder features
(N, D, h, w), deepest encoder features (N, E, h', w'), masks (N, H, W) bool.

Departures (docs/methods.md): the paper body and code were unavailable, so loss forms,
the reconstruction decoder and the feature-space masking are our reading of the abstract;
one class per image per step keeps the cost at one extra forward pass. MIM in semantic space
masks cells of the encoder's deepest map with a learned token and decodes again (one more
decoder pass); an earlier version masked the decoder's output, where the head could only
answer with its bias (fixed in ``3913d80``). Before ``19e19b1`` the masked passes moved the
batch-norm running statistics that evaluation uses (every step's near-blank class-masked
image); they no longer do. The FixMatch base departs from UniMatch as ``fixmatch.py`` says.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from segsweep.methods.base import Batch, as_floats
from segsweep.methods.fixmatch import FixMatch, FixMatchKnobs
from segsweep.models.network import PAD_MULTIPLE, SegModel
from segsweep.primitives import IGNORE, bn_stats_frozen, masked_cross_entropy


class S4MIMKnobs(FixMatchKnobs):
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of patches masked")
    patch_size: int = Field(8, ge=2, description="masking grid, pixels")
    class_wise: bool = Field(True, description="class-wise MIM (off: plain MIM)")
    mim: bool = Field(True, description="the reconstruction task at all")
    recon_weight: float = Field(1.0, ge=0)
    feature_aggregation: bool = True
    agg_weight: float = Field(0.1, ge=0)
    semantic_mim: bool = True
    sem_mask_ratio: float = Field(0.3, gt=0, lt=1)
    sem_weight: float = Field(0.5, ge=0)


# ---------------------------------------------------------------------------------------------
# Pieces (pure functions, unit-tested)


def patch_mask(
    n: int,
    height: int,
    width: int,
    patch: int,
    ratio: float,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """(N, H, W) bool: whole ``patch`` x ``patch`` cells masked, ``ratio`` of them per image."""
    gh, gw = -(-height // patch), -(-width // patch)
    scores = torch.rand(n, gh * gw, generator=generator)
    count = max(1, round(ratio * gh * gw))
    cells = torch.zeros(n, gh * gw, dtype=torch.bool)
    cells.scatter_(1, scores.argsort(dim=1)[:, :count], True)
    grid = cells.view(n, 1, gh, gw).float()
    full = F.interpolate(grid, scale_factor=patch, mode="nearest")[:, 0, :height, :width]
    return full.bool().to(device)


def cells_to_pixels(cells: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(N, h', w') bool cells of a feature map of the input padded to a multiple of
    ``PAD_MULTIPLE`` (as ``SegModel`` pads it, bottom and right) -> (N, H, W) bool pixels of
    the unpadded input: each cell covers ``stride`` x ``stride`` padded pixels, the padding is
    cropped. (Interpolating the cells straight to (H, W) would stretch them over the crop.)"""
    h, w = int(size[0]), int(size[1])
    sh = (h + (-h) % PAD_MULTIPLE) // cells.shape[-2]
    sw = (w + (-w) % PAD_MULTIPLE) // cells.shape[-1]
    return cells.repeat_interleave(sh, dim=-2).repeat_interleave(sw, dim=-1)[..., :h, :w]


def pick_classes(labels: Tensor, generator: torch.Generator) -> Tensor:
    """One class per image, uniformly among the classes present (-1 where none is)."""
    out = torch.full((labels.shape[0],), -1, dtype=torch.long)
    for i, lab in enumerate(labels.cpu()):
        present = lab[lab != IGNORE].unique()
        if len(present):
            out[i] = present[torch.randint(len(present), (1,), generator=generator)]
    return out.to(labels.device)


def classwise_regions(
    labels: Tensor, masked: Tensor, classes: Tensor, class_wise: bool
) -> tuple[Tensor, Tensor]:
    """Reconstruction target and visible context (N, H, W) bool.

    Class-wise: target = masked pixels of the image's class, context = visible pixels of that
    class, so a reconstruction target never spans two classes. Plain: every masked pixel is
    a target and every visible pixel is context.
    """
    if not class_wise:
        return masked, ~masked
    of_class = labels == classes.view(-1, 1, 1)
    return masked & of_class, ~masked & of_class


def masked_mean(features: Tensor, region: Tensor) -> Tensor:
    """Mean feature (N, D) over ``region`` (N, H, W) resized to the feature map (N, D, h, w)."""
    weight = F.interpolate(region.unsqueeze(1).float(), size=features.shape[-2:], mode="area")
    return (features * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-6)


class ReconstructionHead(nn.Module):
    """The light MIM decoder: decoder features -> RGB (normalised) at input resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, 3, 1)
        )

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        out = self.net(features)
        return (
            F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            if out.shape[-2:] != size
            else out
        )


# ---------------------------------------------------------------------------------------------


class S4MIM(FixMatch):
    Knobs = S4MIMKnobs
    summary = "FixMatch + class-wise masked image modeling, feature aggregation, semantic-space MIM"
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "s4mim.conf_threshold": {"type": "float", "low": 0.6, "high": 0.98},
        "data.augment.cutmix_prob": {"type": "float", "low": 0.0, "high": 1.0},
        "s4mim.mask_ratio": {"type": "float", "low": 0.25, "high": 0.75},
        "s4mim.recon_weight": {"type": "logfloat", "low": 0.1, "high": 3.0},
        "s4mim.sem_weight": {"type": "logfloat", "low": 0.1, "high": 3.0},
    }

    def __init__(self, model: SegModel, knobs: S4MIMKnobs, num_classes: int) -> None:
        super().__init__(model, knobs, num_classes)
        self.knobs: S4MIMKnobs = knobs
        self.recon = ReconstructionHead(model.decoder_channels) if knobs.mim else None
        # What a masked cell of the deepest encoder map holds (learned, as MAE's mask token).
        self.mask_token = (
            nn.Parameter(torch.zeros(model.encoder_channels[-1])) if knobs.semantic_mim else None
        )

    def semantic_mim_logits(
        self, encoder: list[Tensor], cells: Tensor, size: tuple[int, int] | torch.Size
    ) -> Tensor:
        """Logits (N, C, H, W) with the deepest encoder map's ``cells`` (N, h', w') bool
        replaced by the mask token; the other pyramid levels as they are."""
        assert self.mask_token is not None
        deep = encoder[-1]
        token = self.mask_token.to(deep.dtype).view(1, -1, 1, 1)
        return self.model.decode([*encoder[:-1], torch.where(cells.unsqueeze(1), token, deep)], size)

    def _generator(self, step: int) -> torch.Generator:
        # Masks come from the global RNG state (checkpointed): exact resume, seed-deterministic.
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + step)

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        k = self.knobs
        x_l, y_l, x_w = batch["image_l"], batch["mask_l"], batch["image_u_w"]
        b = x_l.shape[0]

        # The FixMatch base: pseudo masks on weak views supervise CutMixed strong views
        # (``fixmatch.loss_weighting`` and ``partner_mask`` apply here too).
        x_s, pseudo, keep, pseudo_w, keep_w = self.strong_targets(batch)
        feats = self.model.forward_features(torch.cat([x_l, x_s]))
        logits_l, logits_s = feats.logits.split([b, x_s.shape[0]])
        loss_sup = self.supervised_loss(logits_l, y_l)
        loss_unsup = masked_cross_entropy(logits_s, pseudo, weight=keep.float())
        loss = self.combine(loss_sup, loss_unsup)
        logs: dict[str, Tensor] = {"loss_sup": loss_sup, "loss_unsup": loss_unsup}

        # Class-wise MIM on labeled (ground truth) and weak unlabeled (confident pseudo) images.
        if self.recon is not None:
            images = torch.cat([x_l, x_w])
            labels = torch.cat([y_l, torch.where(keep_w, pseudo_w, torch.full_like(pseudo_w, IGNORE))])
            g = self._generator(step)
            masked = patch_mask(
                images.shape[0], *images.shape[-2:], k.patch_size, k.mask_ratio, g, images.device
            )
            classes = pick_classes(labels, g)
            target, context = classwise_regions(labels, masked, classes, k.class_wise)
            # Normalised with the masked batch's own statistics, but the running statistics
            # that evaluation uses stay those of real images: a near-blank masked image must
            # not be averaged into them.
            with bn_stats_frozen(self.model):
                feats_m = self.model.forward_features(images * context.unsqueeze(1))
            recon = self.recon(feats_m.decoder, images.shape[-2:])
            err = ((recon.float() - images.float()) ** 2).mean(dim=1)
            loss_rec = (err * target).sum() / target.sum().clamp_min(1)
            loss = loss + k.recon_weight * loss_rec
            logs["loss_recon"] = loss_rec
            if k.feature_aggregation:
                has_both = (target.flatten(1).any(1) & context.flatten(1).any(1)).float()
                f_masked = masked_mean(feats_m.decoder.float(), target)
                f_visible = masked_mean(feats_m.decoder.float(), context).detach()
                cos = F.cosine_similarity(f_masked, f_visible, dim=1)
                loss_agg = ((1 - cos) * has_both).sum() / has_both.sum().clamp_min(1)
                loss = loss + k.agg_weight * loss_agg
                logs["loss_aggregation"] = loss_agg
            logs["mim_target_share"] = target.float().mean()

        # MIM in semantic space: mask patches of the deepest encoder features, predict the
        # labels there from context.
        if self.mask_token is not None:
            deep = feats.encoder[-1]
            g = self._generator(step + 1)
            h, w = deep.shape[-2:]
            patch = max(1, round(k.patch_size * h / x_l.shape[-2]))
            cells = patch_mask(deep.shape[0], h, w, patch, k.sem_mask_ratio, g, deep.device)
            with bn_stats_frozen(self.model):  # the decoder sees mask tokens: same reason
                logits_m = self.semantic_mim_logits(feats.encoder, cells, x_l.shape[-2:])
            pix = cells_to_pixels(cells, x_l.shape[-2:])
            targets = torch.cat([y_l, pseudo])
            targets = torch.where(pix, targets, torch.full_like(targets, IGNORE))  # masked pixels only
            weights = torch.cat([torch.ones_like(y_l, dtype=torch.float), keep.float()])
            loss_sem = masked_cross_entropy(logits_m, targets, weight=weights)
            loss = loss + k.sem_weight * loss_sem
            logs["loss_semantic_mim"] = loss_sem

        valid = (pseudo != IGNORE).float()
        logs["mask_ratio"] = (keep.float() * valid).sum() / valid.sum().clamp_min(1)
        return loss, as_floats({"loss": loss, **logs})
