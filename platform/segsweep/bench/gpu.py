"""The ``gpu`` and ``packing`` sections (CUDA only): AMP, channels_last and compile switched one
at a time, the cost of reading the loss back every step, and several trials sharing one GPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segsweep.bench.measure import bare_run, trainer_run
from segsweep.bench.report import Report, Row, check, median, overhead, speedup
from segsweep.config import RunConfig, validate_run_config
from segsweep.tracking.protocol import NullTracker
from segsweep.training.devices import usable_cpus
from segsweep.training.runner import prepare


def gpu_rows(
    report: Report, tree: dict[str, Any], measure: int, echo: Callable[[str], None], rounds: int = 3
) -> None:
    """Each switch against full precision, ``rounds`` interleaved rounds, median of each (one
    H200 run of the same setting swung by 35% at the quickstart size, more than the effects
    measured). The same seed and data for all, so the validation mIoU after the run (in each
    row's note) shows a switch that breaks training."""
    images = tree["train"]["batch_size"]
    settings = {
        "gpu/fp32": {"amp": "off", "channels_last": False, "compile": False},
        "gpu/bf16": {"amp": "bf16", "channels_last": False, "compile": False},
        "gpu/channels_last": {"amp": "off", "channels_last": True, "compile": False},
        "gpu/bf16+channels_last": {"amp": "bf16", "channels_last": True, "compile": False},
        "gpu/compile": {"amp": "bf16", "channels_last": True, "compile": True},
    }
    rates: dict[str, list[float]] = {name: [] for name in settings}
    mious: dict[str, float] = {}
    for round_ in range(rounds):
        for name, train in settings.items():
            t = {**tree, "train": {**tree["train"], **train}}
            seconds, _, metrics = trainer_run(validate_run_config(t, "bench"), measure)
            rates[name].append(images / seconds)
            # as it goes: a bench cut short by a time limit keeps these lines at least
            echo(f"    round {round_ + 1}/{rounds} {name}: {images / seconds:.1f} img/s")
            mious[name] = metrics.get("val/mIoU_last", float("nan"))  # the last round's
    fp32 = median(rates["gpu/fp32"])
    for name in settings:
        value = median(rates[name])
        note = f"median of {rounds}; val mIoU after the run {mious[name]:.3f}"
        if name == "gpu/fp32":
            report.add(Row(name, value, "img/s", note=note))
        else:
            note += f" (fp32 {mious['gpu/fp32']:.3f})"
            report.add(Row(name, value, "img/s", fp32, speedup(value, fp32), note=note))
        echo(f"  {name}: {value:.1f} img/s ({speedup(value, fp32):.2f}x fp32; {note})")


def readback_row(
    report: Report, cfg: RunConfig, steps: int, measure: int, echo: Callable[[str], None], rounds: int = 3
) -> None:
    """What reading the loss back every step costs a GPU (the method contract's float logs make
    the trainer do it): the bare loop with a per-step read against one that never waits,
    ``rounds`` alternating pairs, the median of the pairs' overheads. Measured to decide
    whether the contract should hand back tensors and the trainer read them once per log
    interval (as nanoGPT does)."""
    pairs = []
    for _ in range(rounds):
        synced, _ = bare_run(cfg, steps, measure, readback=True)
        free, _ = bare_run(cfg, steps, measure, readback=False)
        pairs.append((synced, free))
    cost = median([overhead(a, b) for a, b in pairs])
    free = median([b for _, b in pairs])
    report.add(
        Row(
            "gpu/readback_per_step",
            cost,
            "fraction",
            free,
            1 + cost,
            note=f"bare loop reading its loss back every step against never; median of {rounds} pairs",
        )
    )
    echo(f"  reading the loss back every step: {100 * cost:+.1f}% per step")


def packing_row(report: Report, tree: dict[str, Any], measure: int, echo: Callable[[str], None]) -> None:
    """Several quickstart-size trials on one GPU (fractional GPUs) against one alone."""
    alone, _ = _packed_rate(tree, measure, 1)
    packed, common = _packed_rate(tree, measure, 4)
    span = "over the span all four trained at once" if common else "summed (the trials never overlapped)"
    report.add(
        Row(
            "gpu/packing",
            packed / alone,
            "x aggregate",
            alone,
            packed / alone,
            ">= 2",
            check(packed / alone, 2.0, below=False),
            f"4 trials on one GPU vs 1, aggregate img/s {span}; each with its share of the CPU "
            "threads and loader workers, as a sweep trial",
        )
    )
    echo(f"  gpu/packing: 4 trials {packed:.0f} img/s vs 1 alone {alone:.0f} img/s ({packed / alone:.2f}x)")


def _trial_steps(tree: dict[str, Any], threads: int, start: Any, queue: Any) -> None:
    """One packed trial: its share of the CPU threads (a sweep trial gets ``cpus_per_trial``,
    and its loader workers follow the threads), built, then trained once all are built."""
    torch.set_num_threads(threads)
    prepared = prepare(validate_run_config(tree, "bench"))
    start.wait()
    with tempfile.TemporaryDirectory() as tmp:
        prepared.trainer.run(Path(tmp), NullTracker())
    queue.put(prepared.trainer.timing.step_end)


def _packed_rate(tree: dict[str, Any], measure: int, trials: int) -> tuple[float, bool]:
    """Aggregate img/s of ``trials`` processes training at once on the same GPU, and whether
    it was measured over a span they all shared (``overlap_rate``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(trials)
    threads = max(1, usable_cpus() // trials)
    procs = [ctx.Process(target=_trial_steps, args=(tree, threads, start, queue)) for _ in range(trials)]
    for p in procs:
        p.start()
    ends = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return overlap_rate(ends, tree["train"]["batch_size"], max(0, len(ends[0]) - measure - 1))


def overlap_rate(step_ends: list[list[float]], images_per_step: int, skip: int) -> tuple[float, bool]:
    """Aggregate images/s of concurrent trials from their step end times (one monotonic clock,
    shared by the processes of a machine): the steps every trial ended in the span where all
    were past their first ``skip`` steps and none had finished, over that span. A rate summed
    from each trial's own window would count a trial's tail, run alone, as packed. Where the
    trials never overlapped, the sum of their own rates, and False."""
    lo = max(ends[skip] for ends in step_ends)
    hi = min(ends[-1] for ends in step_ends)
    if hi > lo:
        steps = sum(sum(lo < t <= hi for t in ends) for ends in step_ends)
        return steps * images_per_step / (hi - lo), True
    rates = [(len(e) - 1 - skip) * images_per_step / max(e[-1] - e[skip], 1e-9) for e in step_ends]
    return sum(rates), False
