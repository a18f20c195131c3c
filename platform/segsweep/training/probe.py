"""A linear probe of a network's frozen features: what a pre-training stage taught it.

A self-supervised stage (Mix-and-Match's colourisation proxy, its match stage) is judged in
the end by fine-tuning, which is slow and mixes what the stage taught with what fine-tuning
learns. The standard quicker reading (as in the self-supervised literature's linear
evaluation) freezes the network and fits a linear classifier on its features: here a
per-pixel logistic regression on every encoder level but the input (smp's encoders return
the image itself first) and the decoder map, each upsampled bilinearly to the image. It is
fitted on the run's labeled images and scored by mIoU on the validation images. Features
that know the classes score far above a random initialisation's; on the embedded dataset a
supervised network does (see docs/results/2026-11-28-mixandmatch-confirmation.md).

Shapes: images (B, 3, H, W); a level's features (B, C_l, h_l, w_l); the probe's weights
(K, sum C_l) for K classes. Because bilinear upsampling and the per-channel standardisation
are affine, the probe's logits are the sum over levels of each level's own logits upsampled
(exactly what upsampling the features first would give, without a full-resolution tensor
of every channel); the training pixels' features are read with ``grid_sample`` at those
pixels, the same values ``F.interpolate`` gives there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segsweep.config import RunConfig, validate_run_config
from segsweep.data import Data, build_data
from segsweep.data.loaders import eval_loader, to_model
from segsweep.data.transforms import pad_to_multiple
from segsweep.errors import ConfigError
from segsweep.models.network import SegModel, read_torch_file
from segsweep.primitives import IGNORE, class_map, confusion_matrix, scores_from_confusion
from segsweep.training.devices import numerics_for
from segsweep.training.loop import build_method


@dataclass
class ProbeSettings:
    pixels_per_image: int = 4096  # labelled pixels drawn per training image (all if fewer)
    iters: int = 400  # full-batch Adam iterations
    lr: float = 0.01
    weight_decay: float = 1e-4
    seed: int = 0  # which pixels are drawn


def features(model: SegModel, image: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
    """The probed feature maps of a batch (encoder levels 1.. and the decoder map) and the
    (H, W) of the padded input they were computed on."""
    padded, _ = pad_to_multiple(image)
    out = model.forward_features(padded)
    size = (padded.shape[-2], padded.shape[-1])
    return [f.float() for f in out.encoder[1:]] + [out.decoder.float()], size


def read_at(level: Tensor, ys: Tensor, xs: Tensor, size: tuple[int, int]) -> Tensor:
    """Features (C,) of one image's level (1, C, h, w) at pixels (ys, xs) of the (H, W) input
    grid, as bilinear upsampling to (H, W) (align_corners=False, edges clamped) gives them."""
    h, w = size
    grid = torch.stack([(2 * xs.float() + 1) / w - 1, (2 * ys.float() + 1) / h - 1], dim=-1)
    got = F.grid_sample(
        level, grid.view(1, 1, -1, 2), mode="bilinear", padding_mode="border", align_corners=False
    )
    return got[0, :, 0].t()  # (P, C)


@torch.no_grad()
def training_pixels(
    model: SegModel, loader: Any, device: torch.device, s: ProbeSettings
) -> tuple[Tensor, Tensor]:
    """Features (P, D) and classes (P,) of up to ``pixels_per_image`` labelled pixels per image."""
    g = torch.Generator().manual_seed(s.seed)
    rows, labels = [], []
    for batch in loader:
        batch = to_model(batch, device, channels_last=False)
        levels, size = features(model, batch["image"])
        for i, mask in enumerate(batch["mask"]):
            ys, xs = (mask != IGNORE).nonzero(as_tuple=True)
            if len(ys) > s.pixels_per_image:
                pick = torch.randperm(len(ys), generator=g)[: s.pixels_per_image].to(ys.device)
                ys, xs = ys[pick], xs[pick]
            rows.append(torch.cat([read_at(lv[i : i + 1], ys, xs, size) for lv in levels], 1))
            labels.append(mask[ys, xs])
    if not rows or not sum(len(r) for r in rows):
        raise ConfigError("probe: the labeled images have no labelled pixel")
    return torch.cat(rows), torch.cat(labels)


def fit(x: Tensor, y: Tensor, num_classes: int, s: ProbeSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Multinomial logistic regression on standardised features: (mean, std, weight (K, D), bias (K,))."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=s.lr, weight_decay=s.weight_decay)
    for _ in range(s.iters):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(z @ weight.t() + bias, y).backward()
        opt.step()
    return mean, std, weight.detach(), bias.detach()


def probe_logits(levels: list[Tensor], probe: tuple[Tensor, ...], size: tuple[int, int]) -> Tensor:
    """The probe's logits (B, K, H, W) from a batch's feature levels: each level's share of
    the linear map at its own resolution, upsampled and summed (the standardisation folded
    into the weights), equal to upsampling every feature first."""
    mean, std, weight, bias = probe
    scale = weight / std
    logits, start = (bias - scale @ mean).view(1, -1, 1, 1), 0
    for lv in levels:
        part = torch.einsum("kc,bchw->bkhw", scale[:, start : start + lv.shape[1]], lv)
        logits = logits + F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        start += lv.shape[1]
    return logits


@torch.no_grad()
def score(
    model: SegModel, loader: Any, device: torch.device, probe: tuple[Tensor, ...], num_classes: int
) -> float:
    """Validation mIoU of the probe (255 ignored)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for batch in loader:
        batch = to_model(batch, device, channels_last=False)
        h, w = batch["image"].shape[-2:]
        levels, size = features(model, batch["image"])
        logits = probe_logits(levels, probe, size)
        conf += confusion_matrix(class_map(logits[..., :h, :w]), batch["mask"], num_classes)
    return float(scores_from_confusion(conf.cpu())["mIoU"])


# ---------------------------------------------------------------------------------------------
# Checkpoints -> networks


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint (last.pt, best.pt) or a finished stage's weights (e.g. proxy.pt)."""
    # A run checkpoint holds RNG states (numpy arrays): not loadable as plain weights.
    state = read_torch_file(path, str(path), weights_only=False, hint="; give a run's checkpoints/*.pt")
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("method"), dict)
        or not isinstance(state.get("config"), dict)
    ):
        raise ConfigError(f"{path}: not a segsweep checkpoint (a run's checkpoints/*.pt)")
    return state


def head_classes(state: dict[str, Any]) -> int | None:
    """The classes a checkpoint's network predicts: its segmentation head's output channels
    (every method keeps one, a colourisation proxy's untrained but sized for its data)."""
    for key, value in state["method"].items():
        if key.endswith("segmentation_head.0.weight") and isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return None


def network(
    state: dict[str, Any] | None, cfg: RunConfig, num_classes: int, path: str
) -> tuple[SegModel, str]:
    """The student network as the next stage would start from it, frozen, and where that is.

    The method's ``begin_stage`` of that stage runs first, so a hand-over between stages
    (e.g. Mix-and-Match's first layer from gray to colour input after its proxy) is probed as
    the next stage sees it: the first stage for the initialisation (``state`` None), the
    stage after a finished stage's weights, the stage a run checkpoint was written in.
    """
    method = build_method(cfg, num_classes)
    stages = method.stages(cfg.train.steps)
    names = [s.name for s in stages]
    if state is None:
        where, nxt = "start", 0
    else:
        try:
            method.load_state_dict(state["method"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{path}: its weights do not fit its own config ({first})") from None
        if "stage" in state:  # a finished stage's weights
            where = f"end of {state['stage']}"
            nxt = min(names.index(state["stage"]) + 1, len(stages) - 1) if state["stage"] in names else -1
        else:  # a run checkpoint: where the run was when it was written
            progress = state.get("progress", {})
            nxt = min(int(progress.get("stage", 0)), len(stages) - 1)
            where = f"{names[nxt]} step {progress.get('step', 0)}"
    method.begin_stage(stages[nxt])
    return method.model.eval().requires_grad_(False), where


def probe_checkpoints(
    paths: list[Path],
    overrides: list[str],
    settings: ProbeSettings,
    echo: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Probe the initialisation of the first checkpoint's run, then each checkpoint.

    Every row uses the data and device of the first checkpoint's config (with ``overrides``):
    its labeled split fits the probe, its validation images score it. ``echo`` hears once,
    when every input has been checked and the fitting starts.
    """
    from segsweep.config import apply_overrides, parse_override

    for item in overrides:  # the networks come from their checkpoints: nothing else would apply
        key = ".".join(parse_override(item)[0])
        if not (key.startswith(("data.", "eval.")) or key in ("seed", "train.device")):
            raise ConfigError(
                f"--set {key}: probe builds each network from its checkpoint's own config; "
                "--set changes only data.*, eval.*, seed and train.device"
            )
    states = [read_checkpoint(p) for p in paths]
    cfg = validate_run_config(apply_overrides(states[0]["config"], overrides), str(paths[0]))
    data: Data = build_data(cfg.data)
    device = numerics_for(cfg).device
    k = data.source.num_classes
    for path, state in zip(paths, states, strict=True):  # before any fitting
        classes = head_classes(state)
        if classes is not None and classes != k:
            chosen = [o for o in overrides if o.strip().startswith("data.")]
            source = f"{paths[0]}'s config" + (f" with --set {' '.join(chosen)}" if chosen else "")
            raise ConfigError(
                f"{path}: its network predicts {classes} classes, but the probe's data "
                f"({cfg.data.name}, from {source}) has {k}; probe checkpoints of one dataset "
                "together" + ("" if chosen else ", or choose the data with --set data.*")
            )
    echo(f"segsweep probe: fitting a linear probe per network ({len(paths) + 1} networks)...")
    fit_loader = eval_loader(data.source, data.split.labeled, cfg.eval.batch_size, 0)
    val_loader = eval_loader(data.source, data.source.val, cfg.eval.batch_size, 0)
    rows = []
    start = f"start of {paths[0].name}'s run (seed {states[0]['config'].get('seed', 0)})"
    targets = [(start, None, states[0]["config"])]
    targets += [(str(p), s, s["config"]) for p, s in zip(paths, states, strict=True)]
    for name, state, tree in targets:
        run_cfg = validate_run_config(tree, name)
        model, where = network(state, run_cfg, k, name)
        model.to(device)
        x, y = training_pixels(model, fit_loader, device, settings)
        probe = fit(x, y, k, settings)
        rows.append(
            {
                "name": name,
                "at": where,
                "method": run_cfg.method,
                "val_mIoU": score(model, val_loader, device, probe, k),
                "features": int(x.shape[1]),
                "pixels": int(x.shape[0]),
            }
        )
    return {
        "dataset": cfg.data.name,
        "labeled_images": len(data.split.labeled),
        "val_images": len(data.source.val),
        "seed": cfg.seed,
        "label_ratio": cfg.data.label_ratio,
        "settings": settings.__dict__,
        "rows": rows,
    }
