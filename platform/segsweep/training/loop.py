"""The trainer: one plain loop per stage that owns AMP, the loaders, the LR schedule,
evaluation and checkpoint/resume. Methods plug in through ``training_step``; nothing here
branches on a method's name.

A run is a list of stages (``Method.stages``; one for single-loop methods). Each stage
builds its own optimizer, streams its batches, evaluates every ``train.eval_every`` steps
and at its end, and checkpoints at each evaluation (a finished stage's weights are also
kept as ``checkpoints/<stage>.pt``). A checkpoint holds the method (student,
teacher, heads), optimizer, AMP scaler, stage and step, best-so-far bookkeeping and every
RNG state; the data streams are pure functions of (seed, position), so resuming continues
the exact same run.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segsweep.config import RunConfig, TrainConfig, public_tree
from segsweep.data import Data
from segsweep.data.loaders import eval_loader, hash_seed, stream_loader, to_model
from segsweep.data.sources import Sample
from segsweep.data.transforms import pad_to_multiple
from segsweep.errors import ConfigError, Diverged, InjectedFailure, OutOfMemory, Stopped, first_line, one_line
from segsweep.files import remove_leftovers, write_atomic
from segsweep.methods import Method, Stage, get_method
from segsweep.models.network import HeadOptions, build_model
from segsweep.primitives import (
    IGNORE,
    class_map,
    confusion_matrix,
    masked_cross_entropy,
    ohem_cross_entropy,
    poly_lr,
    scores_from_confusion,
)
from segsweep.tracking.mlflow_writer import NullTracker, RunTracker
from segsweep.training.panels import colour, compose, heat, image_tile

#: Called at each evaluation with the metrics and the folder of the checkpoint just written
#: (the sweep layer hands both to Ray Tune).
Reporter = Callable[[dict[str, Any], Path], None]


# ---------------------------------------------------------------------------------------------
# Devices and numerics


@dataclass(frozen=True)
class Numerics:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool
    workers: int = 0  # DataLoader workers per loader

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def cpu_quota(quota_and_period: str) -> int | None:
    """Whole CPUs a cgroup's CPU quota grants, as cgroup v2's ``cpu.max`` writes it
    ("150000 100000": 1.5 CPUs, so 1; at least 1), or None for no limit ("max 100000"; v1's
    ``cfs_quota_us`` says -1). ValueError for anything else."""
    quota, period = [*quota_and_period.split(), "", ""][:2]
    if quota in ("max", "-1"):
        return None
    if not (quota.isdigit() and period.isdigit() and int(period) > 0):
        raise ValueError(f"not a CPU quota: {quota_and_period!r}")
    return max(1, int(quota) // int(period))


def cgroup_quotas(
    membership: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")
) -> Iterator[int | None]:
    """The CPU quota of this process's cgroup and of each one above it (v2, or v1's ``cpu``
    controller, mounted as ``cpu`` or ``cpu,cpuacct``); unreadable ones are skipped. A
    container without its own cgroup namespace sees the host's path of its group: the walk
    up reaches the container's own root."""
    try:
        lines = membership.read_text(errors="replace").splitlines()
    except OSError:  # not Linux
        return
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, group = fields
        if controllers == "":  # v2: hierarchy-id 0, no controller named
            roots, files = [mount], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            roots, files = [mount / "cpu", mount / controllers], ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        root = next((r for r in roots if r.is_dir()), None)
        if root is None:
            continue
        folder = root / group.strip().lstrip("/")
        for part in (folder, *folder.parents):
            try:
                yield cpu_quota(" ".join((part / f).read_text().strip() for f in files))
            except (OSError, ValueError):
                pass
            if part == root:
                break


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity (``taskset``, a Slurm job, a container's
    cpuset), capped by its cgroups' CPU quota (``docker --cpus``, Kubernetes limits).
    ``os.cpu_count()`` counts the host's: a local sweep on a 4-CPU job on a 64-core node
    would start 64 trials at once."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return min([cpus, *(q for q in cgroup_quotas() if q is not None)])


def numerics_for(cfg: RunConfig) -> Numerics:
    t = cfg.train
    name = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":  # asked for by name: say so in one line rather than fail in torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(
                f"train.device: '{t.device}' asked for, but this machine has {have}; use auto or cpu"
            )
        # The current device too: pinned memory, CUDA events and memory statistics otherwise
        # go to (and measure) GPU 0 in a cuda:1 run. "cuda" alone is the current device.
        if device.index is not None:
            torch.cuda.set_device(device)
    if t.amp == "auto":
        amp = torch.bfloat16 if device.type == "cuda" else None
    else:
        amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.amp]
    channels_last = t.channels_last if t.channels_last is not None else device.type == "cuda"
    # torch counts the CPUs of its affinity, not its cgroup's quota: in a container held to 2
    # CPUs on a 64-core host it would run 64 threads on 2 CPUs' time. (A sweep trial has
    # already set its share, which is smaller.)
    torch.set_num_threads(min(torch.get_num_threads(), usable_cpus()))
    workers = cfg.data.num_workers
    if workers is None:
        # A sweep trial's torch threads are its CPU share (sweep.py sets them), so packed
        # trials split the machine's cores rather than each starting 8 workers.
        workers = min(8, torch.get_num_threads()) if device.type == "cuda" else 0
    return Numerics(device, amp, channels_last, workers)


def build_method(cfg: RunConfig, num_classes: int) -> Method:
    """The run's model and method, initialised under its seed (every RNG seeded first), on
    the CPU: the trainer trains it, ``segsweep probe`` rebuilds a run's start with it."""
    seed_everything(cfg.seed)
    m = cfg.model
    head = HeadOptions(m.output_stride, m.aspp_rates, m.aspp_dropout, m.aspp_separable)
    model = build_model(
        m.arch, m.encoder, num_classes, m.encoder_weights, m.decoder_channels, head, m.weights_cache
    )
    method = get_method(cfg.method)(model, cfg.knobs(), num_classes)
    method.supervised_loss = supervised_loss_of(cfg.train)
    method.crop_size = cfg.data.crop_size
    return method


def supervised_loss_of(t: TrainConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss of labeled pixels that ``train.loss`` names (methods call it on their
    labeled logits and masks)."""
    if t.loss == "ohem":
        # min_kept counts over a step's batch; a micro-batch keeps its share of it (UniMatch:
        # 200,000 per GPU of 2 images, each GPU's loss its own)
        per_part = math.ceil(t.ohem_min_kept / t.accumulate)
        return functools.partial(ohem_cross_entropy, threshold=t.ohem_threshold, min_kept=per_part)
    return masked_cross_entropy


def micro_batches(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """``batch`` cut along its first dimension into ``parts`` batches (each key alike; the
    config makes the batch sizes multiples of ``parts``)."""
    if parts == 1:
        return [batch]
    pieces = {key: value.tensor_split(parts) for key, value in batch.items()}
    return [{key: pieces[key][i] for key in batch} for i in range(parts)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random stream a run draws from; on a GPU, only its own device's: a run resumed
    with other GPUs visible (or its GPU under another index) restores the stream it used."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # RNG states are CPU byte tensors, wherever saved
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written before: one state per visible device
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)


def to_device(batch: dict[str, Tensor], numerics: Numerics) -> dict[str, Tensor]:
    """A loader's batch on the run's device, normalised (``loaders.to_model``)."""
    return to_model(batch, numerics.device, numerics.channels_last)


# ---------------------------------------------------------------------------------------------
# Evaluation


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


# ---------------------------------------------------------------------------------------------
# Sample panels


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


# ---------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``write_atomic``: a crash never leaves a truncated checkpoint."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


@dataclass
class Timing:
    """Per-step clocks of the main loop (for ``segsweep bench``): when each step ended and
    how long it waited for its batch. Bounded, so a long run does not grow them."""

    step_end: deque = field(default_factory=lambda: deque(maxlen=100_000))
    data_wait: deque = field(default_factory=lambda: deque(maxlen=100_000))


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


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA allocation that failed, or a CPU one the kernel refused outright (a process
    that grows past the machine's memory is killed by the kernel instead: nothing to catch)."""
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return isinstance(exc, torch.OutOfMemoryError) or any(
        sign in text for sign in ("can't allocate memory", "CUDA error: out of memory")
    )


@contextmanager
def out_of_memory_said(describe: Callable[[RuntimeError], str]) -> Iterator[None]:
    """An out-of-memory error in the block becomes ``OutOfMemory(describe(exc))``: one line
    naming what to change. Anything else passes through untouched."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(describe(exc)) from exc


def allocation(exc: BaseException) -> str:
    """What an out-of-memory error asked for, e.g. "2.00 GiB more did not fit" (torch's own text
    is long, and the CPU allocator's starts with an assertion); its first line otherwise."""
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B|\d+ bytes)", str(exc))
    if asked is None:
        return first_line(exc, 160)
    size = asked.group(1)
    if size.endswith(" bytes"):
        n = int(size.split()[0])
        for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if n >= 2**power:
                size = f"{n / 2**power:.2f} {unit}"
                break
    return f"{size} more did not fit"


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class RunResult:
    status: str  # finished | diverged
    metrics: dict[str, float]
    run_dir: Path
    message: str = ""


class Trainer:
    """Trains one run of ``cfg`` on ``data``; tracking and sweep reporting are injected."""

    def __init__(self, cfg: RunConfig, data: Data, echo: Callable[[str], None] | None = None) -> None:
        """Build model, method and evaluation loaders; raises ConfigError before any run exists."""
        self.cfg, self.data = cfg, data
        self.run_dir = Path(cfg.output_dir)
        self.tracker: RunTracker | NullTracker = NullTracker()
        self.reporter: Reporter | None = None
        self.should_stop: Callable[[], bool] | None = None
        self.echo = echo or (lambda _msg: None)
        self.numerics = numerics_for(cfg)
        num_classes = data.source.num_classes
        self.method: Method = build_method(cfg, num_classes)
        model = self.method.model
        with out_of_memory_said(  # a model too big for the device: the user's choice to fix
            lambda exc: (
                f"out of memory on {self.numerics.device} placing the model ({cfg.model.arch}, "
                f"{cfg.model.encoder}; {allocation(exc)}): choose a smaller model or another device"
            )
        ):
            self.method.to(self.numerics.device)
        if self.numerics.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # Compile the encoder and decoder in place: both ``model(x)`` and the methods'
            # ``forward_features`` run through the compiled graphs.
            model.net.encoder.compile()
            model.net.decoder.compile()
        t = cfg.train
        per_part = (t.unlabeled_batch_size or t.batch_size) // t.accumulate
        if self.method.uses_unlabeled and per_part < self.method.unlabeled_per_micro_batch():
            raise ConfigError(
                f"train.accumulate: {t.accumulate} micro-batches leave {per_part} unlabeled image(s) in "
                f"each, and {cfg.method} needs {self.method.unlabeled_per_micro_batch()} (its CutMix "
                "partner comes from the same micro-batch); accumulate less"
            )
        self.stages = self.method.stages(cfg.train.steps)
        names = [s.name for s in self.stages]
        if cfg.debug.fail_at_step is not None and cfg.debug.fail_stage not in names:
            raise ConfigError(
                f"debug.fail_stage: '{cfg.debug.fail_stage}' is not a stage of {cfg.method}; "
                f"its stages: {', '.join(names)}"
            )
        self.progress = Progress()
        # This attempt's start, and what earlier attempts spent up to the checkpoint it
        # resumes from (steps redone after a resume are counted once).
        self._attempt_started, self._seconds_before = time.time(), 0.0
        self.timing = Timing()
        self.final_report: dict[str, Any] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(enabled=self.numerics.amp_dtype == torch.float16)
        e = cfg.eval
        workers = self.numerics.workers
        self.val_loader = eval_loader(data.source, data.source.val, e.batch_size, workers)
        self.tune_loader = (
            eval_loader(data.source, data.split.tune, e.batch_size, workers) if data.split.tune else None
        )
        diag = self._diagnostic_samples(e.diag_samples)
        self.diag_loader = eval_loader(data.source, diag, e.batch_size, 0) if diag else None
        # Images in a sample panel (taken from the diagnostic pass); panels tile images of
        # one size, so none for datasets of mixed sizes.
        self.panel_samples = min(e.panel_samples, len(diag)) if data.source.fixed_size else 0

    def _diagnostic_samples(self, count: int) -> list[Sample]:
        """A fixed sample of unlabeled images whose ground truth exists (never trained on)."""
        out = []
        for s in self.data.split.unlabeled:
            if len(out) == count:
                break
            if isinstance(s.mask, int) or (
                isinstance(s.mask, str) and (self.data.source.root / s.mask).is_file()
            ):
                out.append(s)
        return out

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _out_of_memory(self, exc: RuntimeError) -> str:
        """What did not fit, and the settings that size it (a user's fix, not a bug)."""
        cfg, stage = self.cfg, self.stages[self.progress.stage]
        return (
            f"out of memory on {self.numerics.device} in stage '{stage.name}' at step "
            f"{self.progress.step} ({allocation(exc)}): lower train.batch_size "
            f"({cfg.train.batch_size}), train.unlabeled_batch_size, eval.batch_size "
            f"({cfg.eval.batch_size}) or data.crop_size ({cfg.data.crop_size}); `segsweep bench` "
            "reports the peak memory of a run"
        )

    def elapsed_seconds(self) -> float:
        """Wall seconds this run has trained, over every attempt (``time/run_seconds``)."""
        return self._seconds_before + time.time() - self._attempt_started

    def save_checkpoint(self, name: str) -> Path:
        path = self.checkpoint_dir / name
        self.progress.seconds = self.elapsed_seconds()
        atomic_save(
            {
                "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scaler": self.scaler.state_dict(),
                "progress": self.progress.__dict__,
                "rng": rng_state(self.numerics.device),
                "config": public_tree(self.cfg),
                "run_id": self.tracker.run_id,
            },
            path,
        )
        return path

    def save_stage_weights(self, stage: Stage) -> Path:
        """The method's weights at the end of a stage that is not the last, kept apart as
        ``checkpoints/<stage>.pt``: ``last.pt`` moves on with the next stage, and a later run
        may start from a finished stage (e.g. ``mixandmatch.proxy_from``: a proxy trained once,
        shared by every fine-tuning run, as the paper does). Weights and config only, no
        optimizer: it is a starting point, not a resume point."""
        path = self.checkpoint_dir / f"{stage.name}.pt"
        atomic_save(
            {
                "method": self.method.state_dict(),
                "stage": stage.name,
                "config": public_tree(self.cfg),
            },
            path,
        )
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Continue from ``path`` (a ``last.pt``); a file that is not a whole checkpoint of
        this run's method and model is a one-line ``ConfigError`` naming it."""
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
            was = (
                saved.get("method"),
                (saved.get("model") or {}).get("arch"),
                (saved.get("model") or {}).get("encoder"),
            )
            now = (self.cfg.method, self.cfg.model.arch, self.cfg.model.encoder)
            if was != now:
                raise ConfigError(
                    f"{path}: a checkpoint of {'/'.join(map(str, was))}, but this run is "
                    f"{'/'.join(now)} (method/arch/encoder); resume with the config it was written with"
                )
        try:
            self.method.load_state_dict(state["method"])
            self.progress = Progress(**{**state["progress"], "resumed": True})
            self._pending_optimizer = state["optimizer"]
            self.scaler.load_state_dict(state["scaler"])
            self._pending_rng = state["rng"]
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"{path}: does not fit this run's method and model ({one_line(exc)[:200]})"
            ) from None

    # -- the loop ----------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        """Encoder at the scaled lr, everything else (decoder, method heads) at lr x mult."""
        t = self.cfg.train
        encoder = {id(p) for module in self.method.encoders() for p in module.parameters()}
        params = [p for p in self.method.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) in encoder], "lr_mult": 1.0},
            {"params": [p for p in params if id(p) not in encoder], "lr_mult": t.decoder_lr_mult},
        ]
        groups = [g for g in groups if g["params"]]
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.scaled_lr(), momentum=t.momentum, weight_decay=t.weight_decay)
        return torch.optim.AdamW(groups, lr=t.scaled_lr(), weight_decay=t.weight_decay)

    def _streams(self, stage: Stage, start: int) -> Callable[[], dict[str, Tensor]]:
        """A function returning the next batch of this stage (labeled and/or unlabeled)."""
        t, d = self.cfg.train, self.data
        workers = self.numerics.workers
        accelerator = self.numerics.device.type == "cuda"
        ub = t.unlabeled_batch_size or t.batch_size
        seed = hash_seed(self.cfg.seed, self.progress.stage)
        iters: list[Iterator[dict[str, Tensor]]] = []
        if stage.batch in ("labeled", "tags", "semi"):
            labeled = d.labeled(self.method.training_masks())
            iters.append(
                stream_loader(labeled, t.batch_size, hash_seed(seed, 1), start, workers, accelerator)
            )
        if stage.batch == "semi":
            iters.append(stream_loader(d.unlabeled(), ub, hash_seed(seed, 2), start, workers, accelerator))
        if stage.batch == "all":
            iters.append(stream_loader(d.all_images(), ub, hash_seed(seed, 3), start, workers, accelerator))

        def next_batch() -> dict[str, Tensor]:
            batch: dict[str, Tensor] = {}
            for it in iters:
                batch.update(next(it))
            if stage.batch == "tags":  # weak supervision: image-level tags only, never masks
                del batch["mask_l"]
            if not self.method.uses_strong_view:  # its parameters only; the view is never made
                batch.pop("strong_u", None)
            return to_device(batch, self.numerics)

        return next_batch

    def run(
        self,
        run_dir: Path,
        tracker: RunTracker | NullTracker | None = None,
        reporter: Reporter | None = None,
        resume_from: Path | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RunResult:
        """Train every stage (from ``resume_from``'s stage and step when given).

        ``should_stop`` is polled every step: a sweep's scheduler may stop the trial between
        two reports, and the rest of the interval is then not trained for nothing.
        """
        self.run_dir = run_dir
        # A run killed mid-save left a temporary beside its checkpoints; a sweep would copy
        # it with every checkpoint it reports. This run is the folder's only writer.
        remove_leftovers(self.checkpoint_dir)
        self.should_stop = should_stop
        self.tracker = tracker or NullTracker()
        self.reporter = reporter
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._attempt_started, self._seconds_before = time.time(), self.progress.seconds
        self.echo(
            f"run {self.tracker.run_id or '(untracked)'}: {self.cfg.method} on "
            f"{self.data.source.name}, {len(self.data.split.labeled)} labeled / "
            f"{len(self.data.split.unlabeled)} unlabeled images, device {self.numerics.device}"
        )
        with out_of_memory_said(self._out_of_memory):
            for index in range(self.progress.stage, len(self.stages)):
                if index != self.progress.stage:  # entering a new stage from the previous one
                    self.progress.stage, self.progress.step = index, 0
                    self._pending_optimizer = None  # a resumed optimizer is its own stage's only
                self._run_stage(self.stages[index], last=index == len(self.stages) - 1)
                if index < len(self.stages) - 1:
                    self.save_stage_weights(self.stages[index])
        # Built from the checkpointed progress, so a run resumed at its very end reports too.
        self.final_report = {
            **{k: v for k, v in self.progress.last.items() if "/iou/" not in k},
            **self._final_metrics(),
            "step": self.stages[-1].steps,
            "stage": self.stages[-1].name,
            "final": True,
            "mlflow_run_id": self.tracker.run_id,
        }
        return RunResult("finished", self._final_metrics(), self.run_dir)

    def _prefix(self, stage: Stage) -> str:
        return "" if stage.name == "train" else f"{stage.name}/"

    def _run_stage(self, stage: Stage, last: bool) -> None:
        cfg, t, prefix = self.cfg, self.cfg.train, self._prefix(stage)
        self.method.begin_stage(stage)
        if stage.steps == 0:  # a stage of pure computation (e.g. writing pseudo masks)
            if not self.progress.step:
                # No optimizer of its own: the previous stage's would be saved with this stage's
                # checkpoint and loaded into the next stage's (other parameters) on resume.
                self.optimizer = None
                out = self.method.run_stage(stage, self.data)
                self.progress.step = 1
                metrics = {f"{prefix}{k}": float(v) for k, v in out.items() if not isinstance(v, np.ndarray)}
                for key, image in out.items():
                    if isinstance(image, np.ndarray):
                        self.tracker.log_image(image, f"{prefix}{key}", 0)
                self.tracker.log_metrics(metrics, 0)
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                self.echo(f"  stage {stage.name}: {shown}")
                self._checkpoint_and_report(stage, metrics)
            return

        self.optimizer = self._optimizer()
        pending = getattr(self, "_pending_optimizer", None)
        if pending is not None:
            self.optimizer.load_state_dict(pending)
            self._pending_optimizer = None
        next_batch = self._streams(stage, self.progress.step)
        rng = getattr(self, "_pending_rng", None)
        if rng is not None:  # after the loaders exist: restore the exact random stream
            set_rng_state(rng, self.numerics.device)
            self._pending_rng = None
        base_lr = t.scaled_lr()
        if not self.progress.step and stage.name == self.stages[-1].name:
            self._log_start_panel()
        self.method.train()
        window: dict[str, list[float]] = {}
        tic, tic_step = time.perf_counter(), self.progress.step

        while self.progress.step < stage.steps:
            step = self.progress.step
            if self.should_stop is not None and self.should_stop():
                raise Stopped
            if cfg.debug.fail_at_step == step + 1 and cfg.debug.fail_stage == stage.name:
                self._inject_failure(step + 1)
            lr = poly_lr(base_lr, step, stage.steps, t.poly_power)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]

            waited = time.perf_counter()
            batch = next_batch()
            self.timing.data_wait.append(time.perf_counter() - waited)
            # One step's batch, in ``train.accumulate`` micro-batches: each one's loss is
            # divided by their count and back-propagated before the next runs, so the summed
            # gradient is that of the whole batch (exactly, where batch norm is frozen) and
            # only one micro-batch's activations are held at a time.
            self.optimizer.zero_grad(set_to_none=True)
            parts = micro_batches(batch, t.accumulate)
            logs = {}
            for part in parts:
                with self.numerics.autocast():
                    loss, part_logs = self.method.training_step(part, step)
                if cfg.debug.nan_at_step == step + 1 and last:
                    loss = loss * float("nan")
                    part_logs["loss"] = float("nan")
                bad = next(
                    (k for k, v in part_logs.items() if k.startswith("loss") and not math.isfinite(v)), None
                )
                if bad is not None:
                    raise Diverged(step + 1, bad, part_logs[bad])
                self.scaler.scale(loss / len(parts)).backward()
                for k, v in part_logs.items():
                    logs[k] = logs.get(k, 0.0) + v / len(parts)
            if t.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.method.parameters(), t.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.after_step(step)
            self.progress.step = step = step + 1
            self.timing.step_end.append(time.perf_counter())

            for k, v in logs.items():
                window.setdefault(k, []).append(v)
            if step % t.log_every == 0 or step == stage.steps:
                means = {f"{prefix}train/{k}": sum(v) / len(v) for k, v in window.items()}
                means[f"{prefix}lr"] = lr
                self.tracker.log_metrics(means, step)
                rate = (step - tic_step) / max(time.perf_counter() - tic, 1e-9)
                self.echo(
                    f"  {prefix}step {step}/{stage.steps}  loss {means[f'{prefix}train/loss']:.4f}"
                    f"  lr {lr:.2e}  {rate:.1f} it/s"
                )
                window = {}
            if step % t.eval_every == 0 or step == stage.steps:
                if stage.evaluate:
                    self._evaluate(stage, step)
                else:  # still checkpoint: a crash costs at most eval_every steps
                    self._checkpoint_and_report(stage, {})

    def _inject_failure(self, step: int) -> None:
        """Fault injection for retry tests: fail once per run folder, not again on the retry."""
        marker = self.run_dir / ".fault_injected"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise InjectedFailure(
            f"debug.fail_at_step: injected failure at step {step}; continue the run with "
            f"segsweep run --resume {self.run_dir}"
        )

    def _log_start_panel(self) -> None:
        """The pseudo masks before the main stage's first step, at step 0: the MLflow image
        grid's slider starts at the first logged step, and now shows where training began."""
        if (
            self.diag_loader is None
            or not self.method.uses_unlabeled
            or isinstance(self.tracker, NullTracker)
        ):
            return
        # The pass draws from the global generators (its loader): a tracked run must train
        # exactly as an untracked one, so they are put back as they were.
        state = rng_state(self.numerics.device)
        try:
            quality, held = pseudo_mask_quality(
                self.method, self.diag_loader, self.numerics, hold=self.panel_samples
            )
        finally:
            set_rng_state(state, self.numerics.device)
        self.tracker.log_metrics(quality, 0)
        if held:
            self.tracker.log_image(
                lambda: sample_panel(self.method, held, self.numerics), "panels/pseudo_masks", 0
            )

    def _evaluate(self, stage: Stage, step: int) -> None:
        """Score every eval model on val (reported) and tune (held out), log, checkpoint, report."""
        e, p, prefix = self.cfg.eval, self.progress, self._prefix(stage)
        n = self.data.source.num_classes
        names = self.data.source.class_names
        metrics: dict[str, float] = {}
        held: dict[str, Tensor] = {}  # a sample panel's images, pseudo labels and confidences
        for role, model in self.method.eval_models().items():
            suffix = f"_{role}" if role else ""
            val = evaluate(model, self.val_loader, n, self.numerics, e.mode, e.window, e.stride)
            metrics[f"{prefix}val{suffix}/mIoU"] = val["mIoU"]
            metrics[f"{prefix}val{suffix}/pixel_acc"] = val["pixel_acc"]
            for name, iou in zip(names, val["iou"], strict=True):
                metrics[f"{prefix}val{suffix}/iou/{name}"] = iou
            if self.tune_loader is not None:
                tune = evaluate(model, self.tune_loader, n, self.numerics, e.mode, e.window, e.stride)
                metrics[f"{prefix}tune{suffix}/mIoU"] = tune["mIoU"]
        if self.diag_loader is not None and self.method.uses_unlabeled and not prefix:
            quality, held = pseudo_mask_quality(
                self.method, self.diag_loader, self.numerics, hold=self.panel_samples
            )
            metrics.update(quality)

        if not prefix:  # best/last bookkeeping concerns the reported (main) stage
            val_miou = metrics["val/mIoU"]
            tune_miou = metrics.get("tune/mIoU", float("nan"))
            p.best_val = max(p.best_val, val_miou)
            is_best = not math.isnan(tune_miou) and tune_miou > p.best_tune
            if is_best:
                p.best_tune, p.val_at_best_tune = tune_miou, val_miou
            p.last = {k: v for k, v in metrics.items() if not math.isnan(v)}
            if is_best:
                self.save_checkpoint("best.pt")
        self.tracker.log_metrics(metrics, step)
        if held:  # rendered only by a tracker that keeps it
            self.tracker.log_image(
                lambda: sample_panel(self.method, held, self.numerics), "panels/pseudo_masks", step
            )
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("mIoU"))
        self.echo(f"  eval @ {prefix}step {step}: {shown}")
        self._checkpoint_and_report(stage, {**metrics, "step": step} if not prefix else metrics)

    def _checkpoint_and_report(self, stage: Stage, metrics: dict[str, float]) -> None:
        self.save_checkpoint("last.pt")
        if self.reporter is None:
            self.tracker.check()  # a failing store stops a plain run early, without waiting on it
            return
        # Everything logged so far reaches the store before the sweep may stop this trial.
        self.tracker.flush()
        report = {k: v for k, v in metrics.items() if "/iou/" not in k}
        report.update(stage=stage.name, stage_step=self.progress.step, mlflow_run_id=self.tracker.run_id)
        # The run's last report waits until its MLflow run is closed (``runner.execute``):
        # a scheduler may stop a trial at any report, and nothing after it would run.
        last = stage is self.stages[-1] and self.progress.step == stage.steps
        if not last:
            self.reporter(report, self.checkpoint_dir)

    def _final_metrics(self) -> dict[str, float]:
        """Summary values of the run: the last evaluation, and the best kept apart from it.

        ``val/mIoU_at_best_tune`` is the honest model-selection number (picked on the tuning
        split); ``val/mIoU_best`` is the best over evaluations on the reported split itself,
        which flatters, and is logged only so the two can be compared.
        """
        p = self.progress
        out = {f"{k}_last": v for k, v in p.last.items() if k.endswith("/mIoU")}
        if p.best_val > -math.inf:
            out["val/mIoU_best"] = p.best_val
        if not math.isnan(p.val_at_best_tune):
            out["val/mIoU_at_best_tune"] = p.val_at_best_tune
            out["tune/mIoU_best"] = p.best_tune
        return out
