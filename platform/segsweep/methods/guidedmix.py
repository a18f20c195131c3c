"""GuidedMix-Net: labeled images guide the pseudo masks of unlabeled images.

Tu, Huang, Ji, Wang, Chang, Li, "GuidedMix-Net: Semi-Supervised Semantic Segmentation by
Using Labeled Images as Reference", AAAI 2022 (arXiv 2106.15064 / 2112.14015); official code
yh-pengtu/GuidedMix-Net at 27de72a (read, not copied). Two objectives, ``objective``:

**official** (the default): what the released code trains, the code behind the published
numbers, so the one to compare against them; ``paper`` keeps our reading of the text. In
``mmseg/models/segmentors/encoder_decoder.py`` (``GuidedMix_EncoderDecoder``) and the configs
``configs/3sseg/guidedmix_deeplabv3plus_*.py``:

* one pass of the backbone over labeled and unlabeled images together (L386); the labeled
  logits get the supervised loss (L392-394) -- here ``supervised_loss``;
* lambda, one per batch: Beta(1, 1) folded to min(lam, 1 - lam) and redrawn while
  >= ``lambda_factor`` (L465-469; 0.5 by default, L305, 0.1-0.4 in some Cityscapes configs):
  uniform on [0, min(``mix_strength``, 0.5)) here;
* partners at random: ``torch.randperm`` over the batch (L471), which asserts as many labeled
  as unlabeled images (L463); here the first min(B, U) labeled images each take a distinct
  random unlabeled partner;
* the features of the labeled image and of its partner are mixed, lam * f_l + (1 - lam) * f_u
  (L472), with gradients into both (neither is detached), and pass through a separate mix
  head, ``decode_head_mix``'s bottleneck (3x3 conv, BN, ReLU) and classifier (L333, L476-477);
* the labeled image's own logits, as its supervised pass produced them (the
  ``conv_seg`` forward hook, L353-362, L479), times lam, are subtracted from the mixed logits
  (L482-483). They are not detached, so gradients flow through them into the labeled pass
  (weight -lam); here likewise;
* what remains is trained towards the unlabeled partner's own prediction, detached
  (``seg_logit_unlabeled_main.detach()[indices]``, L487-488), with the config's ``kl_loss``:
  mmseg's sigmoid ``FocalLoss``, gamma 0.5, loss_weight 10, reduction mean, alpha left at
  its default 0.5 (``guidedmix_deeplabv3plus_1464.py`` L35-40, as every 3sseg config; ``focal_loss.py`` L142). Given logits as the target, its
  CUDA path trains towards their arg-max (``target.argmax(dim=1)``, ``focal_loss.py``
  L272-279), with no confidence threshold (``primitives.sigmoid_focal_loss``;
  ``focal_weight`` here);
* no loss on the unlabeled image's own prediction (its logits, L423, only make the target),
  and the labeled mirror term is computed but not returned (L489-490, L495);
* MITrans (``mmseg/models/necks/mitrans.py``: convs and a non-local self-attention block over
  the mixed features only) is built only when a config passes ``mitrans`` (L329-330, L473);
  no released config does, so it is off.

Departures in ``official`` (docs/methods.md), forced by the platform: segsweep's models are smp's (DeepLabV3+,
U-Net, FPN), so the mixed features are the decoder's output map (what the classifier reads)
rather than the ASPP branches before the bottleneck, and the mix head is a fresh 3x3 conv, BN,
ReLU and a classifier built as the model's (upsampled as the model upsamples); the loss is
taken at the input resolution rather than at the head's (upsampling is linear, so subtracting
before or after it is the same); the released heads have Dropout2d(0.1) before the classifier (config L28;
``decode_heads/decode_head.py`` L103-104, L224-227),
while here every pass of the step runs with dropout off (the unlabeled arg-max target above
all: a pseudo mask is never made through dropout), and the mix head has none; padding pixels
of the unlabeled image (``valid_u``) weigh 0 in the focal loss (mmseg's ``valid_mask``), the
mean still over every element as mmseg takes it. Knobs used: ``mix_strength``,
``focal_weight``; the others are ``paper``'s.

**paper**: our reading of the paper's three components, each switchable (the paper states
similarity pairing and image mixing, which the code does not do):

* **LUPI, labeled-unlabeled pair interpolation** (pairing + mixing). Each unlabeled image is
  paired with the most similar labeled image of the batch (cosine similarity of the encoder's
  deepest features, global-average-pooled); a feature-alignment loss pulls each unlabeled
  feature towards its partner. The pair is mixed, x_mix = lam * x_l + (1 - lam) * x_u, with
  lam ~ U(0, mix_strength) per pair: the labeled image is the minor part, as in the official
  code (which draws lam below 0.5).
* **MITrans, mutual information transfer**: non-local attention that refines the mixed
  image's decoder features with its labeled partner's features (keys and values come from
  both), applied ``mitrans_steps`` times (progressive refinement under the cluster
  assumption: a mixed pixel takes information from labeled pixels that look like it). It sits
  on a training-only branch, as in the official code; inference uses the plain model.
* **PMG, pseudo mask generation**: the mixed prediction p_mix (through the shared decoder) is
  trained towards lam * onehot(y_l) + (1 - lam) * p_u; reading it the other way, the
  unlabeled image's mask is recovered as (p_mix - lam * onehot(y_l)) / (1 - lam), using the
  labeled partner's known mask as reference, thresholded at ``conf_threshold``, and it
  supervises the prediction on the unlabeled image. Without PMG, the unlabeled image's own
  thresholded prediction is used.

Where ``paper`` takes what from: pairing by similarity and image mixing, from the paper's
text; lam below 0.5, from the code (L465-469); the alignment loss, the soft mixed target,
the PMG formula and its threshold, our forms of the paper's description (its exact formulas
were not in the text we could read); MITrans as attention to the labeled partner, from the
paper's description (the released module attends within the mixed features only). No strong
augmentation in either objective, as in the paper and the code.

Shapes: x_l (B, 3, H, W), y_l (B, H, W); x_u (U, 3, H, W); decoder features (N, D, h, w);
pairs (U,) index the labeled batch; lam (U,) in ``paper``, one float in ``official``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from segsweep.methods.base import Batch, Knobs, Method, as_floats
from segsweep.models.network import SegModel, logits_of_input
from segsweep.primitives import (
    IGNORE,
    class_map,
    dropout_off,
    masked_cross_entropy,
    one_hot_ignore,
    sigmoid_focal_loss,
)

#: The official ``kl_loss``: sigmoid focal loss, gamma 0.5 (``guidedmix_deeplabv3plus_1464.py``
#: L35-40, as every 3sseg config), alpha mmseg's default 0.5 (``focal_loss.py`` L142).
FOCAL_GAMMA = 0.5
FOCAL_ALPHA = 0.5


class GuidedMixKnobs(Knobs):
    objective: Literal["official", "paper"] = Field(
        "official", description="official: the released code's loss; paper: our reading of the paper"
    )
    focal_weight: float = Field(10.0, ge=0, description="official: weight of the mixed focal loss")
    pairing: Literal["similar", "random"] = Field("similar", description="partner choice (LUPI)")
    align_weight: float = Field(0.1, ge=0, description="feature-alignment loss weight")
    mix_strength: float = Field(
        0.5, gt=0, lt=1, description="max share of the labeled image in a mix (official: capped at 0.5)"
    )
    mitrans: bool = Field(True, description="refine mixed features with MITrans")
    mitrans_steps: int = Field(2, ge=1, le=8, description="MITrans refinement iterations")
    mask_generation: bool = Field(True, description="PMG pseudo masks (off: plain pseudo labels)")
    conf_threshold: float = Field(
        0.95, ge=0, le=1, description="PMG renormalisation sharpens masks: lower values drift"
    )
    mix_weight: float = Field(1.0, ge=0, description="weight of the mixed-prediction loss")
    unsup_weight: float = Field(1.0, ge=0, description="weight of the pseudo-mask loss")


# ---------------------------------------------------------------------------------------------
# Pieces, each a function of tensors (unit-tested on tiny inputs)


def pool_embedding(feature: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, C) unit vectors (global average pool, L2-normalised)."""
    return F.normalize(feature.float().mean(dim=(2, 3)), dim=1)


def pair_by_similarity(emb_u: Tensor, emb_l: Tensor) -> tuple[Tensor, Tensor]:
    """Each unlabeled embedding (U, C) picks its most similar labeled one (B, C).

    Returns partner indices (U,) and their cosine similarities (U,).
    """
    sim = emb_u @ emb_l.t()
    best, index = sim.max(dim=1)
    return index, best


def mix_images(x_l: Tensor, x_u: Tensor, lam: Tensor) -> Tensor:
    """lam * x_l + (1 - lam) * x_u with one lam (U,) per pair."""
    lam = lam.view(-1, 1, 1, 1).to(x_u.dtype)
    return lam * x_l + (1 - lam) * x_u


def reference_probs(y_l: Tensor, p_l: Tensor, num_classes: int) -> Tensor:
    """The labeled partner's known mask as probabilities (U, C, H, W); its own prediction
    ``p_l`` stands in where the mask is ignored (borders, padding)."""
    onehot = one_hot_ignore(y_l, num_classes)
    ignored = (y_l == IGNORE).unsqueeze(1)
    return torch.where(ignored, p_l, onehot)


def mixed_target(ref_l: Tensor, p_u: Tensor, lam: Tensor) -> Tensor:
    """What the mixed prediction should be: lam * ref_l + (1 - lam) * p_u, per pixel."""
    lam = lam.view(-1, 1, 1, 1)
    return lam * ref_l + (1 - lam) * p_u


def generate_pseudo_mask(p_mix: Tensor, ref_l: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """PMG: recover the unlabeled image's class probabilities from the mixed prediction.

    (p_mix - lam * ref_l) / (1 - lam), clipped at 0 and renormalised. Returns the pseudo mask
    (U, H, W) and its confidence (U, H, W). Exact when p_mix is the true mix.
    """
    lam = lam.view(-1, 1, 1, 1)
    p_u = ((p_mix - lam * ref_l) / (1 - lam)).clamp_min(0)
    p_u = p_u / p_u.sum(dim=1, keepdim=True).clamp_min(1e-8)
    conf, pseudo = p_u.max(dim=1)
    return pseudo, conf


def soft_cross_entropy(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """-sum_c target_c log softmax(logits)_c, averaged over valid pixels (U, H, W)."""
    loss = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return (loss * valid).sum() / valid.sum().clamp_min(1)


class NonLocalStep(nn.Module):
    """One attention step: queries from the mixed features, keys/values from the mixed and
    the labeled partner's features (embedded Gaussian non-local block, Wang et al. 2018).
    The output projection starts at zero, so the step starts as the identity."""

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        inner = max(8, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.scale = inner**-0.5

    def forward(self, mixed: Tensor, guide: Tensor) -> Tensor:
        n, _, h, w = mixed.shape
        q = self.query(mixed).flatten(2).transpose(1, 2)  # (N, hw, d)
        both = torch.cat([mixed, guide], dim=3)  # (N, C, h, 2w): attend to both images
        k = self.key(both).flatten(2)  # (N, d, 2hw)
        v = self.value(both).flatten(2).transpose(1, 2)  # (N, 2hw, d)
        attn = torch.softmax((q @ k) * self.scale, dim=-1)
        update = (attn @ v).transpose(1, 2).reshape(n, -1, h, w)
        return mixed + self.out(update)


class MITrans(nn.Module):
    """Mutual information transfer: ``steps`` non-local steps at a working resolution of at
    most 16 x 16 (attention is quadratic in pixels), their update upsampled back."""

    def __init__(self, channels: int, steps: int, max_side: int = 16) -> None:
        super().__init__()
        self.steps = nn.ModuleList(NonLocalStep(channels) for _ in range(steps))
        self.max_side = max_side

    def forward(self, mixed: Tensor, guide: Tensor) -> Tensor:
        h, w = mixed.shape[-2:]
        factor = max(1, math.ceil(max(h, w) / self.max_side))
        small_m = F.avg_pool2d(mixed, factor) if factor > 1 else mixed
        small_g = F.avg_pool2d(guide, factor) if factor > 1 else guide
        refined = small_m
        for step in self.steps:
            refined = step(refined, small_g)
        delta = refined - small_m
        if factor > 1:
            delta = F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)
        return mixed + delta


class MixHead(nn.Module):
    """The official objective's separate head for mixed features (``decode_head_mix``,
    ``encoder_decoder.py`` L333, L476-477: bottleneck 3x3 conv, BN, ReLU, then the
    classifier): a 3x3 conv, BN, ReLU and a fresh classifier built as ``model``'s (its
    convolution re-initialised as smp initialises heads), upsampled to the input as the
    model's logits are (padded to a multiple of 32, then cropped)."""

    def __init__(self, model: SegModel) -> None:
        super().__init__()
        d = model.decoder_channels
        self.bottleneck = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True)
        )
        self.classifier = copy.deepcopy(model.net.segmentation_head)
        for m in self.classifier.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        return logits_of_input(self.classifier(self.bottleneck(features)), size)


def official_lambda(mix_strength: float) -> float:
    """One lambda per batch, uniform on [0, min(mix_strength, 0.5)): the distribution of the
    official draw (Beta(1, 1) folded to min(lam, 1 - lam), redrawn while >= lambda_factor,
    ``encoder_decoder.py`` L465-469), from torch's global generator (checkpointed)."""
    return float(torch.rand(())) * min(mix_strength, 0.5)


def decoupled_logits(logits_mix: Tensor, logits_l: Tensor, lam: float) -> Tensor:
    """The mixed logits less lam times the labeled image's own logits (``encoder_decoder.py``
    L482-483): what remains is trained as the unlabeled partner's prediction."""
    return logits_mix - lam * logits_l


# ---------------------------------------------------------------------------------------------


class GuidedMix(Method):
    Knobs = GuidedMixKnobs
    uses_unlabeled = True
    summary = "GuidedMix-Net: labeled-unlabeled feature mixing, decoupled focal loss (paper: PMG masks)"
    #: The space of the default objective, ``official`` (the paper's knobs do nothing there);
    #: a spec that sweeps ``objective: paper`` names its own (conf_threshold, mix_weight, ...).
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "guidedmix.mix_strength": {"type": "float", "low": 0.1, "high": 0.5},
        "guidedmix.focal_weight": {"type": "logfloat", "low": 2.5, "high": 40.0},
    }

    def __init__(self, model: SegModel, knobs: GuidedMixKnobs, num_classes: int) -> None:
        super().__init__(model, knobs, num_classes)
        self.knobs: GuidedMixKnobs = knobs
        paper = knobs.objective == "paper"
        self.mitrans = (
            MITrans(model.decoder_channels, knobs.mitrans_steps) if paper and knobs.mitrans else None
        )
        self.mix_head = MixHead(model) if not paper else None
        # The last labeled batch: the partners of the diagnostic pseudo masks at evaluation.
        self._guide: tuple[Tensor, Tensor] | None = None

    def _pairs(self, emb_u: Tensor, emb_l: Tensor) -> tuple[Tensor, Tensor]:
        if self.knobs.pairing == "similar":
            return pair_by_similarity(emb_u.detach(), emb_l.detach())
        index = torch.randint(0, emb_l.shape[0], (emb_u.shape[0],), device=emb_u.device)
        return index, (emb_u.detach() * emb_l.detach()[index]).sum(1)

    def _mixed_logits(self, x_mix: Tensor, guide_features: Tensor) -> Tensor:
        feats = self.model.forward_features(x_mix)
        decoder = feats.decoder
        if self.mitrans is not None:
            decoder = self.mitrans(decoder, guide_features)
        return self.model.head(decoder, x_mix.shape[-2:])

    @property
    def conf_threshold(self) -> float:
        """``official`` has no threshold: every pixel's arg-max is a target."""
        return self.knobs.conf_threshold if self.knobs.objective == "paper" else 0.0

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        # Every pass here also makes the pseudo masks (p_u, the mixed prediction, the
        # official arg-max target): none goes through dropout (smp's DeepLabV3+ ASPP has
        # Dropout(0.5); UniMatch's head has none).
        with dropout_off(self):
            if self.knobs.objective == "official":
                return self._official_step(batch)
            return self._training_step(batch)

    def _official_step(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The released code's objective (module docstring, with its lines)."""
        assert self.mix_head is not None
        x_l, y_l, x_u, valid = batch["image_l"], batch["mask_l"], batch["image_u_w"], batch["valid_u"]
        b, u = x_l.shape[0], x_u.shape[0]

        # One pass over labeled and unlabeled images (L386); supervised loss on the labeled.
        feats = self.model.forward_features(torch.cat([x_l, x_u]))
        logits_l, logits_u = feats.logits.split([b, u])
        loss_sup = self.supervised_loss(logits_l, y_l)

        # Random partners (L471), one lam per batch (L465-469), features mixed (L472) with
        # gradients into both images' passes, through the separate mix head (L476-477).
        n = min(b, u)
        partner = torch.randperm(u)[:n].to(x_u.device)
        lam = official_lambda(self.knobs.mix_strength)
        dec_l, dec_u = feats.decoder.split([b, u])
        logits_mix = self.mix_head(lam * dec_l[:n] + (1 - lam) * dec_u[partner], x_u.shape[-2:])

        # Less lam x the labeled pass's own logits, not detached (L482-483), trained towards
        # the arg-max of the partner's detached prediction (L487-488), no threshold.
        remains = decoupled_logits(logits_mix, logits_l[:n], lam)
        target = class_map(logits_u.detach()[partner])
        target = torch.where(valid[partner], target, torch.full_like(target, IGNORE))
        loss_mix = sigmoid_focal_loss(remains, target, gamma=FOCAL_GAMMA, alpha=FOCAL_ALPHA)

        loss = loss_sup + self.knobs.focal_weight * loss_mix
        return loss, as_floats({"loss": loss, "loss_sup": loss_sup, "loss_mix": loss_mix, "mix_lambda": lam})

    def _training_step(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        k, n = self.knobs, self.num_classes
        x_l, y_l, x_u, valid = batch["image_l"], batch["mask_l"], batch["image_u_w"], batch["valid_u"]
        b = x_l.shape[0]

        # Student on labeled and unlabeled images in one pass (shared batch-norm statistics).
        feats = self.model.forward_features(torch.cat([x_l, x_u]))
        logits_l, logits_u = feats.logits.split([b, x_u.shape[0]])
        loss_sup = self.supervised_loss(logits_l, y_l)

        # LUPI: pair each unlabeled image with its most similar labeled image, align, mix.
        emb = pool_embedding(feats.encoder[-1])
        emb_l, emb_u = emb.split([b, x_u.shape[0]])
        pair, similarity = self._pairs(emb_u, emb_l)
        loss_align = (1 - (emb_u * emb_l[pair].detach()).sum(1)).mean()
        lam = torch.rand(x_u.shape[0], device=x_u.device) * k.mix_strength
        x_mix = mix_images(x_l[pair], x_u, lam)

        # Mixed branch (+ MITrans), trained towards the mix of the known mask and p_u. The
        # labeled partner's features are the reference: keys and values, not trained here.
        guide = feats.decoder[:b].detach()[pair]
        logits_mix = self._mixed_logits(x_mix, guide)
        p_l = logits_l.detach().float().softmax(1)
        p_u = logits_u.detach().float().softmax(1)
        ref = reference_probs(y_l[pair], p_l[pair], n)
        loss_mix = soft_cross_entropy(logits_mix, mixed_target(ref, p_u, lam), valid.float())

        # PMG: the unlabeled image's mask, read back from the mixed prediction.
        if k.mask_generation:
            pseudo, conf = generate_pseudo_mask(logits_mix.detach().float().softmax(1), ref, lam)
        else:
            conf, pseudo = p_u.max(dim=1)
        keep = (conf >= k.conf_threshold) & valid
        pseudo = torch.where(valid, pseudo, torch.full_like(pseudo, IGNORE))
        loss_unsup = masked_cross_entropy(logits_u, pseudo, weight=keep.float())

        loss = loss_sup + k.align_weight * loss_align + k.mix_weight * loss_mix + k.unsup_weight * loss_unsup
        self._guide = (x_l.detach()[:8], y_l.detach()[:8])
        mask_ratio = keep.float().sum() / valid.float().sum().clamp_min(1)
        return loss, as_floats(
            {
                "loss": loss,
                "loss_sup": loss_sup,
                "loss_align": loss_align,
                "loss_mix": loss_mix,
                "loss_unsup": loss_unsup,
                "mask_ratio": mask_ratio,
                "pair_similarity": similarity.mean(),
                "mix_lambda": lam.mean(),
            }
        )

    @torch.no_grad()
    def pseudo_label(self, image_u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``official``: the arg-max of the prediction, every pixel kept (the target of the
        mixed branch). ``paper``: PMG masks for held images, guided by the last labeled batch (lam fixed at half the
        mix strength, so evaluation consumes no randomness); the plain prediction before any
        training step or with PMG off."""
        logits_u = self.model(image_u)
        p_u = logits_u.float().softmax(1)
        if self.knobs.objective == "official":  # the arg-max target, every pixel kept
            conf, pseudo = p_u.max(dim=1)
            return pseudo, conf, torch.ones_like(pseudo, dtype=torch.bool)
        if not self.knobs.mask_generation or self._guide is None:
            conf, pseudo = p_u.max(dim=1)
            return pseudo, conf, conf >= self.knobs.conf_threshold
        x_l, y_l = self._guide
        feats_l = self.model.forward_features(x_l)
        emb_u = pool_embedding(self.model.forward_features(image_u).encoder[-1])
        pair, _ = pair_by_similarity(emb_u, pool_embedding(feats_l.encoder[-1]))
        if x_l.shape[-2:] != image_u.shape[-2:]:  # held images may be larger than training crops
            conf, pseudo = p_u.max(dim=1)
            return pseudo, conf, conf >= self.knobs.conf_threshold
        lam = torch.full((image_u.shape[0],), self.knobs.mix_strength / 2, device=image_u.device)
        logits_mix = self._mixed_logits(mix_images(x_l[pair], image_u, lam), feats_l.decoder[pair])
        ref = reference_probs(y_l[pair], feats_l.logits.float().softmax(1)[pair], self.num_classes)
        pseudo, conf = generate_pseudo_mask(logits_mix.float().softmax(1), ref, lam)
        return pseudo, conf, conf >= self.knobs.conf_threshold
