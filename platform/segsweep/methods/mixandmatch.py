"""Mix-and-Match tuning: self-supervised proxy pre-training, then class-wise triplet tuning.

Zhan, Liu, Luo, Tang, Loy, "Mix-and-Match Tuning for Self-Supervised Semantic
Segmentation", AAAI 2018 (arXiv 1712.00661); official code XiaohangZhan/mix-and-match
(Caffe; read, not copied). A pipeline of four stages:

1. ``proxy``: self-supervised pre-training on every training image, no labels. The proxy is
   colourisation as in the paper (Larsson et al., CVPR 2017, whose models the official code
   loads): from a grayscale input, classify each pixel's hue and chroma into ``color_bins``
   bins each, the hue loss weighted by chroma (hue means nothing on grey pixels).
2. ``mix`` (run inside the ``match`` stage's batches): many square patches of various sizes
   (``patch_min``..``patch_max`` of the image side) are sampled from the labeled images,
   centred on pixels of classes drawn uniformly among those present; candidates overlapping a
   kept patch by more than ``overlap_threshold`` (IoU) are discarded; each patch takes the
   dominant class of its region in the label map, and patches without one (no class covering
   ``dominant_ratio`` of its labelled pixels) are discarded. Patches of all images of the
   batch are pooled, so the graph below mixes images.
3. ``match``: a class-wise connected graph over the patches. Visiting them in random order,
   each links to a random earlier patch of its class (positive: the positive edges form a
   spanning tree per class) and of another class (negative); each patch anchors one triplet,
   and max(0, margin + ||a - p||^2 - ||a - n||^2) on L2-normalised encoder features tunes the
   network.
4. ``train``: fine-tuning for segmentation on the labeled images (cross-entropy).

Knobs switch the proxy off (``proxy_steps: 0``: M&M from scratch) and the M&M stage off
(``mm: false``), so "proxy + fine-tune" against "proxy + M&M + fine-tune" is one ablation.
``proxy_from`` starts from a proxy trained once by another run (its ``checkpoints/proxy.pt``,
encoder only), as the paper starts every tuning run from one colourisation network.

Shapes: images (N, 3, H, W), masks (N, H, W); patches (P, 3, s, s) with classes (P,);
features (P, D) unit vectors.

Departures (docs/methods.md): the encoder is the run's smp encoder (not AlexNet/VGG); the
proxy feeds a grayscale image replicated to three channels so the same encoder serves every
stage, and its first layer is handed over to colour input after the proxy
(``colour_first_layer``; the official code stays gray throughout); patches follow the issue's
dominant-class rule where the official code takes the centre pixel's label, with centres
drawn class-balanced where the official code draws 90% on foreground; the margin defaults to
0.5 (the code's 2.1 never lets the hinge switch off on unit vectors); a patch alone in its
class in the batch forms no triplet (the code uses it as its own positive); patches are
resized to a quarter of the crop (128 px at 512, 32 px on the embedded 64 px runs). With
``proxy_from`` only the encoder carries over, the run has no proxy stage of its own, and a
``proxy_steps`` set beside it is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from segsweep.data.transforms import STD, stats_on, unit_rgb
from segsweep.errors import ConfigError
from segsweep.files import UserPath
from segsweep.methods.base import Batch, Knobs, Method, Stage, as_floats
from segsweep.models.network import SegModel, read_torch_file
from segsweep.primitives import IGNORE


class MixAndMatchKnobs(Knobs):
    proxy: Literal["colorization"] = Field("colorization", description="self-supervised proxy task")
    proxy_steps: int = Field(300, ge=0, description="budget of the proxy stage (0: no proxy)")
    proxy_from: UserPath | None = Field(
        None,
        description="a proxy trained once: an earlier run's checkpoints/proxy.pt; its encoder "
        "replaces this run's proxy stage",
    )
    color_bins: int = Field(32, ge=4, le=64, description="hue and chroma bins of the proxy")
    mm: bool = Field(True, description="the mix-and-match stage (off: proxy + fine-tune)")
    mm_steps: int = Field(200, ge=1, description="budget of the mix-and-match stage")
    patches_per_image: int = Field(8, ge=2, le=64)
    patch_min: float = Field(0.12, gt=0, le=1, description="smallest patch side / image side")
    patch_max: float = Field(0.35, gt=0, le=1, description="largest patch side / image side")
    patch_input: int | None = Field(
        None,
        ge=32,
        description="patches are resized to this side; None: a quarter of the crop, at least 32 "
        "(the official 128 px at 512 px crops, XiaohangZhan/mix-and-match train_graph.prototxt "
        "L33; 32 at the embedded 64 px)",
    )

    def at_crop(self, crop_size: int) -> MixAndMatchKnobs:
        if self.patch_input is not None:
            return self
        return self.model_copy(update={"patch_input": max(32, crop_size // 4)})

    overlap_threshold: float = Field(0.3, ge=0, le=1, description="max IoU with a kept patch")
    dominant_ratio: float = Field(0.6, gt=0, le=1, description="share the patch's class must cover")
    margin: float = Field(0.5, ge=0, description="triplet margin (squared distances)")

    @model_validator(mode="after")
    def _one_proxy(self) -> MixAndMatchKnobs:
        if self.proxy_from is not None and "proxy_steps" in self.model_fields_set and self.proxy_steps:
            raise ValueError("proxy_from replaces the proxy stage: drop proxy_steps or set it to 0")
        return self


# ---------------------------------------------------------------------------------------------
# Proxy: colourisation targets


def hue_chroma_bins(rgb01: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N, 3, H, W) RGB in [0, 1] -> hue bin, chroma bin (N, H, W) long, chroma (N, H, W)."""
    high, arg = rgb01.max(1)
    low = rgb01.min(1).values
    chroma = high - low
    r, g, b = rgb01.unbind(1)
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(
        arg == 0, ((g - b) / safe) % 6, torch.where(arg == 1, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue_bin = (hue / 6 * bins).long().clamp(0, bins - 1)
    chroma_bin = (chroma * bins).long().clamp(0, bins - 1)
    return hue_bin, chroma_bin, chroma


def to_gray_input(x: Tensor) -> Tensor:
    """A normalised RGB batch -> its grayscale version, normalised again per channel."""
    mean, std = stats_on(x.device)
    rgb = x.float() * std + mean
    gray = rgb.mean(1, keepdim=True).expand_as(rgb)
    return ((gray - mean) / std).to(x.dtype)


@torch.no_grad()
def colour_first_layer(encoder: nn.Module) -> None:
    """Hand the first convolution over from the proxy's gray input to colour input.

    The proxy saw gray images replicated to three channels, so only the sum of each filter's
    channel weights was trained. Spreading that sum evenly (per normalised channel) makes each
    filter's response to a colour image what it learned for the image's brightness, up to a
    small offset from the per-channel normalisation; colour sensitivity is then learned by
    the later stages. (The official code stays gray in every stage; this keeps colour, which
    the from-scratch baseline sees too.)
    """
    first = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    scale = (STD / 255).to(first.weight).view(1, 3, 1, 1)  # x_c = (rgb_c - mean_c) / std_c
    per_unit = (first.weight / scale).sum(1, keepdim=True) / 3  # response to a unit of brightness
    first.weight.copy_(per_unit * scale)


def load_proxy_encoder(encoder: nn.Module, path: Path) -> None:
    """Load the encoder of a proxy stage another run finished (its ``checkpoints/proxy.pt``).

    The paper trains its proxy once and starts every tuning run from that network; only the
    encoder carries over (the proxy's decoder and colour head serve colourisation). Strict: an
    encoder of another architecture is an error, not a silent partial load.
    """
    where = f"mixandmatch.proxy_from: {path}"
    expected = "the weights of a finished proxy stage (a run's checkpoints/proxy.pt)"
    state = read_torch_file(path, where, hint=f"; give {expected}")
    if not isinstance(state, dict) or state.get("stage") != "proxy" or "method" not in state:
        raise ConfigError(f"{where}: not {expected}")
    prefix = "model.net.encoder."
    weights = {k.removeprefix(prefix): v for k, v in state["method"].items() if k.startswith(prefix)}
    own = encoder.state_dict()
    missing, unexpected = own.keys() - weights.keys(), weights.keys() - own.keys()
    reshaped = [k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape]
    if missing or unexpected or reshaped:
        trained = state.get("config", {}).get("model", {}).get("encoder", "another encoder")
        raise ConfigError(
            f"{where}: its encoder ({trained}) does not fit this run's model.encoder "
            f"({len(missing)} weights missing, {len(unexpected)} unexpected, {len(reshaped)} of "
            "another shape)"
        )
    encoder.load_state_dict(weights)


# ---------------------------------------------------------------------------------------------
# Mix: patch sampling


def box_iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """IoU of two squares given as (top, left, side)."""
    ih = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1]))
    inter = ih * iw
    return inter / (a[2] ** 2 + b[2] ** 2 - inter)


def sample_patches(
    mask: Tensor,
    count: int,
    side_min: int,
    side_max: int,
    overlap: float,
    dominant: float,
    generator: torch.Generator,
) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` squares (top, left, side, class) from one (H, W) label map.

    5 x count candidates are visited in order. Each is centred on a pixel of a class drawn
    uniformly among the classes present (class-balanced: with centres drawn uniformly over the
    image, small objects get almost no patch and the graph is mostly background; the official
    code draws 90% of its centres on foreground pixels). One is kept when its most frequent
    class covers at least ``dominant`` of its labelled (non-255) pixels and its IoU with every
    kept square is at most ``overlap``.
    """
    h, w = mask.shape
    where = {c: (mask == c).nonzero() for c in mask.unique().tolist() if c != IGNORE}
    classes = sorted(where)
    kept: list[tuple[int, int, int, int]] = []
    if not classes:
        return kept
    for _ in range(5 * count):
        if len(kept) == count:
            break
        pixels = where[classes[int(torch.randint(len(classes), (1,), generator=generator))]]
        cy, cx = pixels[int(torch.randint(len(pixels), (1,), generator=generator))].tolist()
        side = min(int(torch.randint(side_min, side_max + 1, (1,), generator=generator)), h, w)
        top = min(max(cy - side // 2, 0), h - side)
        left = min(max(cx - side // 2, 0), w - side)
        region = mask[top : top + side, left : left + side]
        labels = region[region != IGNORE]
        if labels.numel() == 0:
            continue
        counts = torch.bincount(labels.flatten())
        cls = int(counts.argmax())
        if counts[cls] < dominant * labels.numel():
            continue  # no dominant class
        if any(box_iou((top, left, side), k[:3]) > overlap for k in kept):
            continue  # overlaps a kept patch too much
        kept.append((top, left, side, cls))
    return kept


# ---------------------------------------------------------------------------------------------
# Match: the class-wise connected graph and the triplet loss


def class_graph_triplets(classes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Anchor, positive, negative indices over patches with labels ``classes`` (P,).

    Visiting the patches in random order, each links to a random already-visited patch of its
    class and one of another class. The first patch of a class takes a later one of its class
    as positive; patches alone in their class, or with no other class in the batch, anchor
    no triplet.
    """
    order = torch.randperm(len(classes), generator=generator).tolist()
    anchors, positives, negatives = [], [], []
    seen: list[int] = []
    for i in order:
        same = [j for j in seen if classes[j] == classes[i]]
        other = [j for j in seen if classes[j] != classes[i]]
        if not same:  # the first of its class: link forward to any other patch of the class
            same = [j for j in order if j != i and classes[j] == classes[i]]
        if not other:
            other = [j for j in order if classes[j] != classes[i]]
        if same and other:
            anchors.append(i)
            positives.append(same[int(torch.randint(len(same), (1,), generator=generator))])
            negatives.append(other[int(torch.randint(len(other), (1,), generator=generator))])
        seen.append(i)
    return (
        torch.tensor(anchors, dtype=torch.long),
        torch.tensor(positives, dtype=torch.long),
        torch.tensor(negatives, dtype=torch.long),
    )


def triplet_loss(features: Tensor, a: Tensor, p: Tensor, n: Tensor, margin: float) -> Tensor:
    """mean max(0, margin + ||f_a - f_p||^2 - ||f_a - f_n||^2); 0 with no triplet."""
    if len(a) == 0:
        return features.sum() * 0
    # Squared distances of all pairs, then the (unique) anchor pairs: the backward pass then
    # never accumulates into one row twice, which is not bit-reproducible on CPU.
    sq = features.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * features @ features.t()).clamp_min(0)
    return F.relu(margin + dist[a, p] - dist[a, n]).mean()


# ---------------------------------------------------------------------------------------------


class MixAndMatch(Method):
    Knobs = MixAndMatchKnobs
    uses_unlabeled = False
    summary = "self-supervised colourisation proxy, patch mix + class-wise triplet match, fine-tune"
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "mixandmatch.overlap_threshold": {"type": "float", "low": 0.1, "high": 0.7},
        "mixandmatch.dominant_ratio": {"type": "float", "low": 0.4, "high": 0.9},
        "mixandmatch.margin": {"type": "float", "low": 0.1, "high": 1.5},
        "mixandmatch.patches_per_image": {"type": "int", "low": 4, "high": 16},
    }

    def __init__(self, model: SegModel, knobs: MixAndMatchKnobs, num_classes: int) -> None:
        super().__init__(model, knobs, num_classes)
        self.knobs: MixAndMatchKnobs = knobs
        self.color_head = nn.Conv2d(model.decoder_channels, 2 * knobs.color_bins, 1)
        self.stage = "train"
        self.colour_input = False  # the first layer was handed over from gray to colour input
        if knobs.proxy_from is not None:
            load_proxy_encoder(model.encoder, knobs.proxy_from)

    @property
    def trains_proxy(self) -> bool:
        """This run trains its own proxy stage (not given one by ``proxy_from``)."""
        return bool(self.knobs.proxy_steps) and self.knobs.proxy_from is None

    def stages(self, train_steps: int) -> list[Stage]:
        k = self.knobs
        out = []
        if self.trains_proxy:
            out.append(Stage("proxy", k.proxy_steps, batch="all", evaluate=False))
        if k.mm:
            out.append(Stage("match", k.mm_steps, batch="labeled", evaluate=False))
        return [*out, Stage("train", train_steps, batch="labeled")]

    def begin_stage(self, stage: Stage) -> None:
        self.stage = stage.name
        self.color_head.requires_grad_(stage.name == "proxy")
        from_proxy = self.trains_proxy or self.knobs.proxy_from is not None
        if stage.name != "proxy" and from_proxy and not self.colour_input:
            colour_first_layer(self.model.encoder)
            self.colour_input = True

    def get_extra_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "colour_input": self.colour_input}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.stage = state.get("stage", "train")
        self.colour_input = bool(state.get("colour_input", False))

    # -- the three kinds of step ---------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if self.stage == "proxy":
            return self._proxy_step(batch["image_u_w"])
        if self.stage == "match":
            return self._match_step(batch["image_l"], batch["mask_l"])
        logits = self.model(batch["image_l"])
        loss = self.supervised_loss(logits, batch["mask_l"])
        return loss, as_floats({"loss": loss, "loss_sup": loss})

    def _proxy_step(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Colourisation: grayscale in, hue and chroma bins out, per pixel."""
        bins = self.knobs.color_bins
        rgb = unit_rgb(x)
        hue_bin, chroma_bin, chroma = hue_chroma_bins(rgb, bins)
        dec = self.model.forward_features(to_gray_input(x)).decoder
        out = self.color_head(dec)
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        hue_logits, chroma_logits = out.float().split(bins, dim=1)
        loss_hue = (F.cross_entropy(hue_logits, hue_bin, reduction="none") * chroma * 5).mean()
        loss_chroma = F.cross_entropy(chroma_logits, chroma_bin)
        loss = loss_hue + loss_chroma
        return loss, as_floats({"loss": loss, "loss_hue": loss_hue, "loss_chroma": loss_chroma})

    def _match_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Mix patches of every labeled image of the batch, match them with triplets."""
        side = x.shape[-1]
        k = self.knobs.at_crop(side)  # patch_input follows the crop
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        lo, hi = max(4, round(k.patch_min * side)), max(4, round(k.patch_max * side))
        crops, classes = [], []
        for i in range(x.shape[0]):
            for top, left, s, cls in sample_patches(
                y[i].cpu(), k.patches_per_image, lo, hi, k.overlap_threshold, k.dominant_ratio, g
            ):
                patch = x[i : i + 1, :, top : top + s, left : left + s]
                crops.append(
                    F.interpolate(
                        patch, size=(k.patch_input, k.patch_input), mode="bilinear", align_corners=False
                    )
                )
                classes.append(cls)
        if len(crops) < 3:
            zero = sum(p.sum() for p in self.model.encoder.parameters()) * 0
            return zero, as_floats({"loss": zero, "loss_triplet": zero, "patches": 0.0, "triplets": 0.0})
        labels = torch.tensor(classes)
        features = self.model.encoder(torch.cat(crops))[-1]
        features = F.normalize(F.adaptive_avg_pool2d(features, 2).flatten(1).float(), dim=1)
        a, p, n = class_graph_triplets(labels, g)
        loss = triplet_loss(features, a.to(x.device), p.to(x.device), n.to(x.device), k.margin)
        return loss, as_floats(
            {
                "loss": loss,
                "loss_triplet": loss,
                "patches": float(len(crops)),
                "triplets": float(len(a)),
                "classes": float(labels.unique().numel()),
            }
        )
