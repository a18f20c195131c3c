"""GPU cost of the published protocols: 50 training steps of a published spec's cell on
generated images of the real sizes, timed, with the peak GPU memory and one evaluation image.

    python .device/protocol_costs.py experiments/voc_classic.yaml fixmatch /tmp/voc --out $OUT

Appends one row to ``OUT/gpu-costs.csv`` (the columns of platform/segsweep/reference/
gpu_costs.csv) and prints images per second, peak memory and the hours a full trial would
take (its planned steps and evaluations). Random encoder weights: the device reaches no hub,
and the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import time
from pathlib import Path

import torch

from segsweep.primitives import poly_lr
from segsweep.sweep.spec import plan_sweep, run_config_of
from segsweep.training.budget import planned_steps
from segsweep.training.evaluation import evaluate
from segsweep.training.loop import micro_batches
from segsweep.training.runner import prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec", type=Path)
    parser.add_argument("method")
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], help="more overrides (a CPU smoke test)")
    args = parser.parse_args()

    sets = [f"data.root={args.root}", "model.encoder_weights=null", f"train.accumulate={args.accumulate}"]
    sets += args.set
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plan = plan_sweep(args.spec, sets)
    cell = next(c for c in plan.cells if c.method == args.method)
    cfg = run_config_of(cell, {})
    full_steps = planned_steps(cfg)
    prepared = prepare(cfg)
    trainer, cfg = prepared.trainer, prepared.cfg
    method, t = trainer.method, cfg.train
    stage = trainer.stages[-1]
    optimizer = trainer._optimizer()
    next_batch = trainer._streams(stage, 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    method.train()
    warmup, times = 5, []
    for step in range(args.steps + warmup):
        sync()
        tic = time.perf_counter()
        batch = next_batch()
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(t.scaled_lr(), step, full_steps, t.poly_power) * group["lr_mult"]
        optimizer.zero_grad(set_to_none=True)
        for part in micro_batches(batch, t.accumulate):
            with trainer.numerics.autocast():
                loss, _ = method.training_step(part, step)
            (loss / t.accumulate).backward()
        optimizer.step()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - tic)
    per_step = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    images = t.batch_size + (t.unlabeled_batch_size or t.batch_size if method.uses_unlabeled else 0)

    # One evaluation image, timed, as the spec evaluates (whole or sliding window).
    from segsweep.data.loaders import eval_loader

    e = cfg.eval
    loader = eval_loader(prepared.data.source, prepared.data.source.val[:4], 1, 0)
    tic = time.perf_counter()
    evaluate(
        method.model, loader, prepared.data.source.num_classes, trainer.numerics, e.mode, e.window, e.stride
    )
    sync()
    per_image = (time.perf_counter() - tic) / 4
    evals = math.ceil(full_steps / t.eval_every)
    val_images = len(prepared.data.source.val)
    hours = (full_steps * per_step + evals * val_images * per_image) / 3600
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    print(
        f"{args.spec.name} {args.method} {cfg.model.encoder} crop {cfg.data.crop_size} accumulate {t.accumulate}: "
        f"{images / per_step:.1f} img/s ({per_step:.3f} s/step, median of {args.steps}), peak {peak:.1f} GiB "
        f"of {memory:.0f}; eval {per_image:.2f} s/image ({e.mode}); a full trial: {full_steps:,} steps + "
        f"{evals} evaluations of {val_images} images = {hours:.1f} h"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "gpu-costs.csv"
    new = not out.exists()
    with out.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(
                ["arch", "encoder", "crop", "method", "labeled", "unlabeled", "accumulate", "gpu",
                 "gpu_memory_gib", "peak_gib", "seconds_per_step", "date", "source"]
            )  # fmt: skip
        w.writerow(
            [cfg.model.arch, cfg.model.encoder, cfg.data.crop_size, args.method, t.batch_size,
             (t.unlabeled_batch_size or t.batch_size) if method.uses_unlabeled else 0, t.accumulate, gpu,
             f"{memory:.1f}", f"{peak:.2f}", f"{per_step:.4f}", datetime.date.today().isoformat(),
             f".device/protocol_costs.py {args.spec} {args.method}: median of {args.steps} steps, "
             f"eval {per_image:.2f} s/image, full trial {hours:.1f} h"]
        )  # fmt: skip


if __name__ == "__main__":
    main()
