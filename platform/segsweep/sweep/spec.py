"""Sweep specs: one YAML file that defines a grid of cells, a search per cell, early stopping,
resources, tracking and an optional final re-run over seeds. Validated with pydantic; every
error names the field. No Ray or Optuna here: ``driver.py`` runs what this module plans.

A *cell* is one point of the grid (e.g. method=fixmatch, data.label_ratio=1/16, seed=0).
Each cell gets ``num_samples`` trials searched by its own Optuna study (or a single trial
when its method declares no search space); early stopping compares trials of one cell only.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from segsweep.config import (
    RunConfig,
    Section,
    apply_overrides,
    describe_validation_error,
    flatten,
    parse_override,
    read_yaml,
    validate_run_config,
    with_values,
)
from segsweep.data import default_cache
from segsweep.data.splits import split_folder_of
from segsweep.errors import ConfigError, redact
from segsweep.files import expand_user
from segsweep.methods import METHODS
from segsweep.tracking.uris import resolve_uri, uri_origin

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
REQUIRED_GRID_KEYS = ("method", "data.label_ratio", "seed")
#: Budgets are the same for every method of a cell: these keys are never searched.
UNSEARCHABLE = (
    "method",
    "seed",
    "train.steps",
    "train.epochs",
    "train.batch_size",
    "data.label_ratio",
    "data.num_labeled",
)


class SearchParam(Section):
    """One searched knob. ``float``/``int`` are uniform, ``logfloat`` log-uniform."""

    type: Literal["float", "int", "logfloat", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError("'low' must be below 'high'")
        if self.type == "logfloat" and self.low <= 0:
            raise ValueError("logfloat needs low > 0")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int needs whole-number bounds")
        return self

    def describe(self) -> str:
        """One line, as a reader of the spec would say it: ``uniform [0.5, 0.95]``."""
        if self.type == "categorical":
            return "one of " + ", ".join(map(str, self.choices or []))
        shape = {"float": "uniform", "int": "integer", "logfloat": "log-uniform"}[self.type]
        step = f" step {_fmt(self.step)}" if self.step else ""
        return f"{shape} [{_fmt(self.low)}, {_fmt(self.high)}]{step}"

    def corner_values(self) -> list[Any]:
        """Values that must validate in the run config (bounds or every choice)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [self.low, self.high]


class EarlyStop(Section):
    """ASHA (Li et al. 2020) per cell, on a metric of the tuning split."""

    enabled: bool = True
    metric: str = "tune/mIoU"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(100, ge=1, description="steps before a trial may be stopped")
    reduction_factor: float = Field(3.0, gt=1)

    @field_validator("metric")
    @classmethod
    def _tuning_split_only(cls, v: str) -> str:
        if not v.startswith("tune"):
            raise ValueError(
                f"'{v}' is not measured on the tuning split: search and early stopping must "
                "never see the split the curves report (use tune/mIoU)"
            )
        return v


class Resources(Section):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="fractions pack small trials onto one GPU")
    max_concurrent: int | None = Field(None, ge=1)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("above 1, GPUs per trial must be a whole number")
        return v


class SweepTracking(Section):
    uri: str | None = None
    experiment: str | None = Field(None, min_length=1, max_length=250)


class RayConfig(Section):
    address: str | None = Field(None, description="absent: start Ray locally, sized to the machine")


class Final(Section):
    """Re-run the best configuration of every cell over these seeds (mean and spread)."""

    seeds: list[int] = Field(min_length=1)


class SweepSpec(Section):
    name: str = Field(pattern=NAME_PATTERN, description="the sweep (and MLflow experiment) name")
    base: Path | dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    variants: list[dict[str, Any]] = Field(
        default_factory=list,
        description="alternatives crossed with the grid, e.g. {method: mixandmatch, mixandmatch.mm: false}; "
        "their keys may replace grid keys (method included)",
    )
    search: dict[str, dict[str, SearchParam]] = Field(
        default_factory=dict, description="per method: a space, or 'default' (the method's own)"
    )
    num_samples: int = Field(1, ge=1, le=10000, description="trials per cell with a search space")
    early_stop: EarlyStop = EarlyStop()
    resources: Resources = Resources()
    tracking: SweepTracking = SweepTracking()
    ray: RayConfig = RayConfig()
    final: Final | None = None
    max_failures: int = Field(2, ge=0, description="retries of a crashed trial from its checkpoint")
    optuna_storage: str | None = Field(None, description="RDB URL; default: SQLite beside the sweep")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"'{key}' must be a non-empty list")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"'{key}' lists a value twice")
        for method in grid.get("method", []):
            if method not in METHODS:
                raise ValueError(f"unknown method '{method}'; valid methods: {', '.join(METHODS)}")
        return grid

    @model_validator(mode="after")
    def _required_keys(self) -> SweepSpec:
        """method, label ratio and seed come from the grid or from every variant."""
        missing = [
            k
            for k in REQUIRED_GRID_KEYS
            if k not in self.grid and not (self.variants and all(k in v for v in self.variants))
        ]
        if missing:
            raise ValueError(
                f"grid: needs the keys {', '.join(REQUIRED_GRID_KEYS)} (missing {', '.join(missing)})"
            )
        for i, variant in enumerate(self.variants):
            if not variant:
                raise ValueError(f"variants.{i}: an empty variant")
            if "method" in variant and variant["method"] not in METHODS:
                raise ValueError(
                    f"variants.{i}: unknown method '{variant['method']}'; valid methods: {', '.join(METHODS)}"
                )
        return self

    @field_validator("search", mode="before")
    @classmethod
    def _default_spaces(cls, search: Any) -> Any:
        """``search: {guidedmix: default}`` takes the space the method declares."""
        if isinstance(search, dict):
            search = {
                m: (METHODS[m].search_space if space == "default" and m in METHODS else space)
                for m, space in search.items()
            }
        return search

    @field_validator("search")
    @classmethod
    def _search(cls, search: dict[str, dict[str, SearchParam]]) -> dict[str, dict[str, SearchParam]]:
        for method, space in search.items():
            if method not in METHODS:
                raise ValueError(f"'{method}' is not a method; valid methods: {', '.join(METHODS)}")
            for key in space:
                if key in UNSEARCHABLE:
                    raise ValueError(
                        f"{method}.{key} cannot be searched: every method of a cell gets the same budget"
                    )
                owner = key.split(".", 1)[0]
                if owner in METHODS and owner != method:
                    raise ValueError(
                        f"{method}: '{key}' is a knob of {owner}, which {method} never reads "
                        f"(its own knobs are {method}.*)"
                    )
        return search

    @model_validator(mode="after")
    def _no_overlap(self) -> SweepSpec:
        varied = set(self.grid).union(*(set(v) for v in self.variants))
        for method, space in self.search.items():
            both = set(space) & varied
            if both:
                raise ValueError(f"search.{method}: '{sorted(both)[0]}' is also a grid key")
        return self


@dataclass
class Cell:
    """One grid point: its id, the grid values, and the run-config tree of its trials."""

    id: str
    values: dict[str, Any]
    tree: dict[str, Any]
    space: dict[str, SearchParam] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.values["method"])

    def slug(self) -> str:
        """A file- and study-name-safe id."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.id)[:120]


@dataclass
class Plan:
    spec: SweepSpec
    spec_text: str
    cells: list[Cell]
    tracking_uri: str
    experiment: str
    #: What the spec says that no trial will use (told to the user, not an error).
    notes: list[str] = field(default_factory=list)
    #: The flag, field or variable that gave ``tracking_uri`` (named in errors about it).
    tracking_origin: str = "--tracking-uri"
    #: The ``--set`` overrides of the base config, as given (kept in sweep.json for --resume).
    sets: list[str] = field(default_factory=list)
    #: The folder relative paths were resolved against (a resume from elsewhere differs).
    cwd: str = ""

    def samples(self, cell: Cell) -> int:
        return self.spec.num_samples if cell.space else 1

    @property
    def total_trials(self) -> int:
        return sum(self.samples(c) for c in self.cells)

    def fingerprint(self) -> str:
        """Changes when anything that defines the trials changes (checked on --resume). URI
        passwords and the cells' order are left out: a sweep resumed after its store's
        password changed, or its grid's values were listed in another order, runs the same
        trials."""
        cells = sorted(self.cells, key=lambda c: c.id)
        payload = json.dumps(
            [[c.id, c.tree, {k: v.model_dump() for k, v in c.space.items()}] for c in cells],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(redact(payload).encode()).hexdigest()[:16]

    def trial_settings(self) -> dict[str, dict[str, str]]:
        """Per cell, what defines its trials as flat strings, URI passwords hidden: kept in
        sweep.json, so that a resume that would change them can say what changes."""
        return {
            c.id: {
                **{k: redact(json.dumps(v, default=str)) for k, v in flatten(c.tree).items()},
                **{f"search.{k}": json.dumps(v.model_dump(), sort_keys=True) for k, v in c.space.items()},
            }
            for c in self.cells
        }


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_id(values: dict[str, Any]) -> str:
    short = {"data.label_ratio": "ratio"}
    return ",".join(f"{short.get(k, k)}={_fmt(v)}" for k, v in values.items())


def ratio_text(ratio: float) -> str:
    """A label ratio as people write it: 1/8 for 0.125, else its value (0.0087)."""
    if 0 < ratio < 1 and abs(1 / ratio - round(1 / ratio)) < 1e-9:
        return f"1/{round(1 / ratio)}"
    return f"{ratio:g}"


def trial_run_name(values: dict[str, Any], phase: str, index: object) -> str:
    """An MLflow run name that leads with what tells a sweep's runs apart, short enough for
    the runs table: ``fixmatch 1/8 s0 #1`` (search trial 1), ``fixmatch 1/8 s2 final`` (a
    final seed); other varied keys by their last part (``split=92``)."""
    parts = [str(values["method"]), ratio_text(float(values["data.label_ratio"]))]
    for key, value in values.items():
        if key not in REQUIRED_GRID_KEYS:
            shown = Path(value).name if isinstance(value, str) and "/" in value else _fmt(value)
            parts.append(f"{key.rsplit('.', 1)[-1]}={shown}")
    parts.append(f"s{values['seed']}" if phase == "search" else f"s{index}")
    parts.append(f"#{index}" if phase == "search" else "final")
    return " ".join(parts)


def load_spec(path: Path, sets: list[str] | None = None) -> tuple[SweepSpec, dict[str, Any]]:
    tree = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(path))) from None
    return spec, tree


def _resolve_paths(tree: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make relative paths absolute: trials run in their own folders, maybe on other machines."""
    tree = copy.deepcopy(tree)
    data = tree.setdefault("data", {})
    for section, key in (
        ("data", "root"),
        ("data", "split"),
        ("model", "encoder_weights"),
        ("model", "weights_cache"),
        ("mixandmatch", "proxy_from"),
        ("", "output_dir"),
    ):
        node = tree.get(section, {}) if section else tree
        if isinstance(node, dict) and node.get(key) and node[key] != "imagenet":  # not a path
            try:
                p = expand_user(str(node[key]))
            except ValueError as exc:
                raise ConfigError(f"{f'{section}.' if section else ''}{key}: {exc}") from None
            if not p.is_absolute() and (section, key) == ("data", "split"):
                # A split list folder shipped with segsweep (``unimatch/pascal/92``), unless the
                # working folder holds one of that name.
                local = base_dir / p
                p = local if local.is_dir() else split_folder_of(p)
            node[key] = str(p if p.is_absolute() else (base_dir / p).resolve())
    if data.get("name", "synthetic") == "synthetic" and not data.get("root"):
        data["root"] = str(default_cache().resolve())
    return tree


def plan_sweep(
    path: Path,
    sets: list[str] | None = None,
    tracking_uri: str | None = None,
    cwd: Path | None = None,
) -> Plan:
    """Validate the spec and every cell's run config; nothing is started or written."""
    spec, _ = load_spec(path)
    cwd = cwd or Path.cwd()
    base_tree, base_source = _base_tree(spec, path)
    _refuse_sets_on_grid_keys(spec, sets or [])
    base_tree = apply_overrides(base_tree, sets or [])
    # Resolved here, on the driver: a trial runs in its own folder and would otherwise
    # silently write a store of its own there.
    base_uri = (base_tree.get("tracking") or {}).get("uri")
    given, origin = uri_origin(
        (tracking_uri, "--tracking-uri"),
        (spec.tracking.uri, "tracking.uri"),
        (base_uri, f"{base_source}: tracking.uri"),
    )
    uri = resolve_uri(given)
    experiment = spec.tracking.experiment or spec.name
    tracking = {"tracking.experiment": experiment, "tracking.enabled": True, "tracking.uri": uri}
    points = grid_points(spec)
    cells = [_plan_cell(spec, path, values, base_tree, base_source, tracking, cwd) for values in points]
    _refuse_twice_listed_cells(cells, path)
    if spec.final:
        _refuse_several_seeds_per_arm(points, path)
    ran = {c.method for c in cells}
    # A search kept for a method the grid leaves out (narrowed for a quick run) is not an
    # error, but the user is told that it does nothing.
    notes = [
        f"search.{m} is not used: no cell of the grid runs {m} (its methods: {', '.join(sorted(ran))})"
        for m in sorted(set(spec.search) - ran)
    ]
    return Plan(
        spec,
        path.read_text(encoding="utf-8"),
        cells,
        uri,
        experiment,
        notes,
        origin,
        list(sets or []),
        str(cwd),
    )


def _base_tree(spec: SweepSpec, path: Path) -> tuple[dict[str, Any], str]:
    """The run-config tree every cell starts from, and where it came from (for errors)."""
    if not isinstance(spec.base, Path):
        return dict(spec.base), f"{path}: base"
    base_path = spec.base if spec.base.is_absolute() else path.parent / spec.base
    if not base_path.exists():  # name the spec and its key, not only the missing file
        raise ConfigError(f"{path}: base: {base_path}: config file not found")
    return read_yaml(base_path), str(base_path)


def _refuse_sets_on_grid_keys(spec: SweepSpec, sets: list[str]) -> None:
    varied = set(spec.grid).union(*(set(v) for v in spec.variants))
    for item in sets:
        key = ".".join(parse_override(item)[0])
        if key in varied:  # the grid sets it per cell and would silently win
            raise ConfigError(f"--set {key}: '{key}' is varied by the spec's grid; change it there")


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The grid values of every cell, variant by variant. Cell ids read the same whatever
    the YAML order: method, label ratio, others, seed."""
    points = []
    for variant in spec.variants or [{}]:
        axes = {**spec.grid, **{k: [v] for k, v in variant.items()}}
        others = [k for k in axes if k not in REQUIRED_GRID_KEYS]
        keys = ["method", "data.label_ratio", *others, "seed"]
        for combo in itertools.product(*(axes[k] for k in keys)):
            points.append(dict(zip(keys, combo, strict=True)))
    return points


def _plan_cell(
    spec: SweepSpec,
    path: Path,
    values: dict[str, Any],
    base_tree: dict[str, Any],
    base_source: str,
    tracking: dict[str, Any],
    cwd: Path,
) -> Cell:
    """One cell: the base tree with its grid values and the sweep's ``tracking``, validated
    as a run config, and with every searched value's bounds."""
    cid = cell_id(values)
    tree = with_values(base_tree, {**values, **tracking}, f"{base_source} (cell {cid})")
    cfg = validate_run_config(tree, f"{base_source} (cell {cid})")
    space = spec.search.get(cfg.method, {})
    for key, param in space.items():  # every searched value must be valid in the config
        source = f"{path}: search.{cfg.method}.{key}"
        for value in param.corner_values():
            validate_run_config(with_values(tree, {key: value}, source), source)
    # Relative paths are resolved against the folder the sweep was started from.
    return Cell(cid, values, _resolve_paths(tree, cwd), space)


def _refuse_twice_listed_cells(cells: list[Cell], path: Path) -> None:
    seen: set[str] = set()
    for cell in cells:
        if cell.id in seen:
            raise ConfigError(f"{path}: the cell {cell.id} appears twice (variants overlap the grid)")
        seen.add(cell.id)


def _refuse_several_seeds_per_arm(points: list[dict[str, Any]], path: Path) -> None:
    """Each cell is re-run over final.seeds: cells differing only in their seed would each
    run every final seed, and a curve would count each seed several times."""
    by_arm: dict[str, list[Any]] = {}
    for values in points:
        arm = cell_id({k: v for k, v in values.items() if k != "seed"})
        by_arm.setdefault(arm, []).append(values["seed"])
    several = next(((arm, seeds) for arm, seeds in by_arm.items() if len(seeds) > 1), None)
    if several is not None:
        raise ConfigError(
            f"{path}: final: re-runs each cell's best configuration over final.seeds, so a cell "
            f"takes one seed ({several[0]} has {len(several[1])}); search with one seed, or drop final"
        )


def run_config_of(cell: Cell, params: dict[str, Any], seed: int | None = None) -> RunConfig:
    """The RunConfig of one trial: the cell's tree with its searched values (and seed) set
    as data, validated once."""
    values = {**params, **({"seed": seed} if seed is not None else {})}
    return validate_run_config(with_values(cell.tree, values, f"cell {cell.id}"), f"cell {cell.id}")
