"""Scoring a model: predictions of whole images (one pass, or sliding windows), mIoU over a
loader, the quality of a method's pseudo masks, the sample panels that show them, and the
summary numbers of a run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segsweep.data.loaders import to_model
from segsweep.data.transforms import pad_to_multiple
from segsweep.methods import Method
from segsweep.primitives import IGNORE, class_map, confusion_matrix, scores_from_confusion
from segsweep.training.checkpoints import Progress
from segsweep.training.devices import Numerics, to_device
from segsweep.training.panels import colour, compose, heat, image_tile


@torch.no_grad()
def predict_logits(
    model: nn.Module, image: Tensor, mode: str, window: int, stride: int, numerics: Numerics
) -> Tensor:
    """Logits (B, C, H, W) for a batch of whole images.

    ``whole``: one pass over the image padded to a multiple of 32. ``sliding``: windows of
    ``window`` px every ``stride`` px, logits averaged where windows overlap (for images
    larger than the training crop, e.g. Cityscapes at 1024 x 2048).
    """
    h, w = image.shape[-2:]
    with numerics.autocast():
        if mode == "whole" or (h <= window and w <= window):
            padded, _ = pad_to_multiple(image)
            return model(padded)[..., :h, :w].float()
        win_h, win_w = min(window, h), min(window, w)
        logits = None
        count = torch.zeros(1, 1, h, w, device=image.device)
        tops = list(range(0, max(h - win_h, 0) + 1, stride))
        lefts = list(range(0, max(w - win_w, 0) + 1, stride))
        tops += [h - win_h] if tops[-1] != h - win_h else []
        lefts += [w - win_w] if lefts[-1] != w - win_w else []
        for top in tops:
            for left in lefts:
                crop = image[..., top : top + win_h, left : left + win_w]
                padded, _ = pad_to_multiple(crop)
                out = model(padded)[..., :win_h, :win_w].float()
                if logits is None:
                    logits = torch.zeros(image.shape[0], out.shape[1], h, w, device=image.device)
                logits[..., top : top + win_h, left : left + win_w] += out
                count[..., top : top + win_h, left : left + win_w] += 1
        return logits / count


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    numerics: Numerics,
    mode: str = "whole",
    window: int = 512,
    stride: int = 341,
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of ``model`` over ``loader`` (255 ignored)."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=numerics.device)
    for batch in loader:
        batch = to_device(batch, numerics)
        pred = class_map(predict_logits(model, batch["image"], mode, window, stride, numerics))
        conf += confusion_matrix(pred, batch["mask"], num_classes)
    model.train(was_training)
    return scores_from_confusion(conf.cpu())


@torch.no_grad()
def pseudo_mask_quality(
    method: Method, loader: Any, numerics: Numerics, hold: int = 0
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """How good the method's pseudo masks are on held unlabeled images with ground truth.

    ``pseudo/mIoU``: the pseudo masks (every pixel) against the truth; ``pseudo/kept_share``:
    share of labeled pixels kept by the threshold; ``pseudo/kept_acc``: accuracy of the kept
    ones. What one needs to choose a confidence threshold. Measured in eval mode (running
    batch-norm statistics): a method labelling with its student in train mode (FixMatch or
    S4MIM without a teacher, as UniMatch does) trains on masks made with the batch's own
    statistics, so these figures describe its network, not each training batch's exact masks.

    Also hands back the first ``hold`` images with their pseudo labels (``image``, ``mask``,
    ``pseudo``, ``conf``, ``keep``; each (hold, ...), cropped to the image), so that a sample
    panel reuses this pass instead of labelling the same images again.
    """
    was_training = method.training
    method.eval()
    n = method.num_classes
    conf = torch.zeros(n, n, dtype=torch.long, device=numerics.device)
    kept = correct = total = 0
    held: dict[str, list[Tensor]] = {}
    taken = 0
    for batch in loader:
        batch = to_model(batch, numerics.device, channels_last=False)
        image, mask = batch["image"], batch["mask"]
        padded, (h, w) = pad_to_multiple(image)
        with numerics.autocast():
            pseudo, confidence, keep = method.pseudo_label(padded)
        pseudo, confidence, keep = pseudo[..., :h, :w], confidence[..., :h, :w], keep[..., :h, :w]
        if taken < hold:  # copies of a few images: views would keep the whole batch alive
            fields = {"image": image, "mask": mask, "pseudo": pseudo, "conf": confidence, "keep": keep}
            for name, t in fields.items():
                held.setdefault(name, []).append(t[: hold - taken].clone())
            taken += len(held["image"][-1])
        conf += confusion_matrix(pseudo, mask, n)
        labeled = mask != IGNORE
        kept += int((keep & labeled).sum())
        correct += int((keep & labeled & (pseudo == mask)).sum())
        total += int(labeled.sum())
    method.train(was_training)
    scores = {
        "pseudo/mIoU": float(scores_from_confusion(conf.cpu())["mIoU"]),
        "pseudo/kept_share": kept / max(total, 1),
        "pseudo/kept_acc": correct / kept if kept else float("nan"),
    }
    return scores, {name: torch.cat(parts) for name, parts in held.items()}


@torch.no_grad()
def sample_panel(method: Method, held: dict[str, Tensor], numerics: Numerics) -> np.ndarray:
    """Rows of image | ground truth | prediction | pseudo mask (dropped pixels white) |
    confidence, one row per held unlabeled image: the MLflow image slider shows it per step.

    ``held``: the images and pseudo labels ``pseudo_mask_quality`` kept from this
    evaluation's pass; only the prediction costs a forward pass here."""
    model = method.model  # only the student runs here: only it switches to eval mode
    was_training = model.training
    model.eval()
    padded, (h, w) = pad_to_multiple(held["image"])
    with numerics.autocast():
        pred = class_map(model(padded))[..., :h, :w].cpu()
    model.train(was_training)
    image, mask, pseudo, keep = (held[k].cpu() for k in ("image", "mask", "pseudo", "keep"))
    conf = held["conf"].float().cpu()
    rows = []
    for i in range(image.shape[0]):
        dropped = torch.where(keep[i], pseudo[i], torch.full_like(pseudo[i], IGNORE))
        rows.append([image_tile(image[i]), colour(mask[i]), colour(pred[i]), colour(dropped), heat(conf[i])])
    panel = compose(rows)
    # Small tiles (64 px) are blown up, pixels kept sharp: MLflow's image grid scales a small
    # image up with smoothing, and masks of a few pixels become a smear there.
    factor = max(1, PANEL_MIN_WIDTH // panel.shape[1])
    return panel.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else panel


#: Panels narrower than this are enlarged by a whole factor (nearest neighbour).
PANEL_MIN_WIDTH = 640


def score_models(
    method: Method,
    val_loader: Any,
    tune_loader: Any | None,
    class_names: list[str],
    numerics: Numerics,
    mode: str,
    window: int,
    stride: int,
    prefix: str = "",
) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU on val (the reported split), and mIoU on tune
    (held out for model selection; when there is one), of every model the method scores
    (``Method.eval_models``: the student, and ``_teacher`` where it keeps one)."""
    n = len(class_names)
    metrics: dict[str, float] = {}
    for role, model in method.eval_models().items():
        suffix = f"_{role}" if role else ""
        val = evaluate(model, val_loader, n, numerics, mode, window, stride)
        metrics[f"{prefix}val{suffix}/mIoU"] = val["mIoU"]
        metrics[f"{prefix}val{suffix}/pixel_acc"] = val["pixel_acc"]
        for name, iou in zip(class_names, val["iou"], strict=True):
            metrics[f"{prefix}val{suffix}/iou/{name}"] = iou
        if tune_loader is not None:
            tune = evaluate(model, tune_loader, n, numerics, mode, window, stride)
            metrics[f"{prefix}tune{suffix}/mIoU"] = tune["mIoU"]
    return metrics


def summary_metrics(progress: Progress) -> dict[str, float]:
    """Summary values of a run: the last evaluation, and the best kept apart from it.

    ``val/mIoU_at_best_tune`` is the honest model-selection number (picked on the tuning
    split); ``val/mIoU_best`` is the best over evaluations on the reported split itself,
    which flatters, and is logged only so the two can be compared.
    """
    p = progress
    out = {f"{k}_last": v for k, v in p.last.items() if k.endswith("/mIoU")}
    if p.best_val > -math.inf:
        out["val/mIoU_best"] = p.best_val
    if not math.isnan(p.val_at_best_tune):
        out["val/mIoU_at_best_tune"] = p.val_at_best_tune
        out["tune/mIoU_best"] = p.best_tune
    return out
