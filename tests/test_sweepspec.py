"""Sweep specs: every malformed spec is a one-line error naming the field; grid x search expansion."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

from segsweep.errors import ConfigError
from segsweep.sweep.spec import plan_sweep

from .helpers import assert_user_error, pinned_to_one_cpu, segsweep_here

BASE = {"data": {"synthetic": {"num_train": 96, "num_val": 16}, "tune_size": 8}, "train": {"steps": 6}}


def spec(**over: object) -> dict:
    tree = {
        "name": "t",
        "base": BASE,
        "grid": {"method": ["supervised", "fixmatch"], "data.label_ratio": [0.25, 0.5], "seed": [0, 1]},
        "search": {
            "fixmatch": {
                "fixmatch.conf_threshold": {"type": "float", "low": 0.5, "high": 0.95},
                "data.augment.cutmix_prob": {"type": "categorical", "choices": [0.0, 0.5, 1.0]},
            }
        },
        "num_samples": 3,
    }
    for key, value in over.items():
        node = tree
        parts = key.split("/")
        for part in parts[:-1]:
            node = node[part]
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return tree


def plan_of(tmp_path: Path, tree: dict):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return plan_sweep(path, cwd=tmp_path)


def test_grid_times_search_expansion(tmp_path: Path, cache_dir: Path) -> None:
    plan = plan_of(tmp_path, spec())
    assert len(plan.cells) == 2 * 2 * 2
    ids = [c.id for c in plan.cells]
    assert ids[0] == "method=supervised,ratio=0.25,seed=0" and len(set(ids)) == 8
    fm = [c for c in plan.cells if c.method == "fixmatch"]
    assert all(set(c.space) == {"fixmatch.conf_threshold", "data.augment.cutmix_prob"} for c in fm)
    assert all(not c.space for c in plan.cells if c.method == "supervised")
    # searched cells get num_samples trials, the others one
    assert plan.total_trials == 4 * 3 + 4 * 1
    cell = plan.cells[-1]
    assert cell.tree["method"] == "fixmatch" and cell.tree["seed"] == 1
    assert cell.tree["data"]["label_ratio"] == 0.5 and cell.tree["train"]["steps"] == 6
    assert Path(cell.tree["data"]["root"]).is_absolute()
    assert cell.tree["tracking"]["experiment"] == "t"


def test_relative_weight_paths_are_made_absolute_for_trials(tmp_path: Path, cache_dir: Path) -> None:
    # Trials run in their own folders (maybe on other machines): a path given relative to
    # where the sweep was launched must still name the same file there.
    base = {**BASE, "model": {"encoder_weights": "enc.pt"}, "mixandmatch": {"proxy_from": "p/proxy.pt"}}
    plan = plan_of(
        tmp_path,
        spec(
            base=base, grid={"method": ["mixandmatch"], "data.label_ratio": [0.5], "seed": [0]}, search=None
        ),
    )
    tree = plan.cells[0].tree
    assert tree["model"]["encoder_weights"] == str(tmp_path / "enc.pt")
    assert tree["mixandmatch"]["proxy_from"] == str(tmp_path / "p" / "proxy.pt")


def test_base_may_be_a_path_and_set_overrides_reach_every_cell(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    plan = plan_of(tmp_path, spec(base="base.yaml"))
    assert plan.cells[0].tree["train"]["steps"] == 6
    path = tmp_path / "spec.yaml"
    plan = plan_sweep(path, ["train.steps=9", "model.arch=deeplabv3plus"], cwd=tmp_path)
    assert {c.tree["train"]["steps"] for c in plan.cells} == {9}
    assert {c.tree["model"]["arch"] for c in plan.cells} == {"deeplabv3plus"}


BAD = {
    "missing seed": (
        {"grid/seed": None},
        "grid: needs the keys method, data.label_ratio, seed (missing seed)",
    ),
    "unknown method": ({"grid/method": ["supervised", "mixmatch"]}, "unknown method 'mixmatch'"),
    "empty list": ({"grid/seed": []}, "'seed' must be a non-empty list"),
    "duplicate value": ({"grid/seed": [0, 0]}, "'seed' lists a value twice"),
    "grid seeds and final seeds": (  # every seed would be run once per grid seed
        {"final": {"seeds": [0, 1, 2]}},
        "final: re-runs each cell's best configuration over final.seeds, so a cell takes one seed "
        "(method=supervised,ratio=0.25 has 2)",
    ),
    "search for a non-method": ({"search/fixmach": {}}, "'fixmach' is not a method"),
    "searched budget": (
        {"search/fixmatch/train.steps": {"type": "int", "low": 1, "high": 9}},
        "train.steps cannot be searched",
    ),
    "search key in grid": ({"search/fixmatch/seed": {"type": "int", "low": 0, "high": 3}}, "seed"),
    "low above high": (
        {"search/fixmatch/fixmatch.conf_threshold": {"type": "float", "low": 0.9, "high": 0.5}},
        "'low' must be below 'high'",
    ),
    "log of zero": (
        {"search/fixmatch/fixmatch.conf_threshold": {"type": "logfloat", "low": 0, "high": 0.5}},
        "logfloat needs low > 0",
    ),
    "no choices": ({"search/fixmatch/data.augment.cutmix_prob": {"type": "categorical"}}, "choices"),
    "unknown search type": (
        {"search/fixmatch/fixmatch.conf_threshold": {"type": "gauss", "low": 0, "high": 1}},
        "search.fixmatch.fixmatch.conf_threshold.type",
    ),
    "tuning on the reported split": ({"early_stop": {"metric": "val/mIoU"}}, "early_stop.metric"),
    "hostile name": ({"name": "../../etc"}, "name: String should match pattern"),
    "html name": ({"name": "<script>x</script>"}, "name"),
    "fractional gpus above one": ({"resources": {"gpus_per_trial": 1.5}}, "resources.gpus_per_trial"),
    "unknown key": ({"grdi": {}}, "grdi: unknown key"),
    "zero samples": ({"num_samples": 0}, "num_samples"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_specs_name_the_field(case: str, tmp_path: Path) -> None:
    over, fragment = BAD[case]
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, spec(**over))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_values_invalid_in_the_run_config_name_the_cell_or_search_key(
    tmp_path: Path, cache_dir: Path
) -> None:
    with pytest.raises(ConfigError, match=r"cell method=supervised,ratio=2,seed=0\): data.label_ratio"):
        plan_of(tmp_path, spec(**{"grid/data.label_ratio": [2.0]}))
    bad_key = {"search/fixmatch/fixmatch.conf_thresh": {"type": "float", "low": 0.5, "high": 0.9}}
    with pytest.raises(
        ConfigError, match=r"search.fixmatch.fixmatch.conf_thresh: fixmatch.conf_thresh: unknown key"
    ):
        plan_of(tmp_path, spec(**bad_key))
    out_of_range = {"search/fixmatch/fixmatch.conf_threshold": {"type": "float", "low": 0.5, "high": 1.5}}
    with pytest.raises(ConfigError, match="less than or equal to 1"):
        plan_of(tmp_path, spec(**out_of_range))
    with pytest.raises(ConfigError, match=r"base\.yaml: config file not found"):
        plan_of(tmp_path, spec(base="base.yaml"))


def test_a_search_must_be_read_by_its_method_and_an_unused_one_is_said(tmp_path: Path) -> None:
    # a knob of another method would be searched for nothing (an error); a search for a
    # method that no cell runs (a grid narrowed for a quick run) is said, not dropped unsaid
    foreign = {"search/fixmatch/s4mim.conf_threshold": {"type": "float", "low": 0.5, "high": 0.9}}
    with pytest.raises(
        ConfigError, match=r"'s4mim.conf_threshold' is a knob of s4mim, which fixmatch never reads"
    ):
        plan_of(tmp_path, spec(**foreign))
    orphan = {"search/hfpl": {"hfpl.is_weight": {"type": "float", "low": 0.1, "high": 1.0}}}
    assert plan_of(tmp_path, spec(**orphan)).notes == [
        "search.hfpl is not used: no cell of the grid runs hfpl (its methods: fixmatch, supervised)"
    ]
    assert plan_of(tmp_path, spec()).notes == []


def test_a_set_on_a_grid_key_is_refused_rather_than_silently_overridden(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec()))
    with pytest.raises(ConfigError, match=r"--set method: 'method' is varied by the spec's grid"):
        plan_sweep(path, ["method=fixmatch"], cwd=tmp_path)
    assert plan_sweep(path, ["train.steps=4"], cwd=tmp_path).cells[0].tree["train"]["steps"] == 4


def test_a_damaged_sweep_state_is_named_in_one_line(tmp_path: Path) -> None:
    from segsweep.sweep.state import FORMAT, read_state

    state = tmp_path / "sweep.json"
    for text in ('{"fingerprint": "ab', "", "[]", "{}", f'{{"format": {FORMAT}, "fingerprint": 3}}'):
        state.write_text(text)
        with pytest.raises(
            ConfigError, match=r"sweep.json: (unreadable sweep state|not a segsweep sweep state)"
        ):
            read_state(state)
    state.write_text(f'{{"format": {FORMAT}, "fingerprint": "ab", "instance": "x"}}')
    assert read_state(state)["instance"] == "x"
    state.write_text(f'{{"format": {FORMAT + 1}, "fingerprint": "ab", "instance": "x"}}')
    with pytest.raises(ConfigError, match=r"sweep.json: made by a later segsweep version"):
        read_state(state)


def test_a_sweep_folder_of_an_earlier_version_is_refused_in_one_line(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A folder made before sweep.json recorded its format (its Ray state names modules this
    version no longer has): one line, exit 2, whether resumed with its --set or with others,
    or started again; nothing in it changes."""
    from segsweep.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec()))
    plan = plan_sweep(tmp_path / "s.yaml", cwd=tmp_path)
    folder = tmp_path / "sweeps" / "t"
    (folder / "ray").mkdir(parents=True)
    # sweep.json as the version before wrote it: no format, the studies' prefix of its own
    old = {
        "fingerprint": plan.fingerprint(),
        "instance": "ab12cd34",
        "study_prefix": "t",
        "parent_run_id": "r1",
        "tracking_uri": plan.tracking_uri,
        "experiment": "t",
        "sets": [],
        "cwd": str(tmp_path),
        "trials": plan.trial_settings(),
    }
    (folder / "sweep.json").write_text(json.dumps(old))
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    for extra in (["--resume"], ["--resume", "--set", "train.steps=5"], ["--resume", "--dry-run"], []):
        assert main(["sweep", "s.yaml", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: {folder / 'sweep.json'}: made by an earlier segsweep version; start a new sweep "
            "(--dir) or use the version that made it"
        ], (extra, err)
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_a_sweep_that_cannot_write_or_reach_its_stores_fails_before_it_starts(tmp_path: Path) -> None:
    # --dir a file, an Optuna storage that cannot be opened: one line, before Ray starts and
    # before any MLflow run, sweep folder or study exists
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec()))
    proc = segsweep_here("sweep", "s.yaml", "--dir", "afile", cwd=tmp_path)
    assert_user_error(proc, "--dir", "afile is a file, not a folder")
    (tmp_path / "o.yaml").write_text(
        yaml.safe_dump({**spec(), "optuna_storage": "sqlite:////nonexistent/dir/optuna.db"})
    )
    proc = segsweep_here("sweep", "o.yaml", cwd=tmp_path)
    assert_user_error(
        proc, "optuna_storage: cannot reach sqlite:////nonexistent/dir/optuna.db", "unable to open"
    )
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_cli_reports_spec_errors_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec(**{"early_stop": {"metric": "val/mIoU"}})))
    proc = segsweep_here("sweep", "s.yaml", cwd=tmp_path)
    assert_user_error(proc, "early_stop.metric", "tuning split")
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_dry_run_lists_the_trials_checks_them_and_writes_nothing(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from segsweep.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec(final={"seeds": [7]}, **{"grid/seed": [0]})))
    assert main(["sweep", "s.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sweep t: 4 cells, 8 search trials, then 4 final runs; MLflow experiment 't'")
    assert [line.split()[0] for line in out[1:3]] == [
        "method=supervised,ratio=0.25,seed=0",
        "method=supervised,ratio=0.5,seed=0",
    ]
    assert "1 trial(s) x 6 steps" in out[1]
    fixmatch = next(i for i, line in enumerate(out) if line.startswith("  method=fixmatch,ratio=0.25"))
    assert "3 trial(s) x 6 steps" in out[fixmatch]
    assert {" ".join(line.split()) for line in out[fixmatch + 1 : fixmatch + 3]} == {
        "search fixmatch.conf_threshold: uniform [0.5, 0.95]",
        "search data.augment.cutmix_prob: one of 0.0, 0.5, 1.0",
    }
    assert "final: each cell's best configuration again with seeds [7]" in "\n".join(out)
    assert "48 training steps in the search at most" in "\n".join(out)  # (2 x 1 + 2 x 3) x 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no store, no sweep folder
    # a trial's dataset that cannot be built is found by the dry run, in one line
    broken = spec(**{"base/data": {"name": "folder", "root": "nowhere"}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(broken))
    assert main(["sweep", "s.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0], err
    # with --resume: whether the sweep it would continue accepts it
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec()))
    assert main(["sweep", "s.yaml", "--dry-run", "--resume"]) == 2
    assert "--resume: no sweep 't' in sweeps to resume" in capsys.readouterr().err
    (tmp_path / "sweeps" / "t").mkdir(parents=True)
    from segsweep.sweep.state import FORMAT

    state = {"format": FORMAT, "fingerprint": "0", "instance": "i", "sets": [], "trials": {}}
    (tmp_path / "sweeps" / "t" / "sweep.json").write_text(json.dumps(state))
    assert main(["sweep", "s.yaml", "--dry-run"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["sweep", "s.yaml", "--dry-run", "--resume"]) == 2
    assert "this resume would change its cells (added method=supervised" in capsys.readouterr().err


def test_every_shipped_spec_and_declared_search_space_is_valid(tmp_path: Path, cache_dir: Path) -> None:
    from segsweep.methods import METHODS

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    specs = [p for p in experiments.glob("*.yaml") if "grid" in p.read_text()]
    assert len(specs) >= 6
    for path in specs:
        plan = plan_sweep(path, cwd=tmp_path)
        assert plan.cells, path
    plan = plan_sweep(experiments / "search_all.yaml", cwd=tmp_path)
    for method, cls in METHODS.items():
        if method != "supervised":
            assert cls.search_space, method
            cell = next(c for c in plan.cells if c.method == method)
            assert set(cell.space) == set(cls.search_space)


def test_variants_cross_the_grid_without_duplicating_baselines(tmp_path: Path, cache_dir: Path) -> None:
    tree = spec(**{"grid": {"data.label_ratio": [0.25, 0.5], "seed": [0]}, "search": {}})
    tree["variants"] = [
        {"method": "supervised"},
        {"method": "fixmatch", "fixmatch.cutmix": False},
        {"method": "fixmatch", "fixmatch.cutmix": True},
    ]
    plan = plan_of(tmp_path, tree)
    ids = [c.id for c in plan.cells]
    assert len(ids) == 6 and "method=fixmatch,ratio=0.25,fixmatch.cutmix=False,seed=0" in ids
    assert sum(c.method == "supervised" for c in plan.cells) == 2
    tree["variants"].append({"method": "supervised"})
    with pytest.raises(ConfigError, match="appears twice"):
        plan_of(tmp_path, tree)
    tree["variants"] = [{"method": "mixmatch"}]
    with pytest.raises(ConfigError, match=r"variants\.0: unknown method 'mixmatch'"):
        plan_of(tmp_path, tree)


def test_outcomes_of_an_interrupted_sweep_skip_trials_that_never_started() -> None:
    """SIGTERM while trials wait: Ray's results then hold trials with no config and no metrics."""
    from types import SimpleNamespace

    from segsweep.sweep.ray_tune import outcomes_from

    cfg = {"cell": "method=supervised,ratio=0.5,seed=0", "phase": "search", "sample": 0, "params": {}}
    done = SimpleNamespace(
        config={"trial": cfg},
        metrics={"trial_id": "a", "final": True, "tune/mIoU": 0.4, "val/mIoU_last": 0.3},
        error=None,
        path="/x/a",
    )
    never = SimpleNamespace(config=None, metrics=None, error=None, path="/x/b")
    running = SimpleNamespace(config={"trial": cfg}, metrics={"trial_id": "c"}, error=None, path="/x/c")
    trials = [
        SimpleNamespace(trial_id="a", status="TERMINATED"),
        SimpleNamespace(trial_id="c", status="RUNNING"),
    ]

    class Grid(list):  # a ResultGrid: iterable results plus Ray's trial records
        _experiment_analysis = SimpleNamespace(trials=trials)

    out, complete = outcomes_from(Grid([done, never, running]), "s@1", "tune/mIoU")
    assert not complete
    assert list(out) == ["a"] and out["a"].status == "finished" and out["a"].val == 0.3
    assert out["a"].key == "s@1/search/method=supervised,ratio=0.5,seed=0/0"


def test_a_trial_given_no_gpu_trains_on_the_cpu_unless_its_config_names_a_device() -> None:
    from segsweep.sweep.trial import trial_device

    assert trial_device("auto", []) == "cpu"  # gpus_per_trial 0: Ray still shows every GPU
    assert trial_device("auto", ["0"]) == "auto"  # its GPU is the one CUDA shows it
    assert trial_device("cuda:1", []) == "cuda:1"  # named in the config: kept


def test_final_takes_one_seed_per_cell_whichever_key_sets_it(tmp_path: Path, cache_dir: Path) -> None:
    # variants replace the grid's seed: each arm still has one seed, so final is fine
    tree = spec(final={"seeds": [0, 1]})
    tree["grid"]["seed"] = [0]
    tree["variants"] = [{"method": "supervised", "seed": 1}, {"method": "fixmatch", "seed": 2}]
    plan = plan_of(tmp_path, tree)
    assert sorted(c.values["seed"] for c in plan.cells) == [1, 1, 2, 2]


# -- a resume that would not run the sweep's trials says why --------------------------------------

ELSEWHERE = "sqlite:////elsewhere/m.db"


@pytest.mark.parametrize(
    "first, again, fragments",
    [
        # (--set, cwd, --tracking-uri) the sweep was started with, then those of the resume
        (
            (["train.steps=4"], ".", None),
            (["train.steps=5"], ".", None),
            ["(train.steps: 4 -> 5)", "started with --set train.steps=4: resume with the same, or with no"],
        ),
        (([], ".", None), (["train.steps=5"], ".", None), ["(train.steps: 6 -> 5)", "started with no --set"]),
        (
            ([], ".", ELSEWHERE),
            ([], ".", None),
            [f'(tracking.uri: "{ELSEWHERE}" -> "sqlite:///', f"resume with --tracking-uri {ELSEWHERE}"],
        ),
        # a relative output_dir resolves elsewhere
        (
            (["output_dir=out"], "a", None),
            (["output_dir=out"], ".", None),
            ['/a/out" -> ', "/a, where relative"],
        ),
        # the same --set in another order: not the cause (here, the store is)
        (
            (["train.steps=5", "train.lr=0.01"], ".", ELSEWHERE),
            (["train.lr=0.01", "train.steps=5"], ".", None),
            [f"resume with --tracking-uri {ELSEWHERE}"],
        ),
    ],
    ids=["other-set", "set-added", "store", "cwd", "set-order"],
)
def test_a_resume_that_differs_says_what_differs(
    tmp_path: Path, cache_dir: Path, first: tuple, again: tuple, fragments: list[str]
) -> None:
    from segsweep.sweep.driver import run_sweep
    from segsweep.sweep.state import FORMAT

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(), sort_keys=False))

    def plan(sets: list[str], cwd: str, uri: str | None):
        return plan_sweep(path, sets, tracking_uri=uri, cwd=tmp_path / cwd)

    folder = tmp_path / "sweeps" / "t"
    folder.mkdir(parents=True)
    started = plan(*first)
    state = {"format": FORMAT, "fingerprint": started.fingerprint(), "instance": "i"}
    kept = {"tracking_uri": started.tracking_uri, "sets": started.sets, "cwd": started.cwd}
    (folder / "sweep.json").write_text(json.dumps(state | kept | {"trials": started.trial_settings()}))
    with pytest.raises(ConfigError) as err:
        run_sweep(plan(*again), tmp_path / "sweeps", resume=True)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_a_resume_names_cells_and_settings_the_spec_no_longer_has(tmp_path: Path, cache_dir: Path) -> None:
    from segsweep.sweep.state import FORMAT, resumable_state

    path = tmp_path / "spec.yaml"

    def started(tree: dict) -> None:
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        plan = plan_sweep(path, cwd=tmp_path)
        folder = tmp_path / "sweeps" / "t"
        folder.mkdir(parents=True, exist_ok=True)
        kept = {
            "format": FORMAT,
            "fingerprint": plan.fingerprint(),
            "instance": "i",
            "sets": [],
            "cwd": plan.cwd,
            "trials": plan.trial_settings(),
        }
        (folder / "sweep.json").write_text(json.dumps(kept | {"tracking_uri": plan.tracking_uri}))

    def refused(tree: dict) -> str:
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        with pytest.raises(ConfigError) as err:
            resumable_state(plan_sweep(path, cwd=tmp_path), tmp_path / "sweeps", resume=True)
        return str(err.value)

    started(spec())
    message = refused(spec(**{"grid/seed": [0, 1, 2]}))
    assert "would change its cells (added method=supervised,ratio=0.25,seed=2, " in message
    assert "and 1 more)" in message
    # the environment: the synthetic cache moved (another user, machine or SEGSWEEP_CACHE)
    message = refused(spec(**{"base/data/root": str(tmp_path / "cache2")}))
    assert (
        "(data.root: " in message and "cache2" in message and "environment (e.g. SEGSWEEP_CACHE)" in message
    )
    # a searched range: named as the search key
    space = {"type": "float", "low": 0.6, "high": 0.95}
    message = refused(spec(**{"search/fixmatch/fixmatch.conf_threshold": space}))
    assert "search.fixmatch.conf_threshold: " in message


def test_a_grid_listed_in_another_order_is_the_same_sweep(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "spec.yaml"
    plans = []
    for ratios in ([0.25, 0.5], [0.5, 0.25]):
        path.write_text(yaml.safe_dump(spec(**{"grid/data.label_ratio": ratios}), sort_keys=False))
        plans.append(plan_sweep(path, cwd=tmp_path))
    assert [c.id for c in plans[0].cells] != [c.id for c in plans[1].cells]
    assert plans[0].fingerprint() == plans[1].fingerprint()


def test_a_sweep_resumed_after_its_stores_password_changed_is_the_same_sweep(
    tmp_path: Path, cache_dir: Path
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(), sort_keys=False))
    old, new = (
        plan_sweep(path, tracking_uri=f"http://alice:{pw}@mlflow:5000", cwd=tmp_path)
        for pw in ("pw-old-9x", "pw-new-9x")
    )
    assert old.fingerprint() == new.fingerprint()
    assert (
        "pw-old-9x" not in json.dumps(old.trial_settings()) and old.trial_settings() == new.trial_settings()
    )
    other = plan_sweep(path, tracking_uri="http://alice:old@mlflow2:5000", cwd=tmp_path)
    assert other.fingerprint() != old.fingerprint()
    # a sweep started under the old password resumes under the new one
    from segsweep.sweep.state import FORMAT, resumable_state

    (tmp_path / "sweeps" / "t").mkdir(parents=True)
    state = {"format": FORMAT, "fingerprint": old.fingerprint(), "instance": "i"}
    (tmp_path / "sweeps" / "t" / "sweep.json").write_text(json.dumps(state))
    assert resumable_state(new, tmp_path / "sweeps", resume=True)["instance"] == "i"


@pytest.mark.slow
def test_a_dry_run_of_a_resume_says_how_far_the_sweep_got(tmp_path: Path, cache_dir: Path) -> None:
    from segsweep.sweep.state import resume_progress
    from segsweep.tracking.store import client_for, ensure_experiment

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(final={"seeds": [7]}, **{"grid/seed": [0]}), sort_keys=False))
    plan = plan_sweep(path, cwd=tmp_path)
    assert plan.total_trials == 8  # fixmatch: 2 cells x 3 samples; supervised: 2 cells x 1
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = client_for(uri)
    experiment = ensure_experiment(client, "t", uri)
    parent = client.create_run(experiment, tags={"segsweep.kind": "sweep"}).info.run_id
    ended = ["finished"] * 3 + ["stopped_early", "failed"]
    for phase, status in [("search", s) for s in [*ended, "interrupted", "running"]] + [
        ("final", "finished")
    ]:
        tags = {"mlflow.parentRunId": parent, "segsweep.phase": phase, "segsweep.status": status}
        client.create_run(experiment, tags=tags)
    client.create_run(experiment, tags={"segsweep.phase": "search", "segsweep.status": "finished"})  # not its
    plan = plan_sweep(path, tracking_uri=uri, cwd=tmp_path)  # the store the resume would use
    # a failed trial runs again (Ray resumes errored trials), as does one cut short
    assert resume_progress(plan, {"parent_run_id": parent}) == (
        "resume: 4 of 8 search trials done (3 finished, 1 stopped early), 4 to run (those failed or "
        "cut short again, from their last checkpoint); final runs: 1 of up to 4 done"
    )
    assert "could not be read" in resume_progress(plan, {"parent_run_id": "nope"})


def test_the_cpus_a_process_may_use_are_its_affinity_and_its_quota(tmp_path: Path) -> None:
    """A local sweep starts one trial per usable CPU: a job's or container's share (its
    affinity, its cgroup's quota), not the host's cores that ``os.cpu_count()`` counts."""
    from segsweep.training.devices import cgroup_quotas, cpu_quota, usable_cpus

    assert cpu_quota("max 100000\n") is None and cpu_quota("-1 100000") is None  # no limit
    assert cpu_quota("400000 100000") == 4 and cpu_quota("150000 100000") == 1  # docker --cpus=1.5
    assert cpu_quota("5000 100000") == 1  # a twentieth of a CPU still runs one trial
    for odd in ("", "200000 0", "1.5 100000", "x y"):
        with pytest.raises(ValueError):
            cpu_quota(odd)
    # cgroup v2: the job's quota holds for its step, which has none of its own
    (tmp_path / "v2/job/step").mkdir(parents=True)
    (tmp_path / "v2/job/step/cpu.max").write_text("max 100000\n")
    (tmp_path / "v2/job/cpu.max").write_text("300000 100000\n")
    (tmp_path / "v2.cgroup").write_text("0::/job/step\n")
    assert list(cgroup_quotas(tmp_path / "v2.cgroup", tmp_path / "v2")) == [None, 3]
    # cgroup v1 (hybrid), seen from a container without its own namespace: the host's path is
    # absent, the container's root holds its quota
    (tmp_path / "v1/cpu").mkdir(parents=True)
    (tmp_path / "v1/cpu/cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "v1/cpu/cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "v1.cgroup").write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert list(cgroup_quotas(tmp_path / "v1.cgroup", tmp_path / "v1")) == [1]
    # ... mounted under its joint name only; and lines no kernel writes are passed over
    (tmp_path / "v1/cpu").rename(tmp_path / "v1/cpu,cpuacct")
    (tmp_path / "v1/cpu,cpuacct/cpu.cfs_period_us").write_text("0\n")  # not a quota
    (tmp_path / "v1/cpu,cpuacct/docker").mkdir()
    (tmp_path / "v1/cpu,cpuacct/docker/cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "v1/cpu,cpuacct/docker/cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "v1.cgroup").write_text("garbage\n\n4:cpu,cpuacct:/docker/abc\n")
    assert list(cgroup_quotas(tmp_path / "v1.cgroup", tmp_path / "v1")) == [2]
    import torch

    from segsweep.config import validate_run_config
    from segsweep.training.devices import numerics_for

    threads = torch.get_num_threads()
    try:
        with pinned_to_one_cpu():
            assert usable_cpus() == 1
            numerics_for(validate_run_config({}, "run"))  # a run's training threads: its share too
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_dotted_key_through_a_value_is_one_line_naming_where_it_came_from() -> None:
    from segsweep.config import apply_overrides, set_dotted, with_values
    from segsweep.errors import ConfigError

    tree = {"train": {"steps": 3}}
    with pytest.raises(ConfigError, match=r"^--set 'train\.steps\.x=1': 'steps' is a value, not a section$"):
        apply_overrides(tree, ["train.steps.x=1"])
    with pytest.raises(ConfigError, match=r"^cell c: train\.steps\.x: 'steps' is a value, not a section$"):
        with_values(tree, {"train.steps.x": 1}, "cell c")
    values = {"data.augment.scale": [0.5, 2.0]}
    got = with_values(tree, values, "cell c")
    assert got == {"train": {"steps": 3}, "data": {"augment": {"scale": [0.5, 2.0]}}} and tree == {
        "train": {"steps": 3}
    }
    assert got["data"]["augment"]["scale"] is not values["data.augment.scale"]  # no list shared with the spec
    set_dotted(tree, "train.lr", 0.1)
    assert tree == {"train": {"steps": 3, "lr": 0.1}}


def test_a_study_rides_out_its_database_not_answering_and_writes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A study call whose database drops the connection (a PostgreSQL restart) is made again
    until it answers, said once on stderr; a refused statement is not retried; a tell whose
    first attempt landed before the connection dropped is not told twice."""
    import sqlalchemy.exc as sa

    from segsweep.sweep import studies
    from segsweep.sweep.spec import SearchParam

    space = {"fixmatch.conf_threshold": SearchParam(type="float", low=0.5, high=0.95)}
    study = studies.CellStudy(f"sqlite:///{tmp_path / 'o.db'}", "s:cell", space, "max", 0)
    real_ask, real_tell = study.study.ask, study.study.tell
    drops = iter([True, True, False])

    def flaky_ask(*args: object, **kwargs: object) -> object:
        if next(drops):
            raise sa.OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        return real_ask(*args, **kwargs)

    monkeypatch.setattr(study.study, "ask", flaky_ask)
    monkeypatch.setattr(studies, "poll", functools.partial(studies.poll, max_delay_s=0.01))
    number, params = study.ask()
    assert number == 0 and 0.5 <= params["fixmatch.conf_threshold"] <= 0.95
    assert capsys.readouterr().err.count("note: the Optuna storage does not answer") == 1

    told = []

    def tell_then_drop(*args: object, **kwargs: object) -> object:
        told.append(args)
        if len(told) == 1:  # written, and the connection lost before the answer came back
            real_tell(*args, **kwargs)
            raise sa.OperationalError("COMMIT", {}, Exception("connection reset by peer"))
        return real_tell(*args, **kwargs)

    monkeypatch.setattr(study.study, "tell", tell_then_drop)
    study.tell(number, "complete", 0.5)
    assert len(told) == 1 and len(study.study.trials) == 1 and study.study.trials[0].value == 0.5

    monkeypatch.setattr(
        study.study, "ask", lambda *a, **k: (_ for _ in ()).throw(sa.IntegrityError("x", {}, None))
    )
    with pytest.raises(sa.IntegrityError):
        study.ask()  # refused: raised at once
