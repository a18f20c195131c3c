"""What each ``segsweep`` command does once its arguments are parsed: one ``cmd_<name>``
function per command, taking the argparse namespace and returning the exit code. Each imports
what it needs when it runs, so ``segsweep --help`` (and a command) loads only its own layer:
the bench in particular stays out of every other command's imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from segsweep.errors import ConfigError, first_line, redact
from segsweep.files import require_writable_file, write_atomic


def echo_of(quiet: bool) -> Callable[[str], None]:
    """Progress lines, printed as they come (nothing with ``quiet``)."""
    return (lambda _m: None) if quiet else (lambda m: print(m, flush=True))


# ---------------------------------------------------------------------------------------------
# segsweep run


def cmd_run(args: argparse.Namespace) -> int:
    """Train one run (``training.one_run``) and print its summary."""
    from segsweep.training.one_run import RunRequest, run_once

    request = RunRequest(
        Path(args.config) if args.config else None,
        list(args.set or []),
        args.tracking_uri,
        Path(args.resume) if args.resume else None,
    )
    outcome = run_once(request, echo_of(args.quiet))
    if outcome.result.status == "diverged":
        print(
            f"error: {outcome.result.message}; run {outcome.run_id} marked FAILED (segsweep.status=diverged)",
            file=sys.stderr,
        )
        return 1
    m = outcome.result.metrics
    print(f"done: {outcome.cfg.method} run {outcome.run_id or outcome.run_key} finished")
    for key, label in (
        ("val/mIoU_last", "val/mIoU, last evaluation"),
        ("val/mIoU_at_best_tune", "val/mIoU, checkpoint picked on the tune split"),
        ("val/mIoU_best", "val/mIoU, best evaluation (optimistic)"),
        ("val_teacher/mIoU_last", "teacher val/mIoU, last evaluation"),
    ):
        if key in m:
            print(f"  {label:<48} {m[key]:.4f}")
    print(f"  checkpoints: {outcome.run_dir / 'checkpoints'}")
    print(f"  resume: segsweep run --resume {outcome.run_dir}")
    print(f"  MLflow: {outcome.ui_hint}")
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep sweep


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this sweep where it stopped (said if its Ray head is lost)."""
    from segsweep.sweep.head_watch import resume_command

    again = ["sweep", args.spec, *(["--dir", args.dir] if args.dir != "sweeps" else [])]
    for flag, value in (("--ray-address", args.ray_address), ("--tracking-uri", args.tracking_uri)):
        again += [flag, value] if value else []
    return resume_command(again)


def cmd_sweep(args: argparse.Namespace) -> int:
    from segsweep.sweep.driver import run_sweep
    from segsweep.sweep.spec import plan_sweep
    from segsweep.sweep.state import started_sets

    sets = list(args.set or [])
    if args.resume and not sets:  # a resume continues the sweep as it was started
        sets = started_sets(Path(args.spec), Path(args.dir)) or []
        if sets:
            print(f"note: resuming with the --set it was started with: {redact(' '.join(sets))}", flush=True)
    plan = plan_sweep(Path(args.spec), sets, tracking_uri=args.tracking_uri)
    for note in plan.notes:
        print(f"note: {note}", flush=True)
    if args.dry_run:
        from segsweep.data import DataCache
        from segsweep.sweep.dry_run import check_trials, describe_plan
        from segsweep.sweep.state import resumable_state, resume_progress

        state = resumable_state(plan, Path(args.dir), args.resume)  # what the sweep would refuse
        data = DataCache()  # each dataset and split read once, for both
        on_cluster = bool(args.ray_address or plan.spec.ray.address)
        notes = check_trials(plan, on_cluster=on_cluster, download=False, data=data)
        print("\n".join(describe_plan(plan, data)))
        for note in notes:
            print(f"note: {note}")
        if state is not None:
            print(resume_progress(plan, state))
        print("dry run: every trial's config, dataset and model checked; nothing started or written")
        return 0

    result = run_sweep(
        plan,
        Path(args.dir),
        resume=args.resume,
        ray_address=args.ray_address,
        echo=echo_of(False),
        continue_with=_resume_command(args),
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
    from segsweep.tracking.store import fetch_runs, log_files

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
            from segsweep.tracking.uris import resolve_uri

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
    from segsweep.tracking.store import existing_store

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
        fetch(names, cache, echo_of(False))
    if args.cache:
        print(f"done: set model.weights_cache: {args.cache} where the runs read them")
    return 0


# ---------------------------------------------------------------------------------------------
# segsweep bench


def cmd_bench(args: argparse.Namespace) -> int:
    from segsweep.bench.report import Report, base_config, check_sections, format_table
    from segsweep.bench.suite import run_bench
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
        echo=echo_of(False),
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
        [Path(c) for c in args.checkpoint], list(args.set or []), settings, echo=echo_of(False)
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
