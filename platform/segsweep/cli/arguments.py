"""``segsweep``'s argument parser: one ``add_<command>`` function per command, adding its
sub-parser and arguments (the command's function is bound by ``segsweep.cli.build_parser``),
and the argparse types they share.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

#: What ``add_subparsers`` returns: the object each ``add_<command>`` adds its parser to.
Commands = Any


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``error:`` line and exit code 2 like the rest."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Wide enough that every command name and its help share one line.
        kwargs.setdefault(
            "formatter_class",
            lambda prog: argparse.HelpFormatter(prog, max_help_position=28, width=100),
        )
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message} (see --help)\n")
        raise SystemExit(2)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return value


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound without ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: {bound}")
        return value

    return parse


class Given(argparse.Action):
    """Store the value and remember that the user gave it (``<dest>_given``)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def add_run(sub: Commands) -> Parser:
    """``segsweep run CONFIG``: train one run."""
    p = sub.add_parser(
        "run",
        help="train one run and track it in MLflow",
        description="Train one run of CONFIG (a YAML run config) and track it in MLflow.",
    )
    p.add_argument("config", nargs="?", help="run config YAML (e.g. experiments/run.yaml)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.label_ratio=0.25 (repeatable)",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def add_sweep(sub: Commands) -> Parser:
    """``segsweep sweep SPEC``: run a sweep spec."""
    p = sub.add_parser(
        "sweep",
        help="run a sweep spec through Ray Tune and Optuna",
        description="Run every cell of a sweep spec (method x label ratio x seed x ...) "
        "through Ray Tune, with an Optuna search per cell and per-cell ASHA.",
    )
    p.add_argument("spec", help="sweep spec YAML (e.g. experiments/quickstart.yaml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep of the same name (with the --set it was started with, "
        "unless others are given)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells and trials and check every config, dataset and model; start nothing "
        "(with --resume: whether it would be accepted, and how far the sweep got)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: start Ray locally)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the base run config of every trial (repeatable)",
    )
    p.add_argument("--dir", default="sweeps", help="folder of sweep state (default: ./sweeps)")
    return p


def add_curve(sub: Commands) -> Parser:
    """``segsweep curve``: label-ratio curves of an experiment."""
    p = sub.add_parser(
        "curve",
        help="label-ratio curves of an experiment (CSV + plot)",
        description="Aggregate an experiment's runs over seeds into label-ratio curves: runs.csv (one row "
        "per run), summary.csv (mean, std, n), differences.csv (each method vs the baseline) and curve.png.",
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment (a sweep's name)")
    p.add_argument(
        "--out", help="output folder (default: reports/<experiment>, or reports/<experiment>@<sweep>)"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument(
        "--value",
        choices=["last", "best_tune"],
        default="last",
        help="which value of a run: the last evaluation (default) or the one best on the tuning split; "
        "never the best on the reported split",
    )
    p.add_argument(
        "--baseline",
        action=Given,
        default="supervised",
        help="method the others are compared with (default: supervised)",
    )
    p.add_argument(
        "--sweep",
        metavar="NAME_OR_RUN_ID",
        help="only the runs of this sweep (its name or parent run id), where the experiment holds several",
    )
    p.add_argument(
        "--no-log", action="store_true", help="do not attach the outputs to the sweep's parent run"
    )
    p.set_defaults(baseline_given=False)
    return p


def add_dashboard(sub: Commands) -> Parser:
    """``segsweep dashboard``: the web dashboard."""
    p = sub.add_parser(
        "dashboard",
        help="web dashboard: curves, tables, runs, pseudo-mask panels",
        description="Serve the web dashboard over an MLflow store (local SQLite or a server).",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int_in(0, 65535), default=8050, help="port (default: 8050; 0 picks a free one)"
    )
    p.add_argument(
        "--mlflow-url",
        help="the MLflow UI to link runs to (default: the store's server for an http(s) store; unset "
        "for a local store, whose UI runs where `mlflow ui` was started, e.g. http://127.0.0.1:5000)",
    )
    return p


def add_check_data(sub: Commands) -> Parser:
    """``segsweep check-data CONFIG``: validate a dataset root and split."""
    p = sub.add_parser(
        "check-data",
        help="validate a dataset root and split before training",
        description="Read every image and mask a run of CONFIG would use (labeled, tuning, validation; "
        "unlabeled images) and report every missing, unreadable or inconsistent file.",
    )
    p.add_argument(
        "config",
        nargs="?",
        help="run config YAML (its data section is checked), or a sweep spec (every split its cells name)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--max", type=int_in(1), default=50, help="problems to list (default 50)")
    return p


def add_weights(sub: Commands) -> Parser:
    """``segsweep weights CONFIG_OR_SPEC``: fetch pretrained encoder weights."""
    p = sub.add_parser(
        "weights",
        help="download the pretrained encoder weights a config or sweep spec needs",
        description="Download the imagenet weights of every encoder with model.encoder_weights: "
        "imagenet in CONFIG (a run config, or a sweep spec: all its cells) into the hub cache, "
        "e.g. a folder a cluster's nodes share; the runs then read it with model.weights_cache.",
    )
    p.add_argument("config", metavar="CONFIG_OR_SPEC", help="run config or sweep spec YAML")
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="cache folder (Hugging Face hub layout; default: model.weights_cache, else the hub's own)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    return p


def add_bench(sub: Commands) -> Parser:
    """``segsweep bench``: the platform's overhead against a bare loop."""
    p = sub.add_parser(
        "bench",
        help="measure the platform's overhead against a bare loop (JSON + table)",
        description="Training throughput of every method next to a bare PyTorch loop, tracking and sweep "
        "overhead, data loading, FLOPs and memory; on a GPU also AMP, channels_last and compile.",
    )
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for smoke tests)")
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--no-sweep", action="store_true", help="skip the Ray sweep rows")
    p.add_argument(
        "--only",
        metavar="SECTIONS",
        help="comma-separated sections to run: step, tracking, data, flops, gpu, packing, sweep, curve "
        "(default: all; the bare loop always runs)",
    )
    p.add_argument(
        "--peak-tflops", type=positive_float, help="the device's peak, for model FLOPs utilisation"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override the benchmark's run config, e.g. --set model.encoder=resnet50",
    )
    return p


def add_probe(sub: Commands) -> Parser:
    """``segsweep probe CHECKPOINT...``: a linear probe of frozen features."""
    p = sub.add_parser(
        "probe",
        help="linear probe of checkpoints' frozen features (what a pre-training stage taught)",
        description="Freeze each CHECKPOINT's network (a run's last.pt / best.pt, or a finished stage's "
        "weights such as proxy.pt) and fit a per-pixel logistic regression on its encoder and decoder "
        "features over the run's labeled images; print its val mIoU, beside the run's initialisation.",
    )
    p.add_argument("checkpoint", nargs="+", help="checkpoint files (the first one's config gives the data)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override the first checkpoint's config for the data and device, e.g. --set seed=1, "
        "--set train.device=cpu",
    )
    p.add_argument("--pixels-per-image", type=int_in(1), default=4096, help="labelled pixels drawn per image")
    p.add_argument(
        "--iters", type=int_in(1), default=400, help="full-batch optimizer iterations (default 400)"
    )
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    return p


def add_methods(sub: Commands) -> Parser:
    """``segsweep methods``: the method list."""
    p = sub.add_parser(
        "methods", help="list the methods and their knobs", description="List the methods and their knobs."
    )
    return p


def add_datasets(sub: Commands) -> Parser:
    """``segsweep datasets``: the dataset readers."""
    p = sub.add_parser("datasets", help="list the dataset readers", description="List the dataset readers.")
    return p
