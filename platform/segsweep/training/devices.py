"""Where and how a run computes: the device, its numerics (AMP, memory format, loader
workers), the CPUs a process may use (affinity and cgroup quotas), seeding, moving batches to
the device, and out-of-memory errors said in one line."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from segsweep.data.loaders import to_model
from segsweep.errors import ConfigError, OutOfMemory, first_line

if TYPE_CHECKING:
    from segsweep.config import RunConfig


@dataclass(frozen=True)
class Numerics:
    """The device a run computes on and how: AMP dtype, memory format, loader workers."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    channels_last: bool
    workers: int = 0  # DataLoader workers per loader

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


# ---------------------------------------------------------------------------------------------
# CPUs


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
        yield from _quotas_up_from(root / group.strip().lstrip("/"), root, files)


def _quotas_up_from(folder: Path, root: Path, files: tuple[str, ...]) -> Iterator[int | None]:
    """The quota written in ``files`` of ``folder`` and of each folder above it up to ``root``."""
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


# ---------------------------------------------------------------------------------------------
# The device and its numerics


def device_of(name: str) -> torch.device:
    """The device ``train.device`` names (auto: CUDA when there is one); a CUDA device this
    machine lacks is a one-line ConfigError rather than a failure inside torch."""
    resolved = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(resolved)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(
                f"train.device: '{name}' asked for, but this machine has {have}; use auto or cpu"
            )
        # The current device too: pinned memory, CUDA events and memory statistics otherwise
        # go to (and measure) GPU 0 in a cuda:1 run. "cuda" alone is the current device.
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def numerics_for(cfg: RunConfig) -> Numerics:
    """The run's device and numerics from ``train.*`` and ``data.num_workers``; caps torch's
    threads at the CPUs this process may use."""
    t = cfg.train
    device = device_of(t.device)
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
        # A sweep trial's torch threads are its CPU share (the sweep driver sets them), so
        # packed trials split the machine's cores rather than each starting 8 workers.
        workers = min(8, torch.get_num_threads()) if device.type == "cuda" else 0
    return Numerics(device, amp, channels_last, workers)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict[str, Tensor], numerics: Numerics) -> dict[str, Tensor]:
    """A loader's batch on the run's device, normalised (``loaders.to_model``)."""
    return to_model(batch, numerics.device, numerics.channels_last)


# ---------------------------------------------------------------------------------------------
# Out of memory


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
