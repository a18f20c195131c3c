"""``segsweep run``'s use case: one run from a config file (or a run folder to resume) to its
summary, with the run folder locked, SIGTERM read as Ctrl+C and nothing left behind by a run
that ends before its first checkpoint.

The command line (``segsweep.cli``) turns its arguments into a ``RunRequest``, calls
``run_once`` and prints the ``RunOutcome``; everything between is here.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from segsweep.errors import ConfigError, Interrupted, UserError, user_message
from segsweep.files import new_folder, only_writer, require_writable_file, unmake_folder, write_atomic

if TYPE_CHECKING:
    from segsweep.config import RunConfig
    from segsweep.training.loop import RunResult
    from segsweep.training.runner import Prepared


@dataclass(frozen=True)
class RunRequest:
    """What a user asked ``segsweep run`` for: a run config file (None with ``resume``: the
    run folder's own), ``--set`` overrides, ``--tracking-uri``, and the run folder to resume."""

    config: Path | None
    sets: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    resume: Path | None = None


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended (finished or diverged), with what its summary names."""

    cfg: RunConfig
    result: RunResult
    run_id: str | None  # the MLflow run's id (None when tracking is off)
    run_key: str  # the run folder's name
    run_dir: Path
    ui_hint: str  # where to browse the run in MLflow


def _say(message: str) -> None:
    print(message, flush=True)


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


def resumed_with(started: RunConfig, now: RunConfig) -> str:
    """A note naming the settings a resume changes (MLflow keeps a param's first value, so
    the run's tag ``segsweep.resumed_with`` records them too); "" when there are none."""
    from segsweep.tracking.uris import safe_params

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


@dataclass(frozen=True)
class _Target:
    """The validated config of a request, the run folder it writes and its name, and the
    checkpoint a resume starts from."""

    cfg: RunConfig
    run_dir: Path
    run_key: str
    resume_ckpt: Path | None


def _target_of(request: RunRequest, say: Callable[[str], None]) -> _Target:
    """A new run's config and fresh folder, or a resumed run's folder and checkpoint (with a
    note naming the settings changed since it started)."""
    from segsweep.config import apply_overrides, load_run_config, read_yaml, validate_run_config

    sets = list(request.sets)
    if request.tracking_uri:
        sets.append(f"tracking.uri={request.tracking_uri}")
    if request.resume is None:
        if request.config is None:
            raise ConfigError("segsweep run: give a CONFIG file (or --resume RUN_DIR)")
        cfg = load_run_config(request.config, sets)
        run_key = uuid.uuid4().hex[:12]
        return _Target(cfg, cfg.output_dir / run_key, run_key, None)
    run_dir = request.resume
    resume_ckpt = run_dir / "checkpoints" / "last.pt"
    if not resume_ckpt.is_file():
        raise ConfigError(f"{resume_ckpt}: no checkpoint to resume from")
    saved = run_dir / "config.yaml"
    source = request.config or saved
    cfg = validate_run_config(apply_overrides(read_yaml(source), sets), str(source))
    with contextlib.suppress(ConfigError):  # a config saved by an older segsweep: no note
        note = resumed_with(validate_run_config(read_yaml(saved), str(saved)), cfg)
        if note:
            say(note)
    return _Target(cfg, run_dir, run_dir.name, resume_ckpt)


def run_once(
    request: RunRequest, echo: Callable[[str], None], say: Callable[[str], None] = _say
) -> RunOutcome:
    """Check, train and close one run of ``request``; ``echo`` hears the training's progress,
    ``say`` the notes a user always sees. Bad input is a UserError before anything is made;
    an interrupt is ``Interrupted``, naming how to resume (or that nothing was kept)."""
    from segsweep.tracking.store import existing_store
    from segsweep.tracking.uris import uri_origin
    from segsweep.training.runner import prepare

    target = _target_of(request, say)
    cfg, run_dir = target.cfg, target.run_dir
    with contextlib.ExitStack() as held:
        # One process per run folder: a --resume while the run still trains would train and
        # write it twice.
        held.enter_context(only_writer(run_dir, "run folder"))
        # Where the run will write, checked before the data and model (minutes with data.verify).
        require_writable_file(run_dir / "config.yaml", "output_dir")
        if cfg.tracking.enabled:
            named = "--tracking-uri" if request.tracking_uri else "tracking.uri"
            existing_store(cfg.tracking.uri, must_exist=False, what=uri_origin((cfg.tracking.uri, named))[1])
        prepared = prepare(cfg, echo)
        if target.resume_ckpt is not None:
            # Read and applied before its MLflow run is touched: a corrupt or foreign checkpoint
            # is a one-line error that leaves the run (and its status) as it was.
            prepared.trainer.load_checkpoint(target.resume_ckpt)
        return _train(prepared, target)


def _train(prepared: Prepared, target: _Target) -> RunOutcome:
    """Open the run's MLflow run and folder, train, and close both whatever happens: a run
    ended before its first checkpoint leaves no folder (its MLflow run stays, KILLED or
    FAILED)."""
    from segsweep.config import dump_yaml
    from segsweep.training.runner import execute, make_tracker

    cfg, run_dir = prepared.cfg, target.run_dir  # train.epochs resolved to steps
    tracker, made = None, None
    try:
        with sigterm_as_ctrl_c():
            with new_folder(run_dir, "output_dir") as made:  # nothing of this run stays if it fails
                tracker = make_tracker(cfg, prepared.data, run_key=target.run_key)
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
    return RunOutcome(cfg, result, tracker.run_id, target.run_key, run_dir, tracker.ui_hint())
