"""A sweep's state on disk (``sweeps/<name>/sweep.json``) and what ``--resume`` makes of it.

``sweep.json`` records the sweep's format version, its fingerprint (what defines its trials),
its instance, its parent run, and how it was started (``--set``, working folder, each cell's
settings), so that a resume runs the same trials or says in one line what would differ. A
folder of another format (an earlier segsweep's) is refused before anything else: Ray's
pickled experiment state in it names modules this version no longer has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segsweep.errors import ConfigError, UserError, one_line, redact
from segsweep.files import write_atomic
from segsweep.sweep.spec import Plan, load_spec
from segsweep.tracking.retries import with_retries
from segsweep.tracking.store import existing_store, runs_tagged
from segsweep.tracking.tags import TAG_PARENT, TAG_PHASE, TAG_STATUS

#: The version of ``sweep.json`` and of the sweep folder's layout (Ray's pickles included).
FORMAT = 1


def read_state(state_file: Path) -> dict[str, Any]:
    """A sweep's ``sweep.json``, or a one-line error naming it: edited or damaged by hand, or
    made by another segsweep version."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{state_file}: unreadable sweep state ({one_line(exc)[:120]})") from None
    if not isinstance(state, dict) or not {"format", "fingerprint"} & state.keys():
        raise ConfigError(f"{state_file}: not a segsweep sweep state (expected its JSON object)")
    made = state.get("format")
    if made != FORMAT:
        later = isinstance(made, int) and not isinstance(made, bool) and made > FORMAT
        raise ConfigError(
            f"{state_file}: made by {'a later' if later else 'an earlier'} segsweep version; "
            "start a new sweep (--dir) or use the version that made it"
        )
    if not isinstance(state.get("fingerprint"), str) or not isinstance(state.get("instance"), str):
        raise ConfigError(f"{state_file}: not a segsweep sweep state (expected its JSON object)")
    return state


def write_state(
    state_file: Path, plan: Plan, instance: str, key_prefix: str, parent_run_id: str, uri: str
) -> None:
    """Record the sweep as started (again on every resume): a resume reuses its --set and
    names what differs."""
    state = {
        "format": FORMAT,
        "fingerprint": plan.fingerprint(),
        "instance": instance,
        "study_prefix": key_prefix,
        "parent_run_id": parent_run_id,
        "tracking_uri": redact(uri),  # where its runs are, as told to the user
        "experiment": plan.experiment,
        "sets": plan.sets,
        "cwd": plan.cwd,
        "trials": plan.trial_settings(),
    }
    # The --set as given, which a resume reuses: a password stays in it.
    write_atomic(state_file, json.dumps(state, indent=2), private=True)


def started_sets(spec_path: Path, sweep_root: Path) -> list[str] | None:
    """The ``--set`` a sweep was started with, for a resume that gives none (None when there
    is no such sweep yet)."""
    state_file = (sweep_root / load_spec(spec_path)[0].name).resolve() / "sweep.json"
    if not state_file.exists():
        return None
    return [str(s) for s in read_state(state_file).get("sets") or []]


def resumable_state(plan: Plan, sweep_root: Path, resume: bool) -> dict[str, Any] | None:
    """The state of the sweep a ``--resume`` continues (None for a new sweep), or a one-line
    error: a sweep of another version, one that exists but is not resumed, none to resume,
    other trials."""
    sweep_dir = (sweep_root / plan.spec.name).resolve()
    state_file = sweep_dir / "sweep.json"
    if not state_file.exists():
        if resume:
            raise ConfigError(f"--resume: no sweep '{plan.spec.name}' in {sweep_root} to resume")
        return None
    state = read_state(state_file)
    if not resume:
        raise ConfigError(
            f"sweep '{plan.spec.name}' already exists in {sweep_dir}: add --resume to continue it, "
            "or give the spec another name"
        )
    if state["fingerprint"] != plan.fingerprint():
        raise ConfigError(f"{sweep_dir}: {why_not_the_same(state, plan)}")
    return state


def why_not_the_same(state: dict[str, Any], plan: Plan) -> str:
    """What a resume would change in the sweep's trials, and the likeliest cause."""
    was, now = state.get("trials") or {}, plan.trial_settings()
    added, removed = [c for c in now if c not in was], [c for c in was if c not in now]
    if added or removed:
        change = "; ".join(
            f"{what} {', '.join(cells[:3])}{f' and {len(cells) - 3} more' if len(cells) > 3 else ''}"
            for what, cells in (("added", added), ("removed", removed))
            if cells
        )
        return (
            f"this resume would change its cells ({change}); a resumed sweep runs the same cells "
            "(or give the sweep a new name)"
        )
    changed = _changed_settings(was, now)
    shown = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(changed.items())[:3])
    shown += f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return f"this resume would change its trials ({shown}); {_likeliest_cause(state, plan, changed)}"


def _changed_settings(
    was: dict[str, dict[str, str]], now: dict[str, dict[str, str]]
) -> dict[str, tuple[str, str]]:
    """Each setting that differs in some cell, with its first cell's values then and now."""
    changed: dict[str, tuple[str, str]] = {}
    for cell, settings in now.items():
        for key in sorted(set(settings) | set(was[cell])):
            before, after = was[cell].get(key, "unset"), settings.get(key, "unset")
            if before != after:
                changed.setdefault(key, (before, after))
    return changed


def _likeliest_cause(state: dict[str, Any], plan: Plan, changed: dict[str, tuple[str, str]]) -> str:
    sets = state.get("sets") or []
    started_in = state.get("cwd")
    if started_in and started_in != plan.cwd and any(started_in in a for a, _ in changed.values()):
        return f"it was started in {started_in}, where relative paths resolve: resume it from there"
    if "tracking.uri" in changed:
        uri = redact(str(state.get("tracking_uri") or changed["tracking.uri"][0].strip('"')))
        return f"its runs are in {uri}: resume with --tracking-uri {uri}"
    if sorted(sets) != sorted(plan.sets):
        given = " ".join(f"--set {s}" for s in sets) or "no --set"
        return f"it was started with {redact(given)}: resume with the same, or with no --set to reuse them"
    return (
        "the spec, its base config or the environment (e.g. SEGSWEEP_CACHE) changed since it "
        "started: restore them, or give the sweep a new name"
    )


def resume_progress(plan: Plan, state: dict[str, Any]) -> str:
    """For a dry run of a resume: how far the sweep got, read from its trials' runs in the
    store the resume would use. Trials that failed run again (Ray resumes errored trials), as
    do those cut short; finished, stopped-early and diverged ones do not."""
    from segsweep.tracking.store import client_for

    parent = state.get("parent_run_id")
    if not parent:
        return "resume: the sweep had not started its parent run: every trial runs"
    uri = plan.tracking_uri
    try:
        existing_store(uri, what="the sweep's store")
        client = with_retries(lambda: client_for(uri), "connect", 10)
        experiment = with_retries(lambda: client.get_run(parent), "read run", 10).info.experiment_id
        kids = runs_tagged(client, experiment, TAG_PARENT, parent, 10)
    except UserError as exc:
        return f"resume: its runs could not be read ({one_line(exc)})"
    done: dict[str, dict[str, int]] = {"search": {}, "final": {}}
    for kid in kids:
        status = kid.data.tags.get(TAG_STATUS, "")
        if status in ("finished", "stopped_early", "diverged"):
            counts = done.setdefault(kid.data.tags.get(TAG_PHASE, "search"), {})
            counts[status] = counts.get(status, 0) + 1
    search = done["search"]
    text = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(search.items()))
    ran = sum(search.values())
    left = plan.total_trials - ran
    line = f"resume: {ran} of {plan.total_trials} search trials done{f' ({text})' if text else ''}"
    line += f", {left} to run (those failed or cut short again, from their last checkpoint)" if left else ""
    if plan.spec.final:
        planned = len(plan.cells) * len(plan.spec.final.seeds)
        line += f"; final runs: {sum(done['final'].values())} of up to {planned} done"
    return line
