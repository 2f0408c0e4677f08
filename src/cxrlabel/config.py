"""Frozen configs: defaults, then a YAML preset, then command-line overrides.

Two kinds share the machinery: `RunConfig` (approach 2, end-to-end fine-tuning: `cxrlabel
train`) and `HeadConfig` (approach 1, frozen backbone + feed-forward heads: `cxrlabel extract`,
`train-head`, `sweep`). Unknown keys are errors at every layer, so a typo never silently falls
back to a default. The resolved config is saved as `config.yaml` in the run folder and inside
every checkpoint, and `load_config(path)` rebuilds a run from it alone.

A preset or saved config of another kind than asked for is refused by name: head presets and
head config.yaml files carry `kind: heads` (fine-tuning ones need no `kind`, so their files are
unchanged).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from cxrlabel.data.labels import LabelPolicy, resolve_labels
from cxrlabel.data.transforms import AUGMENT_PRESETS, EQUALIZE_METHODS
from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.thresholds import RULES

PRESET_DIR = Path(__file__).parent / "presets"
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
KIND_KEY = "kind"


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


def _check_thresholds(threshold_rule: str, uncertainty_band: float) -> None:
    if threshold_rule not in RULES:
        raise ConfigError(f"threshold_rule must be one of {RULES}, not {threshold_rule!r}")
    if not 0.0 <= uncertainty_band < 0.5:
        raise ConfigError(f"uncertainty_band must be in [0, 0.5), not {uncertainty_band}")


POS_WEIGHT_MODES = ("none", "balanced")


def parse_pos_weight(spec: str) -> str | dict[str, float]:
    """RunConfig.pos_weight: "none", "balanced", or {label: weight} from "Label=w,Label=w"."""
    if spec in POS_WEIGHT_MODES:
        return spec
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not value > 0 or not math.isfinite(value):
            raise ConfigError(
                f"pos_weight must be one of {POS_WEIGHT_MODES} or 'Label=w,Label=w' with "
                f"weights > 0, not {spec!r}"
            )
        weights[name.strip()] = value
    return weights


class _Config:
    """What every config kind shares: its kind's name, a plain dict, and saving as YAML."""

    KIND: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        # Lists, not tuples: YAML and JSON both store them as plain sequences.
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()  # type: ignore[call-overload]
        }

    @classmethod
    def build(
        cls, preset: str | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()
    ) -> Any:
        """This kind's config: defaults, then the preset, then the overrides (`build_any`)."""
        return build_any(cls, preset, overrides)  # type: ignore[type-var]

    @classmethod
    def load(cls, path: Path) -> Any:
        """This kind's saved config.yaml (`load_any`)."""
        return load_any(cls, path)  # type: ignore[type-var]

    def save(self, path: Path) -> None:
        data = self.to_dict()
        if self.KIND != RunConfig.KIND:
            data = {KIND_KEY: self.KIND, **data}
        atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))


SAMPLERS = ("shuffle", "oversample")


def _check_policy(policy: str, labels: str) -> None:
    """The policy parses, and every label it names is one of the run's labels."""
    try:
        names = LabelPolicy.parse(policy).names
    except ValueError as exc:
        raise ConfigError(f"policy: {exc}") from None
    if names:
        outside = [n for n in names if n not in _run_labels(labels)]
        if outside:
            raise ConfigError(f"policy names {outside}, which are not among labels {labels!r}")


def _run_labels(labels: str) -> tuple[str, ...]:
    try:
        return resolve_labels(labels)
    except ValueError as exc:
        raise ConfigError(f"labels: {exc}") from None


def _check_data_recipe(config: RunConfig) -> None:
    """The `# Recipe: data` settings of a RunConfig (and its policy)."""
    _check_policy(config.policy, config.labels)
    if config.sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {SAMPLERS}, not {config.sampler!r}")
    if config.sampler_label and config.sampler_label not in _run_labels(config.labels):
        raise ConfigError(
            f"sampler_label {config.sampler_label!r} is not among labels {config.labels!r}"
        )
    if not 0.0 < config.pos_fraction < 1.0:
        raise ConfigError(f"pos_fraction must be in (0, 1), not {config.pos_fraction}")
    if config.augment not in AUGMENT_PRESETS:
        raise ConfigError(f"augment must be one of {list(AUGMENT_PRESETS)}, not {config.augment!r}")
    if not 0.0 <= config.scale < 1.0:
        raise ConfigError(f"scale must be in [0, 1), not {config.scale}")
    if config.equalize not in EQUALIZE_METHODS:
        raise ConfigError(f"equalize must be one of {EQUALIZE_METHODS}, not {config.equalize!r}")


@dataclass(frozen=True)
class RunConfig(_Config):
    """Everything that defines a training run. Defaults are the method's fine-tuning setup."""

    KIND: ClassVar[str] = "finetune"

    name: str = "run"
    # Data
    train_csv: str = ""
    valid_csv: str = ""  # empty: split valid_fraction of train's patients off instead
    format: str = "auto"
    # Read label-CSV paths that lead outside the CSV's root (cxrlabel.data.csvfiles).
    allow_outside_paths: bool = False
    labels: str = "competition"  # a label-set name or a comma-separated list of observations
    view: str = "frontal"
    policy: str = "U-Ignore"
    require_certain: bool = True  # keep images with >= 1 certain label among `labels`
    valid_fraction: float = 0.1
    # Model
    backbone: str = "densenet121"
    head: str = "linear"
    hidden: int = 256
    weights: str = "imagenet"  # imagenet | none | path to a local weights file
    size: int = 0  # 0: the backbone's native input size
    resize_mode: str = "pad"
    # Optimisation (Adam with default betas, lr 1e-4, batch 16, 3 epochs)
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant (the method) | cosine (decay to 0 over the run)
    select_best: str = "val_loss"  # or "val_auroc"
    keep_best: int = 1  # >1: also keep the best k epochs (checkpoints/epoch-N, ranked in kept.json)
    # Also save `last` every this many steps mid-epoch, so a killed long epoch loses at most
    # this many; 0: only at epoch ends. Not part of what a run computes: --resume may change it.
    checkpoint_every_steps: int = 200
    # Decision thresholds stored with the best checkpoint(s): fixed (the method's 0.5), or
    # chosen per label on the validation predictions by youden or max_f1.
    threshold_rule: str = "fixed"
    uncertainty_band: float = 0.0  # >0: probabilities within +/- this of a threshold -> -1
    # Recipe: optimisation (every default keeps the method's plain Adam + BCE run)
    freeze_stages: int = 0  # freeze the backbone's first N stages (timm feature_info), BN in eval
    backbone_lr_scale: float = 1.0  # the backbone's lr is lr * this; the head's is lr
    warmup_epochs: float = 0.0  # linear warm-up from ~0 to lr over this many epochs
    ema_decay: float = 0.0  # >0 (e.g. 0.999): validate and keep an EMA of the weights (timm)
    pos_weight: str = "none"  # none | balanced (neg/pos per label) | "Label=w,Label=w"
    aucm_epochs: int = 0  # >0: this many more epochs of LibAUC AUC-margin loss from the best
    aucm_lr: float = 0.1  # PESG's learning rate in the AUC-margin stage
    aucm_margin: float = 1.0  # the AUC-margin loss's margin
    # Augmentation (off by default; never a horizontal flip unless asked for)
    rotation_deg: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    hflip: bool = False
    # Recipe: data
    # `policy` (above) is one policy for every label or a per-label mapping by name,
    # "Atelectasis=U-Ones,Edema=U-Ones,*=U-Zeros" (`*`: every other label; a label neither
    # named nor covered by `*` is U-Ignore). Policies: U-Ignore, U-Zeros, U-Ones, U-Ones-LSR
    # (uncertain -> a soft target in [0.55, 0.85]), U-Zeros-LSR ([0, 0.3]); LSR targets are
    # drawn once per (image, label) from `seed` and only for training (validation scores LSR
    # labels as U-Ones / U-Zeros).
    sampler: str = "shuffle"  # shuffle: each epoch a permutation | oversample (see pos_fraction)
    sampler_label: str = ""  # the label oversample balances; empty: the first of `labels`
    # oversample: epochs keep the training set's length, positives of sampler_label make up
    # this fraction (repeated when scarce), the rest are its negatives/uncertain/blank
    pos_fraction: float = 0.5
    # Augmentation preset: none | cxr-mild (10 deg, zoom 0.9-1.1, shift 0.05, brightness and
    # contrast 0.1) | cxr-strong (15 deg, 0.85-1.15, 0.08, 0.2, 0.2); never a flip. Precedence:
    # an augmentation field above (or `scale`) set to a non-zero value overrides the preset's;
    # zero leaves the preset's value.
    augment: str = "none"
    scale: float = 0.0  # zoom by a factor in [1 - scale, 1 + scale]; 0: off
    # none | hist | clahe: grey-level equalisation of the resized film, recorded in the model's
    # preprocessing so evaluation and labelling apply it too (ONNX export refuses it)
    equalize: str = "none"
    # Execution
    seed: int = 0
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16
    deterministic: bool = False
    # torch.compile the training step (mode "default"); worth it on CUDA for long runs, where
    # its minutes of compiling pay off. Checkpoints are the same either way.
    compile: bool = False
    use_cache: bool = True
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        # Checked here so a preset, an override and a saved config.yaml all fail the same way.
        _check_thresholds(self.threshold_rule, self.uncertainty_band)
        if self.keep_best < 1:
            raise ConfigError(f"keep_best must be at least 1, not {self.keep_best}")
        if self.checkpoint_every_steps < 0:
            raise ConfigError(
                f"checkpoint_every_steps must be >= 0 (0: only at epoch ends), "
                f"not {self.checkpoint_every_steps}"
            )
        _check_data_recipe(self)
        self._check_recipe_optimisation()

    def _check_recipe_optimisation(self) -> None:
        if self.freeze_stages < 0:
            raise ConfigError(f"freeze_stages must be >= 0, not {self.freeze_stages}")
        if self.backbone_lr_scale < 0:
            raise ConfigError(f"backbone_lr_scale must be >= 0, not {self.backbone_lr_scale}")
        if not 0.0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"warmup_epochs must be in [0, epochs={self.epochs}], not {self.warmup_epochs}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), not {self.ema_decay}")
        weights = parse_pos_weight(self.pos_weight)
        if isinstance(weights, dict):
            try:
                labels = resolve_labels(self.labels)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            unknown = sorted(set(weights) - set(labels))
            if unknown:
                raise ConfigError(f"pos_weight names label(s) {unknown} not among {list(labels)}")
        if self.aucm_epochs < 0:
            raise ConfigError(f"aucm_epochs must be >= 0, not {self.aucm_epochs}")
        if self.aucm_lr <= 0 or self.aucm_margin <= 0:
            raise ConfigError(
                f"aucm_lr and aucm_margin must be > 0, not {self.aucm_lr}, {self.aucm_margin}"
            )


@dataclass(frozen=True)
class HeadConfig(_Config):
    """Approach 1: frozen backbones, features extracted once, feed-forward heads trained on them.

    Defaults follow the method's Table I protocol on the five competition labels; every
    backbone x head pair becomes an ordinary checkpoint in `<runs_dir>/<name>/<Model>/`.
    """

    KIND: ClassVar[str] = "heads"

    name: str = "heads"
    # Data (as RunConfig)
    train_csv: str = ""
    valid_csv: str = ""  # empty: split valid_fraction of train's patients off instead
    format: str = "auto"
    allow_outside_paths: bool = False  # as RunConfig
    labels: str = "competition"
    view: str = "all"
    policy: str = "U-Ignore"
    require_certain: bool = True
    valid_fraction: float = 0.1
    # Models: every backbone x every head
    backbones: tuple[str, ...] = ("xception", "densenet121", "resnet50", "vgg19", "mobilenet")
    heads: tuple[str, ...] = ("linear", "mlp3", "mlp3_dropout")
    weights: str = "imagenet"  # imagenet | none | path to a local weights file
    size: int = 0  # 0: the method's size per backbone (224 MobileNet, 220 the others)
    resize_mode: str = "pad"
    keras_compat: bool = False  # compute what Keras computes with Keras-converted weights
    # Head training (Adam on the cached features)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    hidden: int = 256
    seed: int = 0
    # Thresholds stored with each checkpoint, chosen on the validation split (as RunConfig)
    threshold_rule: str = "fixed"
    uncertainty_band: float = 0.0
    # Execution
    extract_batch_size: int = 32
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        _check_thresholds(self.threshold_rule, self.uncertainty_band)
        _check_policy(self.policy, self.labels)
        # Head names are checked by training.heads before any extraction (the list of heads
        # lives with models.factory, which this module does not import).
        if not self.backbones or not self.heads:
            raise ConfigError("backbones and heads must each name at least one")


ConfigT = TypeVar("ConfigT", RunConfig, HeadConfig)
KINDS: dict[str, type[RunConfig] | type[HeadConfig]] = {
    RunConfig.KIND: RunConfig,
    HeadConfig.KIND: HeadConfig,
}


def _split_kind(
    values: dict[str, Any], cls: type[_Config], where: str, default_kind: str
) -> dict[str, Any]:
    """Drop the layer's `kind` after checking it is `cls`'s (none: `default_kind`)."""
    values = dict(values)
    kind = values.pop(KIND_KEY, default_kind)
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown config kind {kind!r}; kinds: {sorted(KINDS)}")
    if kind != cls.KIND:
        users = {"finetune": "cxrlabel train", "heads": "cxrlabel extract / train-head / sweep"}
        raise ConfigError(
            f"{where} is a {kind!r} config (for {users[kind]}), not a {cls.KIND!r} one "
            f"(for {users[cls.KIND]})"
        )
    return values


def _check_keys(values: Mapping[str, Any], where: str, cls: type[_Config] = RunConfig) -> None:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s) {unknown}")


def _coerce_one(key: str, value: Any, want: type, where: str) -> Any:
    if want is tuple:
        # A list from YAML, or "a,b" from a key=value override.
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of names, got {value!r}")
        return tuple(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {want.__name__}, got {value!r}")
    return value


def _coerce(
    values: Mapping[str, Any], where: str, cls: type[_Config] = RunConfig
) -> dict[str, Any]:
    """Check each value against the field's default type (int may stand for float)."""
    types = {f.name: type(f.default) for f in fields(cls)}  # type: ignore[arg-type]
    return {key: _coerce_one(key, value, types[key], where) for key, value in values.items()}


def _layer(
    values: Mapping[str, Any], where: str, cls: type[_Config], default_kind: str
) -> dict[str, Any]:
    values = _split_kind(dict(values), cls, where, default_kind)
    _check_keys(values, where, cls)
    return _coerce(values, where, cls)


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return data


def preset_path(preset: str) -> Path:
    """A preset name (e.g. 'tiny-cpu') from the package, or a YAML file path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        return path
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}; presets: {names}")
    return path


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings; values parsed as YAML scalars (so 3 is int, 1e-4 float, true bool)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        value = yaml.safe_load(raw) if raw else ""
        # PyYAML reads 1e-4 as a string; accept it as the float users mean.
        if isinstance(value, str) and _FLOAT_RE.match(value):
            value = float(value)
        out[key.strip().replace("-", "_")] = value
    return out


def build_any(
    cls: type[ConfigT],
    preset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> ConfigT:
    """A `cls` config: defaults, then the preset, then the overrides; unknown keys are errors.

    A file without `kind` is a fine-tuning one; overrides need none (they are `cls`'s).
    """
    values: dict[str, Any] = {}
    if preset:
        path = preset_path(preset)
        values.update(_layer(read_yaml(path), str(path), cls, RunConfig.KIND))
    layer = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    values.update(_layer(layer, "overrides", cls, cls.KIND))
    return cls(**values)


def load_any(cls: type[ConfigT], path: Path) -> ConfigT:
    """A saved config.yaml of kind `cls`, checked like any other layer."""
    return cls(**_layer(read_yaml(path), str(path), cls, RunConfig.KIND))


def config_class(
    preset: str | None = None, config: Path | None = None
) -> type[RunConfig] | type[HeadConfig]:
    """The kind a saved config.yaml (`config`, first) or a preset declares by its `kind` key;
    neither, or no key: fine-tuning. For commands that take both kinds (`cxrlabel cv`)."""
    if config is None and not preset:
        return RunConfig
    path = Path(config) if config is not None else preset_path(str(preset))
    kind = read_yaml(path).get(KIND_KEY, RunConfig.KIND)
    if kind not in KINDS:
        raise ConfigError(f"{path}: unknown config kind {kind!r}; kinds: {sorted(KINDS)}")
    return KINDS[kind]


def build_config(
    preset: str | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()
) -> RunConfig:
    """A fine-tuning config: defaults, then the preset, then the overrides."""
    return build_any(RunConfig, preset, overrides)


def load_config(path: Path) -> RunConfig:
    """A fine-tuning run's saved config.yaml."""
    return load_any(RunConfig, path)
