"""Run configuration: pydantic models validated at load, YAML files, ``--set a.b=c`` overrides.

A run config is one YAML file (see ``experiments/``). Every field has a default, so the
smallest valid config is ``method: supervised``. Method knobs live in a section named after
the method (``fixmatch: {conf_threshold: 0.9}``); only the active method's section is used.

The registries are the one source of what a config may name: each method of ``METHODS``
(``segsweep.methods``) adds its ``Knobs`` as the section of its name, and the names a config
accepts for ``method``, ``data.name`` (``segsweep.data.DATASETS``) and ``model.arch``
(``segsweep.models.network.ARCHS``) are ``Literal``s built from them (``run_config_model``).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from segsweep.data import DATASETS
from segsweep.errors import ConfigError
from segsweep.files import UserPath
from segsweep.methods import METHODS
from segsweep.models.network import ARCHS

#: Seeds go to torch's generators, which take at most 64 bits (and negative ones wrap).
MAX_SEED = 2**63 - 1


def names_of(registry: Mapping[str, object]) -> Any:
    """``Literal["a", "b", ...]`` of a registry's names, in its order."""
    return Literal[tuple(registry)]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SyntheticConfig(Section):
    """The embedded synthetic dataset (generated offline from a seed, cached on disk)."""

    image_size: int = Field(64, ge=32, le=1024, description="side of the square images, px")
    num_train: int = Field(1200, ge=16, description="training pool size")
    num_val: int = Field(200, ge=8, description="validation (reported) split size")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="generator seed; a different seed is a different dataset"
    )


class AugmentConfig(Section):
    """Joint image/mask augmentation. Weak: scale, crop, flip. Strong: photometric + CutMix box."""

    scale_min: float = Field(0.75, gt=0)
    scale_max: float = Field(1.5, gt=0)
    hflip: bool = True
    color_jitter: float = Field(0.5, ge=0, le=1, description="strength of the strong view's jitter")
    grayscale_prob: float = Field(0.2, ge=0, le=1)
    blur_prob: float = Field(0.5, ge=0, le=1)
    blur_sigma_max: float | None = Field(
        None, gt=0, description="None: UniMatch's 2.0 px at 321 px crops, scaled to crop_size"
    )
    blur_sigma_min: float | None = Field(
        None,
        gt=0,
        description="smallest blur sigma, px; None: 0.05 x blur_sigma_max (UniMatch: 0.1 at any crop)",
    )
    cutmix_prob: float = Field(0.5, ge=0, le=1, description="chance that a strong view gets a box")

    @model_validator(mode="after")
    def _scale_order(self) -> AugmentConfig:
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must not exceed scale_max")
        if self.blur_sigma_min is not None and self.blur_sigma_max is not None:
            if self.blur_sigma_min > self.blur_sigma_max:
                raise ValueError("blur_sigma_min must not exceed blur_sigma_max")
        return self


#: The dataset names a config accepts: ``DATASETS``'s at import (``run_config_model``
#: follows a registry changed later).
DatasetName = names_of(DATASETS)


class DataConfig(Section):
    name: DatasetName = "synthetic"
    root: UserPath | None = Field(None, description="dataset root; for synthetic, the cache folder")
    label_ratio: float = Field(0.125, gt=0, le=1, description="fraction of training images labeled")
    num_labeled: int | None = Field(None, ge=1, description="labeled count; overrides label_ratio")
    split: UserPath | None = Field(
        None, description="a published split folder holding labeled.txt and unlabeled.txt"
    )
    split_seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of the generated labeled/unlabeled partition"
    )
    tune_size: int = Field(
        64, ge=0, description="training images held out (from the unlabeled pool) for tuning"
    )
    crop_size: int = Field(
        64,
        ge=32,
        le=2048,
        description="square training crop, px, any size (321, 513, 801 as published); the model "
        "pads its input to a multiple of 32 and crops its output back (2048: beyond every "
        "supported dataset's images)",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader workers per loader; None: 0 on a CPU (the workers would take the "
        "step's cores), on a GPU one per CPU thread of the run, at most 8 (measured on an H200: "
        "0 workers left DeepLabV3+ at 512 px waiting for data, 134 img/s against 362 with 8)",
    )
    verify: bool = Field(False, description="decode every image and mask before training starts")
    synthetic: SyntheticConfig = SyntheticConfig()
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _blur_fits_the_crop(self) -> DataConfig:
        # The blur reaches ceil(3 sigma) pixels and pads by reflection, which needs fewer
        # pixels than the crop: checked here, not when the first wide blur is drawn mid-run.
        sigma = self.augment.blur_sigma_max
        if sigma is not None and math.ceil(3 * sigma) >= self.crop_size:
            raise ValueError(
                f"augment.blur_sigma_max {sigma} reaches {math.ceil(3 * sigma)} px, not less than "
                f"crop_size {self.crop_size}; at most {(self.crop_size - 1) / 3:.1f}"
            )
        return self


#: The architecture names a config accepts: ``ARCHS``'s at import.
ArchName = names_of(ARCHS)


class ModelConfig(Section):
    arch: ArchName = "unet"
    encoder: str = "tu-mobilenetv3_small_050"
    encoder_weights: Literal["imagenet"] | UserPath | None = Field(
        None,
        description="None: random; 'imagenet': the weights smp or timm publish for the encoder, "
        "through their own loader and cache (see weights_cache and `segsweep weights`); a path: "
        "a local encoder state_dict, which must cover every encoder key",
    )
    weights_cache: UserPath | None = Field(
        None,
        description="folder of the pretrained weights' cache (Hugging Face hub layout), e.g. one "
        "that every node of a cluster reads; None: the hub's own (HF_HUB_CACHE, ~/.cache/huggingface)",
    )
    decoder_channels: int | None = Field(64, ge=8, description="decoder width; None: smp's default")
    output_stride: Literal[8, 16, 32] | None = Field(
        None,
        description="encoder output stride (8, 16: the last stages dilated); None: 16 for "
        "deeplabv3plus, 32 otherwise (smp's defaults)",
    )
    aspp_rates: tuple[int, int, int] | None = Field(
        None, description="DeepLabV3+ atrous rates; None: smp's (12, 24, 36); UniMatch: (6, 12, 18)"
    )
    aspp_dropout: float | None = Field(
        None, ge=0, lt=1, description="DeepLabV3+ ASPP dropout; None: smp's 0.5; UniMatch's head: 0"
    )
    aspp_separable: bool | None = Field(
        None, description="DeepLabV3+ ASPP with separable convolutions; None: smp's True; UniMatch: false"
    )

    @model_validator(mode="after")
    def _head_options_fit_the_arch(self) -> ModelConfig:
        if self.arch != "deeplabv3plus":
            for name in ("aspp_rates", "aspp_dropout", "aspp_separable"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is a DeepLabV3+ setting; arch is {self.arch}")
            if self.output_stride not in (None, 32):
                raise ValueError(f"output_stride {self.output_stride} needs arch deeplabv3plus")
        elif self.output_stride == 32:
            raise ValueError("deeplabv3plus takes output_stride 8 or 16")
        return self


class TrainConfig(Section):
    steps: int = Field(300, ge=1, description="optimizer steps of the main training stage")
    epochs: float | None = Field(
        None,
        gt=0,
        description="budget as UniMatch counts it, replacing steps: an epoch is one pass over the "
        "unlabeled list (the labeled list repeated to its length), ceil(unlabeled / "
        "unlabeled_batch_size) steps; without unlabeled images, one pass over the labeled list",
    )
    batch_size: int = Field(16, ge=1, description="labeled images per step")
    accumulate: int = Field(
        1,
        ge=1,
        description="micro-batches per step: each step's batch is split in this many parts, run "
        "one after another and their gradients summed (loss / accumulate), so a batch that does "
        "not fit one GPU keeps its size, learning rate and schedule; each part's loss is the mean "
        "over its own pixels and batch norm sees one part at a time, as on one GPU of k under DDP",
    )
    loss: Literal["ce", "ohem"] = Field(
        "ce",
        description="supervised loss on labeled pixels: cross-entropy, or OHEM cross-entropy "
        "(UniMatch on Cityscapes: the hardest pixels only)",
    )
    ohem_threshold: float = Field(
        0.7, gt=0, le=1, description="OHEM keeps pixels whose target-class probability is below this"
    )
    ohem_min_kept: int = Field(
        200_000, ge=1, description="OHEM keeps at least this many pixels per batch (the hardest)"
    )
    unlabeled_batch_size: int | None = Field(None, ge=1, description="None: same as batch_size")
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(0.006, gt=0, le=10, description="learning rate at lr_reference_batch_size")
    lr_reference_batch_size: int = Field(
        16, ge=1, description="lr scales linearly: lr * batch_size / lr_reference_batch_size"
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    decoder_lr_mult: float = Field(
        1.0, gt=0, description="lr multiplier of non-encoder layers (10 with a pretrained encoder)"
    )
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA, off on CPU")
    channels_last: bool | None = Field(None, description="None: on for CUDA, off for CPU")
    compile: bool = False
    eval_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"'{value}' is not a device; use auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError(
                f"steps and epochs are both set; epochs ({self.epochs:g}) decides the budget: "
                "set train.epochs=null to train a number of steps"
            )
        return self

    @model_validator(mode="after")
    def _batches_split_evenly(self) -> TrainConfig:
        for name in ("batch_size", "unlabeled_batch_size"):
            size = getattr(self, name)
            if size is not None and size % self.accumulate:
                raise ValueError(
                    f"{name} {size} does not split into accumulate={self.accumulate} equal parts"
                )
        return self

    def scaled_lr(self) -> float:
        """The linear scaling rule (Goyal et al. 2017): lr grows with the labeled batch size."""
        return self.lr * self.batch_size / self.lr_reference_batch_size


class EvalConfig(Section):
    mode: Literal["whole", "sliding"] = "whole"
    window: int = Field(512, ge=32, description="sliding-window crop side")
    stride: int = Field(341, ge=1, description="sliding-window stride")
    batch_size: int = Field(32, ge=1)
    panel_samples: int = Field(4, ge=0, description="unlabeled images drawn in sample panels")
    diag_samples: int = Field(64, ge=0, description="held unlabeled images scored for pseudo-mask quality")


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = Field(None, description="None: sqlite:///mlflow.db in the working folder")
    experiment: str = Field("segsweep", min_length=1, max_length=250)
    run_name: str | None = Field(None, max_length=250)
    log_checkpoints: bool = True


class DebugConfig(Section):
    """Fault injection, for tests of retries and resume."""

    fail_at_step: int | None = Field(
        None, ge=1, description="raise once at this step (not again after a resume)"
    )
    fail_stage: str = Field("train", description="the pipeline stage whose step fail_at_step counts")
    nan_at_step: int | None = Field(None, ge=1, description="make the loss NaN at this step")


class RunConfigBase(Section):
    """The sections every run config has. ``RunConfig`` adds one section per method (its
    ``Knobs``, from ``METHODS``) and narrows ``method`` to the registered names: configs are
    validated through ``validate_run_config``, never with this class directly."""

    method: str = "supervised"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    output_dir: UserPath = Field(Path("runs"), description="local checkpoints and run files")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    debug: DebugConfig = DebugConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, v: Any) -> Any:
        # Before the Literal's own check, whose message would list the names without saying
        # what they are; a value that is not text gets pydantic's usual message.
        if not isinstance(v, str):
            raise PydanticCustomError("string_type", "Input should be a valid string")
        if v not in cls.method_names():
            raise ValueError(f"unknown method '{v}'; valid methods: {', '.join(cls.method_names())}")
        return v

    @classmethod
    def method_names(cls) -> tuple[str, ...]:
        """The methods this model has a section for (its ``method`` Literal's names)."""
        return get_args(cls.model_fields["method"].annotation)

    def knobs(self) -> BaseModel:
        """The active method's knobs."""
        return getattr(self, self.method)

    def flat(self) -> dict[str, Any]:
        """Flattened ``a.b.c: value`` view for tracking: the active method's knobs only."""
        raw = self.model_dump(mode="json", exclude=set(self.method_names()) - {self.method})
        return flatten(raw)


SectionT = TypeVar("SectionT", bound=Section)


def _narrowed(section: type[SectionT], name: str, names: tuple[str, ...]) -> type[SectionT]:
    """``section`` whose field ``name`` accepts ``names`` (a Literal of them): the class itself
    when it already does, else a subclass of the same name that says so."""
    field = section.model_fields[name]
    if get_args(field.annotation) == names:
        return section
    narrowed: type[SectionT] = create_model(  # type: ignore[call-overload]
        section.__name__,
        __base__=section,
        __module__=section.__module__,
        **{name: (Literal[names], Field(field.default, description=field.description))},
    )
    return narrowed


@functools.cache
def _build_run_config(
    methods: tuple[tuple[str, type[BaseModel]], ...], datasets: tuple[str, ...], archs: tuple[str, ...]
) -> type[RunConfigBase]:
    """The run config model for these method sections (name, Knobs), dataset and architecture
    names: ``RunConfigBase`` with a section per method, ``method``, ``data.name`` and
    ``model.arch`` each a Literal of its registry's names. Cached: one class per registry state."""
    data, model = _narrowed(DataConfig, "name", datasets), _narrowed(ModelConfig, "arch", archs)
    names = tuple(name for name, _ in methods)
    fields: dict[str, Any] = {
        "method": (Literal[names], "supervised"),
        "data": (data, Field(default_factory=data)),
        "model": (model, Field(default_factory=model)),
    }
    # One section per method (its knobs), in the registry's order; only the section of
    # `method` is used.
    fields.update({name: (knobs, Field(default_factory=knobs)) for name, knobs in methods})
    built: type[RunConfigBase] = create_model(  # type: ignore[call-overload]
        "RunConfig", __base__=RunConfigBase, __module__=__name__, **fields
    )
    return built


def run_config_model() -> type[RunConfigBase]:
    """The run config model of the registries as they are now: ``RunConfig`` itself unless a
    method, dataset or architecture was registered since this module was imported (a plugin,
    a test's toy method)."""
    return _build_run_config(
        tuple((name, cls.Knobs) for name, cls in METHODS.items()), tuple(DATASETS), tuple(ARCHS)
    )


if TYPE_CHECKING:
    RunConfig = RunConfigBase
else:
    #: The run config of the registered methods, datasets and architectures.
    RunConfig = run_config_model()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c) with ``c`` parsed as a YAML scalar (0.5, true, null, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set data.label_ratio=0.25")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree["a"]["b"] = value for key "a.b", creating missing sections (in place)."""
    parts = key.split(".")
    _section_of(tree, parts, key)[parts[-1]] = value


def _section_of(tree: dict[str, Any], parts: list[str], where: str) -> dict[str, Any]:
    """The section that dotted ``parts`` (less the last) lead to, created where missing; a
    part that is a value is a one-line error naming ``where``."""
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{part}' is a value, not a section")
        node = child
    return node


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``a.b=c`` applied (missing sections are created)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        _section_of(tree, parts, f"--set {text!r}")[parts[-1]] = value
    return tree


def with_values(tree: dict[str, Any], values: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of ``tree`` with each dotted key of ``values`` set to its value, as data (no
    ``a.b=c`` text and YAML round trip); a key through a value is a one-line error naming
    ``source``."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        parts = key.split(".")
        # the tree owns its values: no list shared with the spec
        _section_of(tree, parts, f"{source}: {key}")[parts[-1]] = copy.deepcopy(value)
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last silently: a second ``train:`` block would drop the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a one-line ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: key '{exc.key}' given twice (line {exc.line})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(tree).__name__}")
    return tree


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming the first offending field: ``file: data.label_ratio: <reason>``."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def validate_run_config(tree: dict[str, Any], source: str) -> RunConfig:
    """``tree`` as a run config of the registries as they are now; a ConfigError naming
    ``source`` and the first offending field otherwise."""
    try:
        return run_config_model().model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None


def load_run_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load ``path`` (or the defaults when None), apply ``--set`` overrides, and validate."""
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, overrides or [])
    return validate_run_config(tree, str(path) if path is not None else "config")


def public_tree(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain data, a password inside ``tracking.uri`` hidden: what is saved
    (config.yaml, checkpoints) and logged (a checkpoint is an artifact every user of the store
    may read)."""
    from segsweep.tracking.uris import redact

    tree = cfg.model_dump(mode="json")
    if isinstance(tree.get("tracking"), dict) and tree["tracking"].get("uri"):
        tree["tracking"]["uri"] = redact(tree["tracking"]["uri"])
    return tree


def dump_yaml(cfg: BaseModel) -> str:
    """The config as YAML, a password inside ``tracking.uri`` hidden (``public_tree``)."""
    return yaml.safe_dump(public_tree(cfg), sort_keys=False)
