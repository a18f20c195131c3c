"""Checkpoints: what a run saves to continue exactly where it stopped, and reading it back.

A checkpoint (``checkpoints/last.pt``, ``best.pt``) holds the method (student, teacher,
heads), the optimizer, the AMP scaler, the ``Progress`` (stage and step, best-so-far
bookkeeping, seconds trained) and every RNG state; the data streams are pure functions of
(seed, position), so resuming continues the exact same run. A finished stage's weights are
kept apart as ``checkpoints/<stage>.pt`` (weights and config only: a starting point, not a
resume point). Every file is written atomically.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segsweep.config import RunConfig, public_tree
from segsweep.errors import ConfigError, one_line
from segsweep.files import write_atomic


@dataclass
class Progress:
    """Where a run is, and the best-so-far bookkeeping; saved in every checkpoint."""

    stage: int = 0
    step: int = 0  # optimizer steps done in the current stage
    best_tune: float = -math.inf
    best_val: float = -math.inf  # the flattering number peers report; kept apart
    val_at_best_tune: float = float("nan")
    last: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    seconds: float = 0.0  # wall seconds of training up to this checkpoint, over every attempt

    def record(self, metrics: dict[str, float]) -> bool:
        """Note an evaluation of the main stage; True when its tune mIoU is the best so far
        (the first one on a tie), the evaluation whose weights ``best.pt`` keeps."""
        val_miou = metrics["val/mIoU"]
        tune_miou = metrics.get("tune/mIoU", float("nan"))
        self.best_val = max(self.best_val, val_miou)
        is_best = not math.isnan(tune_miou) and tune_miou > self.best_tune
        if is_best:
            self.best_tune, self.val_at_best_tune = tune_miou, val_miou
        self.last = {k: v for k, v in metrics.items() if not math.isnan(v)}
        return is_best


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``write_atomic``: a crash never leaves a truncated checkpoint."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random stream a run draws from; on a GPU, only its own device's: a run resumed
    with other GPUs visible (or its GPU under another index) restores the stream it used."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back the streams ``rng_state`` took."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # RNG states are CPU byte tensors, wherever saved
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written before: one state per visible device
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)


@dataclass
class Resumed:
    """What a checkpoint hands a run that continues from it, beyond the weights (already in
    the method) and the scaler (already loaded): its progress, and two states that wait for
    the stage to start: the optimizer's (the stage builds its optimizer) and the RNG's (put
    back once the stage's loaders exist)."""

    progress: Progress
    optimizer: dict[str, Any] | None
    rng: dict[str, Any]


def save_run_state(
    path: Path,
    cfg: RunConfig,
    method: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    device: torch.device,
    run_id: str | None,
) -> Path:
    """Write everything a run needs to continue to ``path`` (``last.pt``, ``best.pt``)."""
    atomic_save(
        {
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scaler": scaler.state_dict(),
            "progress": progress.__dict__,
            "rng": rng_state(device),
            "config": public_tree(cfg),
            "run_id": run_id,
        },
        path,
    )
    return path


def save_stage_weights(path: Path, cfg: RunConfig, method: nn.Module, stage_name: str) -> Path:
    """The method's weights at the end of a stage that is not the last, kept apart as
    ``checkpoints/<stage>.pt``: ``last.pt`` moves on with the next stage, and a later run
    may start from a finished stage (e.g. ``mixandmatch.proxy_from``: a proxy trained once,
    shared by every fine-tuning run, as the paper does). Weights and config only, no
    optimizer: it is a starting point, not a resume point."""
    atomic_save({"method": method.state_dict(), "stage": stage_name, "config": public_tree(cfg)}, path)
    return path


def load_run_state(path: Path, cfg: RunConfig, method: nn.Module, scaler: torch.amp.GradScaler) -> Resumed:
    """Continue from ``path`` (a ``last.pt``): its weights into ``method``, its scaler state
    into ``scaler``, the rest handed back. A file that is not a whole checkpoint of this run's
    method and model is a one-line ``ConfigError`` naming it."""
    try:
        # On the CPU: load_state_dict copies weights and optimizer state onto their
        # parameters' device, and the RNG states must stay CPU byte tensors
        # (torch.set_rng_state refuses a CUDA one: every GPU resume failed).
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated, not a checkpoint, unpicklable
        raise ConfigError(
            f"{path}: not a readable checkpoint ({one_line(exc).split('. ')[0][:200]})"
        ) from None
    saved = state.get("config") if isinstance(state, dict) else None
    if isinstance(saved, dict):  # same shapes would load, and train another method on
        _require_same_network(path, saved, cfg)
    try:
        method.load_state_dict(state["method"])
        progress = Progress(**{**state["progress"], "resumed": True})
        optimizer = state["optimizer"]
        scaler.load_state_dict(state["scaler"])
        return Resumed(progress, optimizer, state["rng"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"{path}: does not fit this run's method and model ({one_line(exc)[:200]})"
        ) from None


def _require_same_network(path: Path, saved: dict[str, Any], cfg: RunConfig) -> None:
    """A checkpoint written by another method, architecture or encoder is refused."""
    model = saved.get("model") or {}
    was = (saved.get("method"), model.get("arch"), model.get("encoder"))
    now = (cfg.method, cfg.model.arch, cfg.model.encoder)
    if was != now:
        raise ConfigError(
            f"{path}: a checkpoint of {'/'.join(map(str, was))}, but this run is "
            f"{'/'.join(now)} (method/arch/encoder); resume with the config it was written with"
        )
