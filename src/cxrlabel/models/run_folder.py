"""The run folder: one place that knows its layout, its files' formats and how specs name it.

A training run (cxrlabel.training.finetune) writes, under ``<runs_dir>/<name>``::

    config.yaml                   the resolved RunConfig (load_config rebuilds the run)
    splits/split.csv              patient_id,split when validation is split off train
    metrics.csv                   kind=step|epoch, epoch, step, train_loss, val_loss, val_auroc,
                                  lr, images_per_s, loader_images_per_s
    plots/loss.png                per-step training loss; per-epoch train vs validation loss
    checkpoints/last.*            end of every epoch and every few steps, with optimizer and
                                  RNG state for resuming (last.prev.* while it is rewritten)
    checkpoints/best.*            best epoch by validation loss (or mean AUROC)
    checkpoints/epoch-NNNN.*      with keep_best=k>1: each of the k best epochs under its own
                                  (0-based) epoch number
    checkpoints/kept.json         the ranking, best first: rank, epoch, value, path (for
                                  keep_best=1 the one entry is best.*); `RUN:bestK` reads it
    summary.json                  labels, best epoch and its validation metrics, kept
                                  checkpoints, speed
    report/                       `cxrlabel evaluate`'s report and evaluation.json

A cross-validation (`cxrlabel cv`, training.cv) holds one such run folder per fold,
``RUN/fold-1`` ... ``RUN/fold-K`` (heads: ``RUN/<Model>/fold-K/checkpoints/best.*``), and
`RUN:folds` (`RUN/<Model>:folds`) names every fold's best checkpoint: the fold ensemble.

Readers (loading `RUN` or `RUN:bestK`, evaluate's report folder, compare, the report's loss
curves) go through this module rather than re-parsing the files. It sits in the models layer
because resolving a model spec needs it; it imports nothing from training or evaluation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from cxrlabel.csvcells import frame_csv
from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.checkpoint import WEIGHTS_SUFFIX, checkpoint_paths

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
KEPT_FILE = "kept.json"
REPORT_DIR = "report"

METRIC_COLUMNS = (
    "kind",
    "epoch",
    "step",
    "train_loss",
    "val_loss",
    "val_auroc",
    "lr",
    "images_per_s",
    "loader_images_per_s",
    # Which loss the epoch trained with: "bce" (the method), "aucm" (the AUC-margin stage).
    "stage",
)
# What a reader of metrics.csv needs (older runs may lack the speed columns).
REQUIRED_METRIC_COLUMNS = ("kind", "epoch", "step", "train_loss", "val_loss")

# Kept epochs are saved under their epoch number and never renamed: a file's name says which
# epoch it holds whatever point a kill interrupted, and the ranking lives in `last`/kept.json.
_EPOCH_FILE = re.compile(r"^epoch-(?P<epoch>\d+)\.")
_BEST_K = re.compile(r"^(?P<run>.+):best(?P<k>\d+)$")
# Cross-validation (training.cv): one run or checkpoint folder per fold, fold-1 ... fold-K.
FOLDS_SUFFIX = ":folds"
FOLD_PREFIX = "fold-"
_FOLD_DIR = re.compile(r"^fold-(?P<k>\d+)$")


class _Inside:
    """A fixed path inside the run folder, read as an attribute (``folder.metrics``)."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, folder: RunFolder | None, owner: type | None = None) -> Path:
        if folder is None:  # looked up on the class (help(), inspect): the relative path
            return Path(*self.parts)
        return folder.root.joinpath(*self.parts)


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is read or created by building one)."""

    root: Path

    config = _Inside(CONFIG_FILE)
    split = _Inside("splits", "split.csv")
    metrics = _Inside(METRICS_FILE)
    loss_plot = _Inside("plots", "loss.png")
    summary = _Inside(SUMMARY_FILE)
    report = _Inside(REPORT_DIR)
    checkpoints = _Inside(CHECKPOINT_DIR)
    kept = _Inside(CHECKPOINT_DIR, KEPT_FILE)
    best = _Inside(CHECKPOINT_DIR, f"best{WEIGHTS_SUFFIX}")
    last = _Inside(CHECKPOINT_DIR, f"last{WEIGHTS_SUFFIX}")
    # The previous `last`, kept while a new one is written.
    last_prev = _Inside(CHECKPOINT_DIR, f"last.prev{WEIGHTS_SUFFIX}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def cache_root(self) -> Path:
        """Preprocessing caches, beside the run folders so runs over the same images share."""
        return self.root.parent / ".cache"

    def checkpoint(self, name: str) -> Path:
        """The weights file of checkpoint `name` ("best", "last", ...)."""
        return self.checkpoints / f"{name}{WEIGHTS_SUFFIX}"

    def epoch_checkpoint(self, epoch: int) -> Path:
        """The weights file a kept epoch (0-based) is saved to when keep_best > 1."""
        return self.checkpoint(f"epoch-{epoch:04d}")

    def epoch_checkpoints(self) -> dict[int, Path]:
        """The epoch-NNNN checkpoints present (any of their files), by epoch: metadata path."""
        found: dict[int, Path] = {}
        for file in sorted(self.checkpoints.glob("epoch-*")):
            match = _EPOCH_FILE.match(file.name)
            if match is not None:
                found[int(match["epoch"])] = checkpoint_paths(file)[2]
        return found

    def is_run(self) -> bool:
        return self.config.is_file()


# --------------------------------------------------------------------------------------------
# JSON files: summary.json, kept.json
# --------------------------------------------------------------------------------------------


def json_value(value: Any) -> float | None:
    """A float for summary.json / kept.json, None for NaN or infinite (no AUROC, nothing to
    rank by): JSON has no such numbers."""
    value = float(value)
    return value if math.isfinite(value) else None


def read_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON file; an unreadable one is an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc


def write_summary(folder: RunFolder, summary: Mapping[str, Any]) -> None:
    atomic_write_text(folder.summary, json.dumps(dict(summary), indent=2))


def read_summary(folder: RunFolder) -> dict[str, Any]:
    """summary.json, written when a `train` call returns."""
    if not folder.summary.is_file():
        raise FileNotFoundError(f"{folder.root}: not a finished run folder (no {SUMMARY_FILE})")
    return read_json(folder.summary)


def write_kept(
    folder: RunFolder, kept: Sequence[Mapping[str, Any]], *, select_best: str, keep_best: int
) -> None:
    """checkpoints/kept.json: the ranking (rank, epoch, value, path), best first, atomically."""
    data = {"select_best": select_best, "keep_best": keep_best, "kept": [dict(e) for e in kept]}
    atomic_write_text(folder.kept, json.dumps(data, indent=2))


def read_kept(folder: RunFolder) -> dict[str, Any]:
    """kept.json's contents, checked for the list of kept checkpoints."""
    if not folder.kept.is_file():
        raise FileNotFoundError(
            f"{folder.root}: run folder has no {CHECKPOINT_DIR}/{KEPT_FILE} "
            "(no epoch finished yet?)"
        )
    data = read_json(folder.kept)
    if not isinstance(data.get("kept"), list):
        raise ValueError(f"{folder.kept}: no list of kept checkpoints under 'kept'")
    return data


def _inside_run(folder: RunFolder, path: Any) -> Path:
    """A kept.json path, refused unless relative and inside the run: a crafted kept.json must
    not make `RUN:bestK` load checkpoints from elsewhere."""
    pure = PurePosixPath(path) if isinstance(path, str) else None
    if pure is None or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(
            f"{folder.kept}: kept checkpoint path {path!r} is outside the run folder "
            f"{folder.root} (paths there are relative, without '..')"
        )
    return Path(pure)


def best_k(folder: RunFolder, k: int) -> list[Path]:
    """A run's `k` best checkpoints, best first, as its kept.json ranks them.

    Kept checkpoints are named by epoch, so only this file says which ranks where.
    """
    data = read_kept(folder)
    kept = data["kept"]
    if k < 1 or len(kept) < k:
        raise ValueError(
            f"{folder.root}:best{k}: the run keeps {len(kept)} checkpoint(s) "
            f"(keep_best={data.get('keep_best')}), so K must be 1 to {len(kept)}"
        )
    paths = []
    for entry in kept[:k]:
        path = folder.root / _inside_run(folder, entry.get("path"))
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder.root}: kept checkpoint {entry['rank']} ({path}) is missing"
            )
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# metrics.csv
# --------------------------------------------------------------------------------------------


def write_metrics(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    frame = pd.DataFrame(list(rows), columns=list(METRIC_COLUMNS))
    atomic_write_text(path, frame_csv(frame, index=False))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics.csv, empty cells as None; checked for the columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} in run folder {path.parent}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable metrics CSV ({err})") from err
    missing = [c for c in REQUIRED_METRIC_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected cxrlabel train's layout")
    # object dtype first: otherwise a float column turns None back into NaN.
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def read_metrics_until(path: Path, up_to_step: int, before_epoch: int) -> list[dict[str, Any]]:
    """Rows of an interrupted run's metrics.csv that its checkpoint covers: steps up to
    `up_to_step`, epoch rows of epochs before `before_epoch` (the one in progress); [] when
    there is no file yet.

    The file is written before `last`, so after a kill it may run ahead of it; an epoch's row
    shares its last step's number, so the epoch filter keeps an epoch that `last` stopped at
    the end of, but had not yet validated, from being recorded twice.
    """
    if not Path(path).is_file():
        return []
    return [
        row
        for row in read_metrics(path)
        if row["step"] <= up_to_step and (row["kind"] != "epoch" or row["epoch"] < before_epoch)
    ]


# --------------------------------------------------------------------------------------------
# Model specs: RUN, RUN:bestK, checkpoint files
# --------------------------------------------------------------------------------------------


def split_best_k(spec: str | Path) -> tuple[Path, int | None]:
    """`RUN:bestK` -> (RUN, K); anything else -> (the path, None)."""
    match = _BEST_K.match(str(spec))
    if match is None:
        return Path(spec), None
    return Path(match["run"]), int(match["k"])


def split_folds(spec: str | Path) -> tuple[Path, bool]:
    """`RUN:folds` -> (RUN, True); anything else -> (the path, False)."""
    text = str(spec)
    if text.endswith(FOLDS_SUFFIX) and len(text) > len(FOLDS_SUFFIX):
        return Path(text[: -len(FOLDS_SUFFIX)]), True
    return Path(spec), False


def fold_dir(root: Path, fold: int) -> Path:
    """The folder of cross-validation fold `fold` (1-based) under `root`."""
    return Path(root) / f"{FOLD_PREFIX}{fold}"


def fold_dirs(root: Path) -> list[Path]:
    """The fold-K folders under `root`, in fold order (fold-2 before fold-10)."""
    root = Path(root)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _FOLD_DIR.match(child.name)
            if match is not None and child.is_dir():
                found.append((int(match["k"]), child))
    return [path for _, path in sorted(found)]


def fold_checkpoints(root: Path) -> list[Path]:
    """`RUN:folds`: the best checkpoint of every fold folder under RUN, in fold order.

    A fine-tuning cross-validation names its folder (RUN/fold-K/ are run folders); a heads one
    names a model's folder (RUN/<Model>/fold-K/).
    """
    root = Path(root)
    folds = fold_dirs(root)
    if not folds:
        models = sorted(p.name for p in root.iterdir() if fold_dirs(p)) if root.is_dir() else []
        hint = (
            f"; it is a heads cross-validation: name a model, e.g. {root / models[0]}{FOLDS_SUFFIX}"
            f" (models: {models})"
            if models
            else " (folds come from `cxrlabel cv`)"
        )
        raise FileNotFoundError(f"{root}{FOLDS_SUFFIX}: no {FOLD_PREFIX}* folders in {root}{hint}")
    paths = []
    for folder in folds:
        best = RunFolder(folder).best
        if not best.is_file():
            raise FileNotFoundError(
                f"{root}{FOLDS_SUFFIX}: {folder} has no {best.relative_to(folder).as_posix()} "
                "(an unfinished fold?)"
            )
        paths.append(best)
    return paths


def resolve_model_paths(specs: Sequence[str | Path]) -> list[Path]:
    """Run folders (their best checkpoint), `RUN:bestK`, `RUN:folds` (every cross-validation
    fold's best checkpoint) and checkpoint files -> checkpoint weight files, in order."""
    if not specs:
        raise ValueError("no model given: name a run folder or a checkpoint")
    paths: list[Path] = []
    for spec in specs:
        folds_root, is_folds = split_folds(spec)
        if is_folds:
            paths.extend(fold_checkpoints(folds_root))
            continue
        path, k = split_best_k(spec)
        if k is not None:
            paths.extend(best_k(RunFolder(path), k))
        elif path.is_dir():
            best = RunFolder(path).best
            if not best.is_file():
                hint = (
                    f" (cross-validation folds: use {path}{FOLDS_SUFFIX})"
                    if fold_dirs(path)
                    else ""
                )
                raise FileNotFoundError(
                    f"{path}: run folder has no {best.relative_to(path).as_posix()}{hint}"
                )
            paths.append(best)
        else:
            weights, _, meta = checkpoint_paths(path)
            if not meta.is_file():
                raise FileNotFoundError(f"{spec}: not a run folder or a checkpoint")
            paths.append(weights)
    return paths


def run_dir_of(spec: str | Path) -> Path | None:
    """The run folder a model spec belongs to (a run, `RUN:bestK`, or a checkpoint in
    `RUN/checkpoints/`), or None for a checkpoint outside any run folder."""
    path, _ = split_best_k(spec)
    if path.is_dir():
        return path if RunFolder(path).is_run() else None
    if path.parent.name == CHECKPOINT_DIR and RunFolder(path.parent.parent).is_run():
        return path.parent.parent
    return None
