"""HFPL: high-fidelity CAM pseudo-labels for weakly supervised segmentation (image tags only).

Jonnarth, Zhang, Felsberg, "High-fidelity Pseudo-labels for Boosting Weakly-Supervised
Segmentation", WACV 2024 (arXiv 2304.02621); official code arvijj/hfpl (read, not copied),
building on its predecessor arvijj/icam. A pipeline of three stages:

1. ``cam``: a classification network trained on image-level tags; its class activation maps
   (CAMs) localise objects. Baseline: global average pooling of the CAM logits and a
   multi-label BCE, plus (``min_pool_weight``) the adaptive min-pooling loss that the official
   training script adds in both arms (from SEAM, Wang et al. 2020): the quarter of the pixels
   where the strongest tagged CAM is lowest is pushed to at most zero, so that no tagged class
   spreads over the background. HFPL's add-on, under its *binomial* reading of CAMs (one
   sigmoid per class and pixel, a likelihood of location given class, rather than a softmax
   posterior over classes):

   * **importance sampling pooling** (``probutils`` of the official code): per image and
     class, ``num_samples`` pixels are drawn from pi_c(i) ∝ sigmoid(z_c(i) / T) (the
     sampling temperature T is ours; the official code has none, i.e. T = 1) and BCE is
     applied to each sampled logit; the classification loss becomes
     (1 - is_weight) * L_GAP + is_weight * L_IS.
   * **feature-similarity loss**: over all pixel pairs weighted by a spatial Gaussian,
     -g(i, j) * 1/2 ||y_i - y_j||^2 * tanh(mu + logit(d_ij)), where y are the normalised CAMs
     (background = 1 - max) and d_ij the mean absolute RGB difference: CAM contours are
     pushed onto colour edges and smoothed inside colour-uniform regions. ``fs_smooth``
     (ours, 0 by default) blurs the image first, so that colour edges inside a textured object
     (its stripes) do not count as contours.

   ``addon_start`` (ours; 0, the paper's schedule, by default) trains the first share of the CAM
   steps with the baseline loss alone. The paper refines an ImageNet-pretrained network whose
   CAMs already localise; from scratch, the feature-similarity loss from the first step can
   pull the not-yet-localising CAMs into a degenerate shape (docs/results/README.md).

2. ``pseudo``: CAMs of every tagged training image, summed over the image scales
   ``cam_scales`` and their flips as in the official inference (``infer_cam_voc.py``), ReLU
   and min-max normalised per class, restricted to the image's tags; a pixel is background
   where no class reaches ``bg_threshold`` (by default tuned: the grid value scoring best on
   the tuning split, as WSSS papers report each CAM at its best threshold). Their mIoU against
   the training ground truth (the standard WSSS metric) is logged with sample panels; the
   masks become training masks.
3. ``train``: the segmentation model is trained on the pseudo masks and evaluated on real
   masks (``val/mIoU``).

``data.label_ratio`` is the fraction of training images whose tags are used. Ground-truth
masks of training images are never trained on (the trainer strips them from "tags" stages).

Shapes: images (N, 3, H, W); tags (N, C) multi-hot with C classes incl. background at 0;
CAM logits z (N, C - 1, h, w) for the foreground classes.

Departures (docs/methods.md): one smp network serves as the CAM classifier (no SEAM or
AffinityNet/random walk, no CRF; the add-on's own pieces are what the ablation compares),
except SEAM's adaptive min-pooling loss, which the official script trains in both arms and
which here acts on the CAM logits (there on SEAM's refined CAMs); the losses run at a working
resolution of at most ``work_side`` px (FSL is quadratic in pixels): by default 1/8 of the
crop as in the official ResNet-38 (448 px -> 56), at least 16 (16 x 16 on the embedded 64 px
runs), and the feature-similarity sigma scales with it. Ours, not the paper's: the sampling
temperature (the official code has none, i.e. 1), ``fs_smooth`` (off by default) and
``addon_start`` (0, the paper's schedule, by default). ``weak_compare.yaml`` and
``hfpl_ablation.yaml`` use ``addon_start: 0.5`` and a feature-similarity weight of 0.2 (the
paper: 1.0, beside SEAM's own losses), since from scratch the add-on from the first step
collapsed two of five CAM runs.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from segsweep.data.loaders import eval_loader, model_image
from segsweep.data.transforms import pad_to_multiple, unit_rgb
from segsweep.methods.base import Batch, Knobs, Method, Stage, as_floats
from segsweep.models.network import SegModel
from segsweep.primitives import class_map, confusion_matrix, scores_from_confusion
from segsweep.training.panels import colour, compose, heat, image_tile


class HFPLKnobs(Knobs):
    cam_steps: int = Field(300, ge=1, description="budget of the CAM classification stage")
    addon: bool = Field(True, description="HFPL add-on on (off: the baseline GAP CAM)")
    importance_sampling: bool = Field(True, description="IS pooling (needs addon)")
    is_weight: float = Field(0.2, ge=0, le=1, description="share of the IS loss in classification")
    num_samples: int = Field(10, ge=1, le=1000, description="pixels sampled per image and class")
    sampling_temperature: float = Field(1.0, gt=0)
    feature_similarity: bool = Field(True, description="feature-similarity loss (needs addon)")
    fs_weight: float = Field(1.0, ge=0)
    fs_sigma: float | None = Field(
        None,
        gt=0,
        description="spatial Gaussian, working-resolution pixels; None: the official 5.0 at its "
        "56 px working side (arvijj/hfpl train_cam_voc.py L57, 448 px crops), scaled to work_side, "
        "at least 2.0 (what the embedded 16 px results used)",
    )
    fs_mu: float = Field(2.5, description="colour-edge offset of the tanh")
    fs_smooth: float = Field(
        0.0,
        ge=0,
        le=16,
        description="Gaussian blur (image pixels) of the colour image before colour distances; "
        "0: raw colour, as in the paper. Objects made of a texture need about its period, or "
        "every stripe counts as an object contour",
    )
    addon_start: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of the CAM steps trained with the baseline loss before the add-on "
        "switches on (0: from the first step, as in the paper, whose network starts from "
        "ImageNet weights; a network trained from scratch has no localising CAMs to refine yet)",
    )
    min_pool_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the adaptive min-pooling loss of the official training script "
        "(from SEAM, in both its arms, weight 1): the quarter of the pixels where the strongest "
        "tagged CAM is lowest is pushed to at most zero, so that no tagged class floods the "
        "background; 0: off (plain GAP baseline)",
    )
    work_side: int | None = Field(
        None,
        ge=4,
        le=256,
        description="working resolution of the CAM losses (GAP, IS, FSL, min-pooling); None: 1/8 "
        "of the crop, the official ResNet-38's output stride (56 at 448 px), at least 16 (what "
        "the embedded 64 px results used)",
    )
    cam_scales: tuple[float, ...] = Field(
        (0.5, 1.0, 1.5, 2.0),
        min_length=1,
        max_length=8,
        description="image scales whose CAMs (each with its flip) are summed for the pseudo "
        "masks, as in the official inference; (1.0,): the image and its flip alone",
    )
    bg_threshold: float | Literal["tune"] = Field(
        "tune",
        description="CAM background threshold, or 'tune': the grid value whose pseudo masks score "
        "best on the tuning split (held-out images with masks, never the reported ones)",
    )

    def at_crop(self, crop_size: int) -> HFPLKnobs:
        side = self.work_side if self.work_side is not None else max(16, crop_size // 8)
        sigma = self.fs_sigma if self.fs_sigma is not None else max(2.0, 5.0 * side / 56)
        return self.model_copy(update={"work_side": side, "fs_sigma": sigma})

    @field_validator("cam_scales")
    @classmethod
    def _scales_in_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.25 <= v <= 4 for v in value):
            raise ValueError("each scale must be in [0.25, 4]")
        return value

    @field_validator("bg_threshold")
    @classmethod
    def _in_unit_interval(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not 0 < value < 1:
            raise ValueError("must be in (0, 1) or 'tune'")
        return value


# ---------------------------------------------------------------------------------------------
# Pieces (pure functions, unit-tested)


def gap_loss(z: Tensor, tags: Tensor) -> Tensor:
    """Baseline: BCE of the spatial mean of the CAM logits (N, K, h, w) vs tags (N, K)."""
    return F.binary_cross_entropy_with_logits(z.float().mean((2, 3)), tags)


def importance_sampling_loss(
    z: Tensor, tags: Tensor, samples: int, temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """Mean BCE of ``samples`` logits per (image, class), pixels drawn from
    pi_c(i) ∝ sigmoid(z_c(i) / T) + 1e-5. Gradients reach the drawn logits only."""
    n, k = z.shape[:2]
    flat = z.float().flatten(2)  # (N, K, P)
    with torch.no_grad():
        weights = torch.sigmoid(flat / temperature) + 1e-5
        index = torch.multinomial(
            weights.reshape(n * k, -1).cpu(), samples, replacement=True, generator=generator
        )
    picked = flat.reshape(n * k, -1).gather(1, index.to(z.device)).view(n, k, samples)
    return F.binary_cross_entropy_with_logits(picked, tags.unsqueeze(-1).expand_as(picked))


def expected_is_loss(z: Tensor, tags: Tensor, temperature: float) -> Tensor:
    """E[importance_sampling_loss]: sum_i pi_c(i) BCE(z_c(i), y_c), averaged over (N, K)."""
    flat = z.float().flatten(2)
    weights = torch.sigmoid(flat / temperature) + 1e-5
    pi = weights / weights.sum(-1, keepdim=True)
    bce = F.binary_cross_entropy_with_logits(flat, tags.unsqueeze(-1).expand_as(flat), reduction="none")
    return (pi * bce).sum(-1).mean()


def sampling_mass_on_objects(z: Tensor, objects: Tensor, temperature: float) -> Tensor:
    """Share of importance sampling's pixel distribution pi_c(i) ∝ sigmoid(z_c(i) / T) + 1e-5
    that lies on the class's own pixels: z (M, h, w) logits of M present (image, class) pairs,
    objects (M, h, w) bool; (M,). The object's share of the image when z is flat; near 1 only
    when the background logits are far below zero. A diagnostic: IS pushes every drawn pixel
    of a present class towards "present", so a low share means it mostly raises background."""
    weights = torch.sigmoid(z.float().flatten(1) / temperature) + 1e-5
    return (weights * objects.flatten(1).float()).sum(1) / weights.sum(1)


def min_pool_loss(z: Tensor, tags: Tensor, share: float = 0.25) -> Tensor:
    """Adaptive min-pooling: per image, the ``share`` of pixels where max_c ReLU(z_c) * tag_c
    is lowest, their mean (N, K, h, w), (N, K) -> scalar. Zero when those pixels are at most
    zero; absent classes never count. The official HFPL script trains both its arms with it
    (SEAM's term): it is what keeps a tagged class from spreading over the whole image."""
    n = z.shape[0]
    strongest = (F.relu(z.float()) * tags.view(*tags.shape, 1, 1)).amax(1).flatten(1)  # (N, P)
    k = max(1, int(strongest.shape[1] * share))
    return torch.topk(strongest, k, dim=1, largest=False).values.sum() / (k * n)


def normalised_cams(z: Tensor, tags: Tensor) -> Tensor:
    """ReLU and per-(image, class) min-max normalisation, times the tags; (N, K, h, w)."""
    pos = F.relu(z.float())
    low = pos.amin((2, 3), keepdim=True)
    high = pos.amax((2, 3), keepdim=True)
    cam = F.relu(pos - low - 1e-5) / (high - low + 1e-5)
    return cam * tags.view(*tags.shape, 1, 1)


def feature_similarity_loss(image01: Tensor, cams: Tensor, sigma: float, mu: float) -> Tensor:
    """HFPL's feature-similarity loss over all pixel pairs of (N, 3, h, w) images in [0, 1]
    and normalised foreground CAMs (N, K, h, w) (a background channel 1 - max is added).

    On a constant image every pair counts as colour-similar (tanh -> -1): the loss becomes a
    Gaussian-weighted smoothness energy, zero exactly when the CAM is constant too.
    """
    n, _, h, w = cams.shape
    bg = 1 - cams.amax(1, keepdim=True)
    y = torch.cat([bg, cams], 1).flatten(2)  # (N, K+1, P)
    x = image01.float().flatten(2)  # (N, 3, P)
    diff = torch.zeros(n, h * w, h * w, device=cams.device)
    for channel in range(x.shape[1]):  # one channel at a time keeps memory at N*P*P
        diff += (x[:, channel, :, None] - x[:, channel, None, :]).abs()
    d = (diff / x.shape[1]).clamp(0, 1)
    eps = 1e-5
    edge = torch.tanh(mu + torch.log((d + eps) / (1 - d + eps)))
    rows, cols = torch.meshgrid(
        torch.arange(h, device=cams.device), torch.arange(w, device=cams.device), indexing="ij"
    )
    pos = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    g = torch.exp(-(torch.cdist(pos, pos) ** 2) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
    sq = (y**2).sum(1)  # (N, P)
    delta = 0.5 * (sq[:, :, None] + sq[:, None, :] - 2 * y.transpose(1, 2) @ y).clamp_min(0)
    return -(g * delta * edge).sum((1, 2)).mean() / (h * w)


#: Background thresholds tried when ``bg_threshold: tune``. Finer below 0.05: with a 3,000-step
#: CAM stage the add-on's CAMs were tuned to 0.05, then the grid's lowest value, in 3 runs of 4.
THRESHOLD_GRID = (0.01, 0.02, 0.03, 0.04, *(round(0.05 * i, 2) for i in range(1, 20)))


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """(N, C, H, W) blurred by a separable Gaussian of ``sigma`` pixels (edges mirrored)."""
    radius = min(max(1, math.ceil(3 * sigma)), min(image.shape[-2:]) - 1)
    t = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = image.shape[1]
    out = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def best_threshold(confusions: dict[float, Tensor]) -> tuple[float, float]:
    """The threshold whose confusion matrix has the highest mIoU (ties: the lowest), and that
    mIoU."""
    scored = [(float(scores_from_confusion(c)["mIoU"]), -t) for t, c in confusions.items()]
    score, neg = max(scored)
    return -neg, score


def cam_pseudo_mask(cams: Tensor, bg_threshold: float) -> Tensor:
    """(K, H, W) normalised foreground CAMs -> (H, W) ids: 0 where no class reaches the
    threshold, else 1 + the arg-max class."""
    scores = torch.cat([torch.full_like(cams[:1], bg_threshold), cams], 0)
    return class_map(scores, dim=0)


# ---------------------------------------------------------------------------------------------


class HFPL(Method):
    Knobs = HFPLKnobs
    uses_unlabeled = False
    summary = "weakly supervised (tags): CAMs + importance sampling + feature similarity -> pseudo masks"
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "hfpl.bg_threshold": {"type": "float", "low": 0.1, "high": 0.6},
        "hfpl.sampling_temperature": {"type": "logfloat", "low": 0.25, "high": 4.0},
        "hfpl.fs_weight": {"type": "logfloat", "low": 0.05, "high": 3.0},
        "hfpl.fs_smooth": {"type": "float", "low": 0.0, "high": 6.0},
        "hfpl.is_weight": {"type": "float", "low": 0.05, "high": 0.8},
        "hfpl.addon_start": {"type": "float", "low": 0.0, "high": 0.8},
    }

    def __init__(self, model: SegModel, knobs: HFPLKnobs, num_classes: int) -> None:
        super().__init__(model, knobs, num_classes)
        self.knobs: HFPLKnobs = knobs
        # The CAM classifier: the same architecture, its own weights; C output maps of which
        # the foreground ones (1..C-1) are the CAMs. A pretrained encoder (model.encoder_weights)
        # is kept: the paper's CAM network starts from ImageNet weights too.
        self.cam_net = copy.deepcopy(model)
        kept = set(self.cam_net.encoder.modules()) if model.encoder_weights is not None else set()
        for m in self.cam_net.modules():
            if hasattr(m, "reset_parameters") and m is not self.cam_net and m not in kept:
                m.reset_parameters()
        self.stage = "train"
        self.pseudo_masks: dict[str, np.ndarray] = {}
        # The threshold in use: the knob's value, or the tuned one once stage 2 has run.
        self.threshold = 0.3 if knobs.bg_threshold == "tune" else float(knobs.bg_threshold)

    # -- pipeline -----------------------------------------------------------------------------
    def stages(self, train_steps: int) -> list[Stage]:
        return [
            Stage("cam", self.knobs.cam_steps, batch="tags", evaluate=False),
            Stage("pseudo", 0, evaluate=False),
            Stage("train", train_steps, batch="labeled"),
        ]

    def encoders(self) -> list[nn.Module]:
        return [self.model.encoder, self.cam_net.encoder]

    def begin_stage(self, stage: Stage) -> None:
        self.stage = stage.name
        self.cam_net.requires_grad_(stage.name == "cam")
        self.model.requires_grad_(stage.name != "cam")

    def training_masks(self) -> dict[str, np.ndarray] | None:
        return self.pseudo_masks if self.stage == "train" else None

    # -- stage 1: CAMs --------------------------------------------------------------------------
    def work_size(self, z: Tensor, crop: int | None = None) -> tuple[int, int]:
        """(h, w) at which the CAM stage's losses (GAP, IS, feature similarity, min-pooling)
        run: at most ``work_side`` wide (for ``crop`` px training crops; None: the run's), the
        aspect of the CAMs ``z`` (..., H, W) kept."""
        side = min(self.knobs.at_crop(crop or self.crop_size or z.shape[-1]).work_side, z.shape[-1])
        return max(1, side * z.shape[-2] // z.shape[-1]), side

    def present_classes(self, mask: Tensor) -> list[int]:
        """Foreground class ids in a ground-truth mask (H, W): its image's true tags."""
        return [int(c) for c in mask.unique() if 0 < c < self.num_classes]

    def cam_logits(self, x: Tensor) -> Tensor:
        """Foreground CAM logits (N, C - 1, H, W)."""
        return self.cam_net(x)[:, 1:]

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if self.stage != "cam":  # stage 3: plain supervised learning on the pseudo masks
            logits = self.model(batch["image_l"])
            loss = self.supervised_loss(logits, batch["mask_l"])
            return loss, as_floats({"loss": loss, "loss_sup": loss})
        x, tags = batch["image_l"], batch["tags_l"][:, 1:]
        k = self.knobs.at_crop(x.shape[-1])  # work_side and fs_sigma follow the crop
        z = self.cam_logits(x)
        z_small = F.adaptive_avg_pool2d(z, self.work_size(z, x.shape[-1]))
        loss_gap = gap_loss(z_small, tags)
        loss, logs = loss_gap, {"loss_gap": loss_gap}
        addon = k.addon and step >= k.addon_start * k.cam_steps
        if addon and k.importance_sampling:
            loss_is = importance_sampling_loss(
                z_small,
                tags,
                k.num_samples,
                k.sampling_temperature,
                torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)))),
            )
            loss = (1 - k.is_weight) * loss_gap + k.is_weight * loss_is
            logs["loss_is"] = loss_is
        if addon and k.feature_similarity:
            rgb = unit_rgb(x)
            if k.fs_smooth:
                rgb = gaussian_blur(rgb, k.fs_smooth)
            rgb = F.adaptive_avg_pool2d(rgb, z_small.shape[-2:])
            loss_fs = feature_similarity_loss(rgb, normalised_cams(z_small, tags), k.fs_sigma, k.fs_mu)
            loss = loss + k.fs_weight * loss_fs
            logs["loss_fs"] = loss_fs
        if k.min_pool_weight:  # baseline and add-on alike, as in the official script
            loss_min = min_pool_loss(z_small, tags)
            loss = loss + k.min_pool_weight * loss_min
            logs["loss_min"] = loss_min
        return loss, as_floats({"loss": loss, **logs})

    # -- stage 2: pseudo masks ------------------------------------------------------------------
    @torch.no_grad()
    def multiscale_cam_logits(self, image: Tensor) -> Tensor:
        """CAM logits of (N, 3, H, W) summed over ``cam_scales`` and flips, (N, C - 1, H, W):
        the official inference (``infer_cam_voc.py``) sums them before the ReLU."""
        h, w = image.shape[-2:]
        total: Tensor | None = None
        for scale in self.knobs.cam_scales:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            if size != (h, w):
                image_s = F.interpolate(image, size, mode="bilinear", align_corners=False)
            else:
                image_s = image
            padded, _ = pad_to_multiple(image_s)
            z = self.cam_logits(padded) + self.cam_logits(padded.flip(-1)).flip(-1)
            z = z[..., : size[0], : size[1]].float()
            if size != (h, w):
                z = F.interpolate(z, (h, w), mode="bilinear", align_corners=False)
            total = z if total is None else total + z
        assert total is not None  # cam_scales holds at least one scale
        return total

    @torch.no_grad()
    def _cams(self, data: Any, samples: list) -> Any:
        """(index, image, ground truth, normalised CAMs of the true tags, CAM logits averaged
        over the views) per sample: CAMs of the image and its flip at each of ``cam_scales``,
        restricted to the tags its mask implies."""
        device = next(self.parameters()).device
        views = 2 * len(self.knobs.cam_scales)
        for batch in eval_loader(data.source, samples, 16, 0):
            # only the image goes to the device: the masks and indices are read on the CPU
            image, mask = model_image(batch["image"], device, channels_last=False), batch["mask"].long()
            z = self.multiscale_cam_logits(image).cpu()
            for i, index in enumerate(batch["index"].tolist()):
                tags = torch.zeros(1, self.num_classes - 1)
                tags[0, [c - 1 for c in self.present_classes(mask[i])]] = 1
                cams = normalised_cams(z[i : i + 1], tags)[0]
                yield index, image[i].cpu(), mask[i], cams, z[i] / views

    def _object_mass(self, z: Tensor, mask: Tensor) -> Tensor:
        """``sampling_mass_on_objects`` of one image's tagged classes at the working
        resolution of training: (logits (C - 1, H, W), mask (H, W)) -> one share per class."""
        size = self.work_size(z)
        classes = self.present_classes(mask)
        if not classes:
            return torch.zeros(0)
        objects = torch.stack([(mask == c).float() for c in classes])[:, None]
        objects = F.adaptive_avg_pool2d(objects, size)[:, 0] > 0.5
        z_small = F.adaptive_avg_pool2d(z[[c - 1 for c in classes]][:, None], size)[:, 0]
        keep = objects.flatten(1).any(1)  # objects too small to hold a working pixel: skipped
        return sampling_mass_on_objects(z_small[keep], objects[keep], self.knobs.sampling_temperature)

    @torch.no_grad()
    def run_stage(self, stage: Stage, data: Any) -> dict[str, Any]:
        """Pseudo masks of every tagged training image; their mIoU against the ground truth
        (read for scoring only) and a panel of image | truth | pseudo mask | CAM. With
        ``bg_threshold: tune`` the threshold is first chosen on the tuning split: CAM methods
        differ in scale (the add-on's CAMs are wider), so one fixed threshold favours one of
        them; WSSS papers report each CAM at its best threshold. On the tuning split it also
        logs ``is_object_mass`` (``sampling_mass_on_objects`` at the knob's temperature)."""
        was = self.training
        self.eval()
        logs: dict[str, Any] = {}
        if data.split.tune:  # held-out images with masks: threshold and sampling diagnostics
            tune = self.knobs.bg_threshold == "tune"
            grid = THRESHOLD_GRID if tune else ()
            confusions = {t: torch.zeros(self.num_classes, self.num_classes, dtype=torch.long) for t in grid}
            masses = []
            for _, _, mask, cams, z in self._cams(data, data.split.tune):
                masses.append(self._object_mass(z, mask))
                for t in grid:
                    confusions[t] += confusion_matrix(cam_pseudo_mask(cams, t), mask, self.num_classes)
            if tune:
                self.threshold, logs["tune_mIoU"] = best_threshold(confusions)
            mass = torch.cat(masses)
            if len(mass):
                logs["is_object_mass"] = float(mass.mean())
        conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        samples = data.split.labeled
        self.pseudo_masks = {}
        rows: list[list[np.ndarray]] = []
        for index, image, mask, cams, _ in self._cams(data, samples):
            pseudo = cam_pseudo_mask(cams, self.threshold)
            self.pseudo_masks[samples[index].name] = pseudo.numpy().astype(np.uint8)
            conf += confusion_matrix(pseudo, mask, self.num_classes)
            if len(rows) < 4:
                strongest = cams.amax(0) if len(cams) else torch.zeros(mask.shape)
                rows.append([image_tile(image), colour(mask), colour(pseudo), heat(strongest)])
        self.train(was)
        scores = scores_from_confusion(conf)
        return {
            "mIoU": float(scores["mIoU"]),
            "pixel_acc": float(scores["pixel_acc"]),
            "images": float(len(self.pseudo_masks)),
            "bg_threshold": self.threshold,
            **logs,
            "panel": compose(rows),
        }

    # -- checkpoints carry the pseudo masks (a resume after stage 2 must not redo it) ------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "pseudo_masks": self.pseudo_masks, "threshold": self.threshold}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.stage = state.get("stage", "train")
        self.pseudo_masks = state.get("pseudo_masks", {})
        self.threshold = state.get("threshold", self.threshold)

    @torch.no_grad()
    def pseudo_label(self, image_u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """CAM pseudo masks (tags taken from the CAM classifier's own confident scores)."""
        z = self.cam_logits(image_u)
        tags = (torch.sigmoid(z.float().mean((2, 3))) > 0.5).float()
        cams = normalised_cams(z, tags)
        pseudo = torch.stack([cam_pseudo_mask(c, self.threshold) for c in cams])
        conf = torch.cat([torch.full_like(cams[:, :1], self.threshold), cams], 1).amax(1)
        return pseudo, conf, torch.ones_like(pseudo, dtype=torch.bool)
