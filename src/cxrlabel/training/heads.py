"""Approach 1, "train many heads": feed-forward heads on cached frozen-backbone features.

Each backbone x head pair a run trains becomes an ordinary checkpoint (models.checkpoint): a
`CXRModel` whose backbone is the frozen backbone the features were extracted with and whose
head is the trained head, with the extraction preprocessing, the labels, thresholds chosen on
the validation split and the run's `HeadConfig`. So `label`, `serve`, `evaluate --model`,
`export --onnx` and ensembles take it like a fine-tuned model.

Run folder (`<runs_dir>/<name>`, or the folder given)::

    config.yaml                      the HeadConfig (kind: heads)
    features/<part>-<backbone>-<fp>  feature caches (training.features), one per table x backbone
    splits/split.csv                 the patient split, when valid_csv is empty
    <Model>/checkpoints/best.*       the checkpoint, e.g. Xception_3_D/checkpoints/best.json
    sweep.csv, sweep.md              (sweep) the method's Table I, with each checkpoint's path
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlabel.config import HeadConfig
from cxrlabel.csvcells import frame_csv
from cxrlabel.data.labels import LabelTable, resolve_labels
from cxrlabel.data.transforms import Preprocessing
from cxrlabel.distributed import DistEnv, destroy_process_group, dist_env, init_process_group
from cxrlabel.evaluation.metrics import metrics_table
from cxrlabel.evaluation.tables import markdown_table
from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.factory import (
    HEADS,
    CXRModel,
    ModelSpec,
    create_head,
    make_keras_compatible,
    masked_bce_loss,
    model_display_name,
)
from cxrlabel.models.thresholds import Thresholds, choose_thresholds
from cxrlabel.training.features import (
    FeatureSet,
    build_backbone,
    default_size,
    extraction_preprocessing,
    features_for,
    weights_identity,
)
from cxrlabel.training.finetune import load_tables

log = logging.getLogger(__name__)

# The sweep's columns in the method's Table I layout, and the metrics.metrics_table column each
# one is read from.
METRICS = ("Acc", "Prec", "Recall", "F Score", "AUROC")
_METRIC_SOURCE = {"Acc": "Accuracy", "Prec": "Precision", "Recall": "Recall", "F Score": "F1"}
CHECKPOINT_COLUMN = "Checkpoint"
SWEEP_COLUMNS = ("Model", *METRICS, CHECKPOINT_COLUMN)
CONFIG_FILE, FEATURES_DIR = "config.yaml", "features"
CHECKPOINT_STEM = Path("checkpoints") / "best"


# ---------------------------------------------------------------------------------------------
# Heads on feature matrices


def train_head(
    features: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    head_kind: str,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    hidden: int = 256,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train one head on cached features with Adam and the masked BCE loss; returns it in eval.

    `on_epoch(epoch, mean_loss)` is called after each epoch (for logging or loss curves).
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if not len(x) == len(y) == len(m):
        raise ValueError(
            f"features, targets and mask differ in length: {len(x)}, {len(y)}, {len(m)}"
        )
    # fork_rng + seed: init and dropout masks are reproducible for a seed, and the caller's
    # global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = create_head(head_kind, x.shape[1], y.shape[1], hidden)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        head.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            mean_loss = _epoch(head, optimizer, (x, y, m), order, batch_size)
            log.debug("%s epoch %d: loss %.4f", head_kind, epoch + 1, mean_loss)
            if on_epoch is not None:
                on_epoch(epoch, mean_loss)
    return head.eval()


def _epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    order: torch.Tensor,
    batch_size: int,
) -> float:
    """One pass over `data` (features, targets, mask) in `order`; the mean loss per image."""
    x, y, m = data
    total = 0.0
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        loss = masked_bce_loss(head(x[idx]), y[idx], m[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / max(len(x), 1)


@torch.inference_mode()
def predict_head(head: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Sigmoid probabilities [M, K] of a trained head."""
    head.eval()
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    out = [torch.sigmoid(head(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def evaluate_head(
    head: nn.Module,
    features: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray,
    labels,
    thresholds: Thresholds | float = 0.5,
) -> pd.DataFrame:
    """metrics.metrics_table for a head's predictions (per label + 'Mean')."""
    probs = predict_head(head, features)
    return metrics_table(targets, probs, mask, resolve_labels(labels), thresholds)


# ---------------------------------------------------------------------------------------------
# One backbone: its features, its frozen network, its identity


@dataclass(frozen=True)
class HeadRun:
    """One approach-1 run: its config, its filtered train and valid tables, and its folder."""

    config: HeadConfig
    train: LabelTable
    valid: LabelTable
    run_dir: Path
    # What `valid` is, for thresholds' chosen_on; empty: from the config (valid_csv or split).
    valid_source: str = ""

    @property
    def tables(self) -> tuple[LabelTable, LabelTable]:
        return self.train, self.valid


@dataclass
class BackboneData:
    """What every head on one backbone shares: features of both parts, and the network."""

    name: str
    preprocessing: Preprocessing
    train: FeatureSet
    valid: FeatureSet
    network: nn.Module
    source: dict[str, Any]  # checkpoint metadata naming the backbone and its weights


def run_dir_of(config: HeadConfig) -> Path:
    return Path(config.runs_dir) / config.name


def preprocessing_of(config: HeadConfig, backbone: str) -> Preprocessing:
    """The extraction (and so the checkpoint's) preprocessing; size 0: the method's size."""
    size = config.size or default_size(backbone)
    return extraction_preprocessing(backbone, size, config.resize_mode)


def _file_sha256(weights: str) -> str | None:
    """sha256 of a weights file; None for 'imagenet' / 'none' (no file of ours)."""
    if weights in ("imagenet", "none"):
        return None
    with open(weights, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def backbone_source(config: HeadConfig, backbone: str) -> dict[str, Any]:
    """The `frozen_backbone` metadata of a checkpoint: which network and weights, exactly."""
    return {
        "backbone": backbone,
        "weights": config.weights,
        "weights_identity": weights_identity(config.weights),
        "weights_sha256": _file_sha256(config.weights),
        "keras_compat": config.keras_compat,
    }


def _extract(
    run: HeadRun,
    backbone: str,
    *,
    overwrite: bool = False,
    progress: bool = True,
    env: DistEnv | None = None,
) -> tuple[Preprocessing, FeatureSet, FeatureSet]:
    config = run.config
    prep = preprocessing_of(config, backbone)
    common = {
        "batch_size": config.extract_batch_size,
        "progress": progress,
        "overwrite": overwrite,
        "keras_compat": config.keras_compat,
        "resize_mode": config.resize_mode,
        "env": env,
    }
    cache_root = run.run_dir / FEATURES_DIR
    parts = [
        features_for(table, backbone, config.weights, prep, cache_root, part, **common)
        for table, part in zip(run.tables, ("train", "valid"), strict=True)
    ]
    return prep, parts[0], parts[1]


def frozen_network(config: HeadConfig, backbone: str) -> nn.Module:
    """The frozen backbone network the features come from (and checkpoints hold), in eval."""
    network, _ = build_backbone(backbone, config.weights, config.resize_mode)
    if config.keras_compat:
        make_keras_compatible(network)
    return network.eval()


def backbone_data(run: HeadRun, backbone: str, *, progress: bool = True) -> BackboneData:
    """Features of the train and valid tables (cached under run_dir/features) and the network."""
    config = run.config
    prep, train, valid = _extract(run, backbone, progress=progress)
    return BackboneData(
        backbone, prep, train, valid, frozen_network(config, backbone),
        backbone_source(config, backbone),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# One model: train a head, choose its thresholds, save it as a checkpoint


def _check_heads(config: HeadConfig) -> None:
    unknown = sorted(set(config.heads) - set(HEADS))
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; choose from {sorted(HEADS)}")


def _valid_source(run: HeadRun) -> str:
    if run.valid_source:
        return run.valid_source
    config = run.config
    if config.valid_csv:
        return Path(config.valid_csv).name
    return f"{config.valid_fraction:.0%} patient split of {Path(config.train_csv).name}"


@dataclass(frozen=True)
class FittedModel:
    """A head trained on one backbone's features, as a whole model, with its thresholds and
    validation metrics (Table I's columns)."""

    name: str  # e.g. "Xception_3_D"
    model: CXRModel
    thresholds: Thresholds
    metrics: dict[str, float]


def fit_model(run: HeadRun, data: BackboneData, head_kind: str) -> FittedModel:
    """Train `head_kind` on `data.train`; thresholds and metrics on `data.valid`."""
    config = run.config
    labels = resolve_labels(config.labels)
    # LSR policies give soft targets for training only; thresholds need validation's 0/1.
    y_train, m_train = data.train.targets(run.train, labels, config.policy, seed=config.seed)
    y_valid, m_valid = data.valid.targets(run.valid, labels, config.policy)
    head = train_head(
        data.train.features, y_train, m_train, head_kind,
        epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
        hidden=config.hidden,
    )  # fmt: skip
    probs = predict_head(head, data.valid.features)
    thresholds = choose_thresholds(
        y_valid, probs, m_valid, labels, config.threshold_rule,
        chosen_on=_valid_source(run), band=config.uncertainty_band,
    )  # fmt: skip
    table = metrics_table(y_valid, probs, m_valid, labels, thresholds)
    mean = table.set_index("Label").loc["Mean"]
    spec = ModelSpec(backbone=data.name, head=head_kind, labels=labels, hidden=config.hidden)
    model = CXRModel(data.network, head, spec, data.preprocessing)
    metrics = {m: float(mean[_METRIC_SOURCE.get(m, m)]) for m in METRICS}
    return FittedModel(model_display_name(data.name, head_kind), model, thresholds, metrics)


def save_model(
    run: HeadRun,
    data: BackboneData,
    fitted: FittedModel,
    folder: Path,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """`fitted` as an ordinary checkpoint `<folder>/checkpoints/best.*`; its JSON path."""
    config = run.config
    # The config of this model alone (train-head with it reproduces the model). No config.yaml
    # in the folder: that would make it look like a fine-tuning run folder to the report.
    own = replace(config, backbones=(data.name,), heads=(fitted.model.spec.head,))
    return save_checkpoint(
        Path(folder) / CHECKPOINT_STEM, fitted.model,
        config=own.to_dict(), epoch=config.epochs, step=0, thresholds=fitted.thresholds,
        extra={"valid_metrics": fitted.metrics, "valid_images": len(data.valid), **(extra or {})},
        frozen_backbone=data.source,
    )  # fmt: skip


def train_model(run: HeadRun, data: BackboneData, head_kind: str) -> dict[str, Any]:
    """Train `head_kind` on `data`, save `<run_dir>/<Model>/checkpoints/best.*`; its sweep row."""
    fitted = fit_model(run, data, head_kind)
    checkpoint = save_model(run, data, fitted, run.run_dir / fitted.name)
    log.info("%s: mean AUROC %.3f -> %s", fitted.name, fitted.metrics["AUROC"], checkpoint)
    return {
        "Model": fitted.name,
        **fitted.metrics,
        CHECKPOINT_COLUMN: str(checkpoint.relative_to(run.run_dir)),
    }


def sweep(run: HeadRun, *, progress: bool = True) -> pd.DataFrame:
    """Frozen backbone x head grid: one row per model ("Xception_3_D") and its checkpoint.

    Features are extracted once per backbone and table part (filtered train, valid); each head
    trains on the train features, gets thresholds and metrics on the valid features, and is
    saved under `run_dir/<Model>/checkpoints/best`.
    """
    _check_heads(run.config)
    rows = []
    for backbone in run.config.backbones:
        data = backbone_data(run, backbone, progress=progress)
        rows.extend(train_model(run, data, head) for head in run.config.heads)
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


def format_sweep_table(df: pd.DataFrame) -> str:
    """Markdown in the layout of the method's Table I (Model | Acc | Prec | Recall | F | AUROC),
    plus where each model's checkpoint is."""
    return markdown_table(df, list(SWEEP_COLUMNS), digits=2)


# ---------------------------------------------------------------------------------------------
# Entry points for the CLI: a config in, a run folder out.


def _prepare(config: HeadConfig, run_dir: Path | None, env: DistEnv | None = None) -> HeadRun:
    """The run with its tables loaded and filtered, and its config.yaml written (by rank 0
    only, under torchrun; the other ranks compute the same split without saving it)."""
    env = env or DistEnv.single()
    _check_heads(config)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_of(config)
    train, valid = load_tables(config, run_dir, save=env.is_main)  # type: ignore[arg-type]
    if env.is_main:
        config.save(run_dir / CONFIG_FILE)
    return HeadRun(config, train, valid, run_dir)


def run_extract(
    config: HeadConfig,
    run_dir: Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, tuple[FeatureSet, FeatureSet]]:
    """Extract (or find cached) train and valid features of every backbone of the config.

    `train-head` and `sweep` with the same config and run folder reuse them. Under torchrun
    every process calls this: they join one gloo process group (extraction runs on the CPU),
    share each table's batches and rank 0 writes the caches (training.features).
    """
    env = dist_env()
    owns_group = False
    if env.distributed:
        import torch.distributed as dist

        owns_group = not dist.is_initialized()
        init_process_group(env, "cpu")
    try:
        run = _prepare(config, run_dir, env)
        out = {}
        for backbone in config.backbones:
            _, train, valid = _extract(
                run, backbone, overwrite=overwrite, progress=progress, env=env
            )
            out[backbone] = (train, valid)
        return out
    finally:
        if owns_group:
            destroy_process_group()


def run_train_head(
    config: HeadConfig, run_dir: Path | None = None, *, progress: bool = True
) -> Path:
    """Train the config's one backbone x head model; returns its checkpoint's JSON path."""
    if len(config.backbones) != 1 or len(config.heads) != 1:
        raise ValueError(
            f"train-head trains one model: give one backbone and one head (got backbones "
            f"{list(config.backbones)}, heads {list(config.heads)}); `sweep` trains the grid"
        )
    run = _prepare(config, run_dir)
    row = train_model(run, backbone_data(run, config.backbones[0], progress=progress),
                      config.heads[0])  # fmt: skip
    return run.run_dir / row[CHECKPOINT_COLUMN]


def run_sweep(
    config: HeadConfig, run_dir: Path | None = None, *, progress: bool = True
) -> pd.DataFrame:
    """`sweep` of the config's tables into its run folder, table written as CSV and markdown."""
    run = _prepare(config, run_dir)
    df = sweep(run, progress=progress)
    atomic_write_text(run.run_dir / "sweep.csv", frame_csv(df, index=False))
    atomic_write_text(run.run_dir / "sweep.md", format_sweep_table(df))
    return df


__all__ = [
    "METRICS",
    "BackboneData",
    "FittedModel",
    "HeadRun",
    "backbone_data",
    "evaluate_head",
    "fit_model",
    "format_sweep_table",
    "predict_head",
    "run_dir_of",
    "run_extract",
    "run_sweep",
    "run_train_head",
    "save_model",
    "sweep",
    "train_head",
    "train_model",
]
