"""One frozen config per run: defaults, then a YAML preset, then command-line overrides.

Unknown keys are errors at every layer, so a typo never silently falls back to a default. The
resolved config is saved as `config.yaml` in the run folder and inside every checkpoint, and
`load_config(path)` rebuilds a run from it alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.thresholds import RULES

PRESET_DIR = Path(__file__).parent / "presets"
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run. Defaults are the method's fine-tuning setup."""

    name: str = "run"
    # Data
    train_csv: str = ""
    valid_csv: str = ""  # empty: split valid_fraction of train's patients off instead
    format: str = "auto"
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
    # Decision thresholds stored with the best checkpoint(s): fixed (the method's 0.5), or
    # chosen per label on the validation predictions by youden or max_f1.
    threshold_rule: str = "fixed"
    uncertainty_band: float = 0.0  # >0: probabilities within +/- this of a threshold -> -1
    # Augmentation (off by default; never a horizontal flip unless asked for)
    rotation_deg: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    hflip: bool = False
    # Execution
    seed: int = 0
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16
    deterministic: bool = False
    use_cache: bool = True
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        # Checked here so a preset, an override and a saved config.yaml all fail the same way.
        if self.threshold_rule not in RULES:
            raise ConfigError(f"threshold_rule must be one of {RULES}, not {self.threshold_rule!r}")
        if not 0.0 <= self.uncertainty_band < 0.5:
            raise ConfigError(f"uncertainty_band must be in [0, 0.5), not {self.uncertainty_band}")
        if self.keep_best < 1:
            raise ConfigError(f"keep_best must be at least 1, not {self.keep_best}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_keys(values: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s) {unknown}")


def _coerce(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check each value against the field's default type (int may stand for float)."""
    types = {f.name: type(f.default) for f in fields(RunConfig)}
    out = {}
    for key, value in values.items():
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} must be {want.__name__}, got {value!r}")
        out[key] = value
    return out


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


def build_config(
    preset: str | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()
) -> RunConfig:
    """Defaults, then the preset, then the overrides; unknown keys are errors."""
    values: dict[str, Any] = {}
    if preset:
        path = preset_path(preset)
        layer = read_yaml(path)
        _check_keys(layer, str(path))
        values.update(_coerce(layer, str(path)))
    layer = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    _check_keys(layer, "overrides")
    values.update(_coerce(layer, "overrides"))
    return RunConfig(**values)


def load_config(path: Path) -> RunConfig:
    """A run's saved config.yaml, checked like any other layer."""
    data = read_yaml(path)
    _check_keys(data, str(path))
    return RunConfig(**_coerce(data, str(path)))
