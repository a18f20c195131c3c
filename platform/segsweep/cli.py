"""The ``segsweep`` command line.

Every user error prints one line, ``error: <what is wrong, naming the file or field>``, and
exits with code 2; a diverged run exits 1; an interrupted one 130. Python tracebacks are
kept for bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segsweep.errors import (
    ConfigError,
    InjectedFailure,
    Interrupted,
    UserError,
    first_line,
    one_line,
    redact,
    user_message,
)
from segsweep.files import new_folder, only_writer, require_writable_file, unmake_folder, write_atomic

if TYPE_CHECKING:
    from segsweep.config import RunConfig

#: errno values meaning the machine, not segsweep, refused a file operation.
MACHINE_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


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


def _echo(quiet: bool) -> Callable[[str], None]:
    return (lambda _m: None) if quiet else (lambda m: print(m, flush=True))


# ---------------------------------------------------------------------------------------------
# segsweep run


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a scheduler's, ``timeout``'s) ends a run as Ctrl+C does, its MLflow run closed
    KILLED, rather than killing it silently and leaving the run RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:  # a handler set outside Python reads as None and cannot be put back
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _resumed_with(started: RunConfig, now: RunConfig) -> str:
    """A note naming the settings a resume changes (MLflow keeps a param's first value, so
    the run's tag ``segsweep.resumed_with`` records them too); "" when there are none."""
    from segsweep.tracking.mlflow_writer import safe_params

    was, will = safe_params(started.flat()), safe_params(now.flat())  # no secret is printed
    changed = [
        f"{k}: {was.get(k)} -> {will.get(k)}"
        for k in sorted(set(was) | set(will))
        if was.get(k) != will.get(k)
    ]
    if not changed:
        return ""
    lr = "; the learning-rate schedule follows the new train.steps from the checkpoint on" * (
        was.get("train.steps") != will.get("train.steps")
    )
    return f"note: resuming with settings changed since its last attempt: {'; '.join(changed)}{lr}"


def cmd_run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:  # the run folder's lock, once the folder is known
        return _run(args, held)


def _run(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from segsweep.config import apply_overrides, load_run_config, read_yaml, validate_run_config
    from segsweep.tracking.mlflow_writer import existing_store, uri_origin
    from segsweep.training.runner import execute, make_tracker, prepare

    sets = list(args.set or [])
    if args.tracking_uri:
        sets.append(f"tracking.uri={args.tracking_uri}")
    resume_ckpt = None
    if args.resume:
        run_dir = Path(args.resume)
        resume_ckpt = run_dir / "checkpoints" / "last.pt"
        if not resume_ckpt.is_file():
            raise ConfigError(f"{resume_ckpt}: no checkpoint to resume from")
        saved = run_dir / "config.yaml"
        source = Path(args.config) if args.config else saved
        cfg = validate_run_config(apply_overrides(read_yaml(source), sets), str(source))
        run_key = run_dir.name
        with contextlib.suppress(ConfigError):  # a config saved by an older segsweep: no note
            note = _resumed_with(validate_run_config(read_yaml(saved), str(saved)), cfg)
            if note:
                print(note, flush=True)
    else:
        if not args.config:
            raise ConfigError("segsweep run: give a CONFIG file (or --resume RUN_DIR)")
        cfg = load_run_config(Path(args.config), sets)
        run_key = uuid.uuid4().hex[:12]
        run_dir = cfg.output_dir / run_key

    # One process per run folder: a --resume while the run still trains would train and write
    # it twice.
    held.enter_context(only_writer(run_dir, "run folder"))
    echo = _echo(args.quiet)
    # Where the run will write, checked before the data and model (minutes with data.verify).
    require_writable_file(run_dir / "config.yaml", "output_dir")
    if cfg.tracking.enabled:
        named = "--tracking-uri" if args.tracking_uri else "tracking.uri"
        existing_store(cfg.tracking.uri, must_exist=False, what=uri_origin((cfg.tracking.uri, named))[1])
    prepared = prepare(cfg, echo)
    cfg = prepared.cfg  # train.epochs resolved to steps
    if resume_ckpt is not None:
        # Read and applied before its MLflow run is touched: a corrupt or foreign checkpoint
        # is a one-line error that leaves the run (and its status) as it was.
        prepared.trainer.load_checkpoint(resume_ckpt)
    tracker, made = None, None
    try:
        with sigterm_as_ctrl_c():
            with new_folder(run_dir, "output_dir") as made:  # nothing of this run stays if it fails
                tracker = make_tracker(cfg, prepared.data, run_key=run_key)
            from segsweep.config import dump_yaml

            write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
            result = execute(prepared, tracker, run_dir)  # a resumed trainer already holds its state
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.finish("KILLED", "killed")  # done already if training had begun
        if not any((run_dir / "checkpoints").glob("*.pt")):
            unmake_folder(run_dir, made)
            raise Interrupted(
                "run interrupted before its first checkpoint: nothing was kept to resume"
                + (
                    f" (MLflow run {tracker.run_id} marked KILLED)"
                    if tracker is not None and tracker.run_id
                    else ""
                )
            ) from None
        raise Interrupted(f"run interrupted; continue it with: segsweep run --resume {run_dir}") from None
    except (UserError, RuntimeError) as exc:
        # Bad input met mid-run (an unreadable image past the first): with no checkpoint yet
        # there is nothing to resume, so no folder is left to suggest otherwise. Its MLflow
        # run stays, FAILED, with the error.
        if user_message(exc) is not None and not any((run_dir / "checkpoints").glob("*.pt")):
            unmake_folder(run_dir, made)
        raise
    if result.status == "diverged":
        print(
            f"error: {result.message}; run {tracker.run_id} marked FAILED (segsweep.status=diverged)",
            file=sys.stderr,
        )
        return 1
    m = result.metrics
    print(f"done: {cfg.method} run {tracker.run_id or run_key} finished")
    for key, label in (
        ("val/mIoU_last", "val/mIoU, last evaluation"),
        ("val/mIoU_at_best_tune", "val/mIoU, checkpoint picked on the tune split"),
        ("val/mIoU_best", "val/mIoU, best evaluation (optimistic)"),
        ("val_teacher/mIoU_last", "teacher val/mIoU, last evaluation"),
    ):
        if key in m:
            print(f"  {label:<48} {m[key]:.4f}")
    print(f"  checkpoints: {run_dir / 'checkpoints'}")
    print(f"  resume: segsweep run --resume {run_dir}")
    print(f"  MLflow: {tracker.ui_hint()}")
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from segsweep.sweep.driver import run_sweep, started_sets
    from segsweep.sweep.spec import plan_sweep

    sets = list(args.set or [])
    if args.resume and not sets:  # a resume continues the sweep as it was started
        sets = started_sets(Path(args.spec), Path(args.dir)) or []
        if sets:
            print(f"note: resuming with the --set it was started with: {redact(' '.join(sets))}", flush=True)
    plan = plan_sweep(Path(args.spec), sets, tracking_uri=args.tracking_uri)
    for note in plan.notes:
        print(f"note: {note}", flush=True)
    if args.dry_run:
        from segsweep.sweep.driver import check_trials, describe_plan, resumable_state, resume_progress

        state = resumable_state(plan, Path(args.dir), args.resume)  # what the sweep would refuse
        notes = check_trials(plan, on_cluster=bool(args.ray_address or plan.spec.ray.address), download=False)
        print("\n".join(describe_plan(plan)))
        for note in notes:
            print(f"note: {note}")
        if state is not None:
            print(resume_progress(plan, state))
        print("dry run: every trial's config, dataset and model checked; nothing started or written")
        return 0

    result = run_sweep(
        plan, Path(args.dir), resume=args.resume, ray_address=args.ray_address, echo=_echo(False)
    )
    uri = redact(result.tracking_uri)  # never print a password that came inside the URI
    print(
        f"\nsweep {plan.spec.name} done: parent run {result.parent_run_id} "
        f"in MLflow experiment '{plan.experiment}'"
    )
    if uri.startswith("sqlite:///"):
        print(f"  browse:  mlflow ui --backend-store-uri {uri} --port 5000")
    # The answer where the MLflow UI shows it: counted runs tagged, the parent's description,
    # the curve as its artifacts, a saved comparison view (answer.py).
    searched = sorted({k for c in plan.cells for k in c.space})
    try:
        from segsweep.reports.answer import publish

        for line in publish(
            result.tracking_uri, plan.experiment, result.parent_run_id, searched=searched
        ).lines:
            print(line)
    except Exception as exc:  # noqa: BLE001 - the sweep is done and its runs are safe: never fail it here
        print(
            f"note: the sweep's answer was not written to MLflow ({first_line(exc)}); segsweep curve writes it"
        )
    if any(o.phase == "final" for o in result.outcomes.values()):
        print("  finals:  filter tags.`segsweep.phase` = 'final' for the seed runs")
    print(
        f"  curves:  segsweep curve --experiment {plan.experiment}"
        + (f" --tracking-uri {uri}" if args.tracking_uri else "")
    )
    storage = result.optuna_storage
    print(f"  optuna:  optuna-dashboard {redact(storage)}")
    failed = sum(o.status == "failed" for o in result.outcomes.values())
    if failed:
        print(
            f"error: {failed} trial(s) failed after their retries; their runs are FAILED in MLflow "
            "with the error as the tag segsweep.error",
            file=sys.stderr,
        )
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep curve


def cmd_curve(args: argparse.Namespace) -> int:
    from segsweep.reports import curve as report
    from segsweep.tracking.mlflow_writer import fetch_runs, log_files

    # One sweep's curve beside the experiment's, not over it.
    out = Path(args.out or Path("reports") / (args.experiment + (f"@{args.sweep}" if args.sweep else "")))
    for name in report.OUTPUT_FILES:  # all or none: checked before the first is written
        require_writable_file(out / name, "--out")
    runs = fetch_runs(args.tracking_uri, args.experiment)
    parents = report.sweep_parents(runs)
    if args.sweep:
        parent, runs = report.one_sweep(runs, args.sweep, args.experiment)
        parents = [parent]
    curve = report.build_curve(runs, args.value, args.baseline, args.experiment)
    methods = sorted({r.method for r in curve.rows})
    if methods and args.baseline not in methods and args.baseline_given:
        raise ConfigError(
            f"--baseline: no '{args.baseline}' runs in experiment '{args.experiment}'; "
            f"methods: {', '.join(methods)}"
        )
    files = report.write_outputs(curve, out, f"{args.experiment}: mIoU vs label ratio")
    print(report.format_table(curve))
    print(f"({report.RULE_TEXT[curve.rule]}; mIoU in %, mean ± std over seeds)")
    for note in curve.notes:
        print(f"note: {note}")
    if curve.differences:
        print(f"\ndifferences to {args.baseline} (95% confidence interval, t test):")
        print(report.format_differences(curve))
    if curve.published:
        print("\nreproduced minus published:")
        for s in curve.summary:
            if s.delta_vs_published is not None:
                print(
                    f"  {s.method} at {s.label_ratio:g}: {100 * s.mean:.1f} vs {100 * s.published:.1f} "
                    f"published, {s.published_backbone} ({100 * s.delta_vs_published:+.1f})"
                )
    if len(parents) > 1:
        print(
            f"note: the curve covers the {len(parents)} sweeps of experiment '{args.experiment}' "
            "(--sweep NAME_OR_RUN_ID for one)"
        )
    if parents and not args.no_log:  # the chosen sweep, or the newest
        newest = " newest" if len(parents) > 1 else ""
        if len(parents) == 1:  # one sweep's curve: its answer where MLflow shows it (answer.py)
            from segsweep.reports.answer import publish
            from segsweep.tracking.mlflow_writer import resolve_uri

            try:
                answer = publish(
                    resolve_uri(args.tracking_uri),
                    args.experiment,
                    parents[0].run_id,
                    args.value,
                    args.baseline,
                )
            except Exception as exc:  # noqa: BLE001 - the curve's files are written: say what is missing
                print(f"written: {', '.join(str(f) for f in files)}")
                print(f"error: the curve was not written to MLflow ({first_line(exc)})", file=sys.stderr)
                return 1
            print(
                f"\nlogged to the sweep's parent run {parents[0].run_id} (artifacts/curve, its description)"
            )
            for line in answer.lines:
                print(line)
        else:
            log_files(args.tracking_uri, parents[0].run_id, files, "curve")
            print(f"\nlogged to the{newest} sweep's parent run {parents[0].run_id} (artifacts/curve)")
    print("written: " + ", ".join(str(f) for f in files))
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep dashboard


def cmd_dashboard(args: argparse.Namespace) -> int:
    from segsweep.reports.dashboard import serve
    from segsweep.tracking.mlflow_writer import existing_store

    existing_store(args.tracking_uri)  # it only reads: a mistyped path must not show a new, empty store
    server = serve(args.tracking_uri, args.host, args.port, args.mlflow_url)
    host, port = server.server_address[:2]
    print(
        f"segsweep dashboard on http://{host}:{port}/  (store: {args.tracking_uri or 'sqlite:///mlflow.db'}; "
        "Ctrl+C stops it)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep check-data


def cmd_check_data(args: argparse.Namespace) -> int:
    from segsweep.config import load_run_config, read_yaml
    from segsweep.data import Data, build_data
    from segsweep.data.check import missing_files, missing_problem, verify
    from segsweep.data.splits import Split
    from segsweep.training.loop import build_method
    from segsweep.training.runner import require_images_for

    path, sets = (Path(args.config) if args.config else None), list(args.set or [])
    if path is not None and "grid" in read_yaml(path):  # a sweep spec: every split its cells name
        from segsweep.sweep.spec import plan_sweep, run_config_of

        configs = [run_config_of(cell, {}) for cell in plan_sweep(path, sets).cells]
    else:
        configs = [load_run_config(path, sets)]
    checked: dict[str, Data] = {}
    for cfg in configs:
        key = cfg.data.model_dump_json(exclude={"crop_size", "augment", "num_workers", "verify"})
        if key in checked:
            continue
        data = checked[key] = build_data(cfg.data)
        # The split must hold what the method trains on, as a run requires (its stages say what;
        # the method is built without pretrained weights, which a data check does not need).
        bare = cfg.model_copy(update={"model": cfg.model.model_copy(update={"encoder_weights": None})})
        require_images_for(cfg, data, build_method(bare, data.source.num_classes).stages(cfg.train.steps))
        s = data.split
        print(
            f"{cfg.data.name} at {data.source.root}: {len(s.labeled)} labeled, {len(s.unlabeled)} unlabeled, "
            f"{len(s.tune)} tuning, {len(data.source.val)} validation images ({s.family})"
        )
    # Every file once, whatever number of lists name it (a mask is read where any list needs it;
    # the cells of a spec share one dataset root).
    first = next(iter(checked.values()))
    with_mask, without = {}, {}
    for data in checked.values():
        for sample in data.split.labeled + data.split.tune + data.source.val:
            with_mask[sample.name] = sample
        for sample in data.split.unlabeled:
            without[sample.name] = sample
    union = Split(list(with_mask.values()), [x for k, x in without.items() if k not in with_mask], [], "")
    every = Data(first.source, union, first.aug) if len(checked) > 1 else first
    missing = missing_files(every)
    count, problems = verify(every)
    # A missing file also fails to decode: name it once, as missing.
    gone = set(missing)
    problems = list(
        dict.fromkeys(
            [missing_problem(m) for m in missing] + [p for p in problems if p.split(": ")[0] not in gone]
        )
    )
    for problem in problems[: args.max]:
        print(f"  {problem}")
    if problems:
        extra = f", first {args.max} shown" if len(problems) > args.max else ""
        print(f"error: {len(problems)} problem(s) in {count} files checked{extra}", file=sys.stderr)
        return 2
    print(f"ok: {count} files read, every image and mask decodes, masks match their images and classes")
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep weights


def cmd_weights(args: argparse.Namespace) -> int:
    import itertools

    from segsweep.config import load_run_config, read_yaml
    from segsweep.models.weights import IMAGENET, fetch

    path, sets = Path(args.config), list(args.set or [])
    if "grid" in read_yaml(path):  # a sweep spec: every cell, every searched model.* value
        from segsweep.sweep.spec import plan_sweep, run_config_of

        configs = []
        for cell in plan_sweep(path, sets).cells:
            space = {k: p.corner_values() for k, p in cell.space.items() if k.startswith("model.")}
            for combo in itertools.product(*space.values()):
                configs.append(run_config_of(cell, dict(zip(space, combo, strict=True))))
    else:
        configs = [load_run_config(path, sets)]
    wanted: dict[Path | None, list[str]] = {}  # cache folder -> encoders, in the configs' order
    for cfg in configs:
        if cfg.model.encoder_weights == IMAGENET:
            cache = Path(args.cache) if args.cache else cfg.model.weights_cache
            names = wanted.setdefault(cache, [])
            names += [cfg.model.encoder] * (cfg.model.encoder not in names)
    if not wanted:
        print(f"nothing to fetch: no model.encoder_weights: {IMAGENET} in {path}")
        return 0
    for cache, names in wanted.items():
        if cache is not None:  # a folder that cannot be written: named now, not per encoder
            require_writable_file(cache / ".segsweep-weights", "--cache")
        print(f"fetching the {IMAGENET} weights of {len(names)} encoder(s)", flush=True)
        fetch(names, cache, _echo(False))
    if args.cache:
        print(f"done: set model.weights_cache: {args.cache} where the runs read them")
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep bench


def cmd_bench(args: argparse.Namespace) -> int:
    from segsweep.bench.suite import Report, base_config, check_sections, format_table, run_bench
    from segsweep.config import parse_override, validate_run_config

    overrides = {".".join(k): v for k, v in (parse_override(s) for s in args.set or [])}
    only = set(args.only.split(",")) if args.only else None
    check_sections(only)
    validate_run_config(base_config(args.quick, args.device, overrides), "bench")  # --set, up front
    methods = args.methods.split(",") if args.methods else None
    if methods:
        from segsweep.methods import get_method

        for name in methods:
            get_method(name)
    out = Path(args.json) if args.json else None
    if out is not None:  # before minutes of measuring, not after
        require_writable_file(out, "--json")

    def save(report: Report) -> None:  # after each section: a bench cut short keeps its rows
        if out is not None:
            write_atomic(out, report.to_json())

    print("segsweep bench: measuring (this takes a few minutes on a CPU)...", flush=True)
    report = run_bench(
        quick=args.quick,
        methods=methods,
        device=args.device,
        sweep=not args.no_sweep,
        peak_tflops=args.peak_tflops,
        echo=_echo(False),
        overrides=overrides,
        only=only,
        on_section=save,
    )
    print(format_table(report))
    if out is not None:
        print(f"written: {out}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import json

    from segsweep.training.probe import ProbeSettings, probe_checkpoints

    settings = ProbeSettings(pixels_per_image=args.pixels_per_image, iters=args.iters)
    if args.json:  # before the fitting, not after
        require_writable_file(Path(args.json), "--json")
    report = probe_checkpoints(
        [Path(c) for c in args.checkpoint], list(args.set or []), settings, echo=_echo(False)
    )
    print(
        f"linear probe on frozen features, fit on {report['labeled_images']} labeled images "
        f"({report['dataset']}, seed {report['seed']}, label_ratio {report['label_ratio']}), "
        f"val mIoU on {report['val_images']} images:"
    )
    width = max(len(r["name"]) for r in report["rows"])
    for r in report["rows"]:
        print(f"  {r['name']:<{width}}  {r['method']:<12} {r['at']:<18} {100 * r['val_mIoU']:6.1f}")
    if args.json:
        write_atomic(Path(args.json), json.dumps(report, indent=2))
        print(f"written: {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# listings


def cmd_methods(_args: argparse.Namespace) -> int:
    from segsweep.methods import METHODS

    for name, cls in METHODS.items():
        knobs = ", ".join(cls.Knobs.model_fields) or "-"
        print(f"{name:<12} {cls.summary}\n{'':<12} knobs: {knobs}")
    return 0


def cmd_datasets(_args: argparse.Namespace) -> int:
    from segsweep.data import DATASETS

    for name, (summary, _) in DATASETS.items():
        print(f"{name:<12} {summary}")
    return 0


# ---------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return value


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
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


class _Given(argparse.Action):
    """Store the value and remember that the user gave it (``<dest>_given``)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def build_parser() -> Parser:
    parser = Parser(prog="segsweep", description="Label-efficient semantic segmentation sweeps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

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
    p.set_defaults(func=cmd_run)

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
    p.set_defaults(func=cmd_sweep)

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
        action=_Given,
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
    p.set_defaults(func=cmd_curve, baseline_given=False)

    p = sub.add_parser(
        "dashboard",
        help="web dashboard: curves, tables, runs, pseudo-mask panels",
        description="Serve the web dashboard over an MLflow store (local SQLite or a server).",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=_int_in(0, 65535), default=8050, help="port (default: 8050; 0 picks a free one)"
    )
    p.add_argument(
        "--mlflow-url",
        help="the MLflow UI to link runs to (default: the store's server for an http(s) store; unset "
        "for a local store, whose UI runs where `mlflow ui` was started, e.g. http://127.0.0.1:5000)",
    )
    p.set_defaults(func=cmd_dashboard)

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
    p.add_argument("--max", type=_int_in(1), default=50, help="problems to list (default 50)")
    p.set_defaults(func=cmd_check_data)

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
    p.set_defaults(func=cmd_weights)

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
        "--peak-tflops", type=_positive_float, help="the device's peak, for model FLOPs utilisation"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override the benchmark's run config, e.g. --set model.encoder=resnet50",
    )
    p.set_defaults(func=cmd_bench)

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
    p.add_argument(
        "--pixels-per-image", type=_int_in(1), default=4096, help="labelled pixels drawn per image"
    )
    p.add_argument(
        "--iters", type=_int_in(1), default=400, help="full-batch optimizer iterations (default 400)"
    )
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "methods", help="list the methods and their knobs", description="List the methods and their knobs."
    )
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("datasets", help="list the dataset readers", description="List the dataset readers.")
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:  # a message may quote a URI: its password never reaches the terminal
        print(f"error: {redact(one_line(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except InjectedFailure as exc:  # asked for by the user: their crash, not our bug
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a DataLoader worker's re-raised DataError: still one line
        message = user_message(exc)
        if message is None:
            raise
        print(f"error: {redact(message)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine refused a file (disk full, permissions, a read-only mount) where no
        # check before the work could foresee it: one line naming it. Any other OSError (a
        # wrong path of ours) is a bug and keeps its traceback.
        if exc.filename is None or exc.errno not in MACHINE_REFUSALS:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
