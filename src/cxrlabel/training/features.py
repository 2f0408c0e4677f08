"""Approach 1: a frozen backbone as feature extractor, feed-forward heads trained on its features.

The backbone is frozen, so its pooled features for an image never change: `extract_features`
runs it once per (images, backbone, weights, preprocessing) and stores the result; every head and
every epoch afterwards trains on the stored matrix in seconds.

Feature cache layout (one directory per table x backbone configuration):

    <cache_dir>/features.safetensors   "features" float32 [M, D], "rows" int64 [M]
    <cache_dir>/meta.json              fingerprint, backbone, weights, preprocessing, counts,
                                       skipped images; written last, so it marks completeness

`rows` are the positions in the table of the M images that were read; unreadable images are
skipped, listed in meta.json and left out of the matrix.

The fingerprint is a sha256 of: the cache format version; the dataset (every image's path, byte
size and mtime, via `cache.fingerprint`, plus all 14 label columns of the table); the backbone
name; the weights identity ('imagenet', 'none', or a file's resolved path, size and mtime); an
Keras-compatibility switch; and the full preprocessing dict (size, mean, std, resize
mode, interpolation). Rule: a cache directory whose fingerprint differs from the one asked for is
refused with `StaleFeatureCacheError` (pass `overwrite=True` to rebuild it in place); a matching
one is loaded instead of recomputing. `sweep` keeps one sub-directory per fingerprint, so changing
a setting there computes a new cache beside the old one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxrlabel.data.cache import ImageCache, Skipped
from cxrlabel.data.cache import fingerprint as files_fingerprint
from cxrlabel.data.dataset import CXRDataset, collate_skipping
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import (
    OBSERVATIONS,
    LabelTable,
    UncertaintyPolicy,
    filter_certain,
    filter_view,
    resolve_labels,
)
from cxrlabel.data.transforms import Preprocessing
from cxrlabel.evaluation.metrics import metrics_table
from cxrlabel.evaluation.tables import markdown_table
from cxrlabel.fileio import atomic_path, atomic_write_text
from cxrlabel.models.factory import (
    HEADS,
    create_backbone,
    create_head,
    make_keras_compatible,
    masked_bce_loss,
    model_display_name,
)

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1
# The sweep's columns in the method's Table I layout, and the metrics.metrics_table column each
# one is read from.
METRICS = ("Acc", "Prec", "Recall", "F Score", "AUROC")
_METRIC_SOURCE = {"Acc": "Accuracy", "Prec": "Precision", "Recall": "Recall", "F Score": "F1"}
FEATURES_FILE, FEATURES_META = "features.safetensors", "meta.json"

WeightsSpec = str | Path


class StaleFeatureCacheError(ValueError):
    """A feature cache that was computed for other images, labels, weights or preprocessing."""


@dataclass
class FeatureSet:
    """Pooled backbone features for the readable images of one table.

    features: float32 [M, D]; rows: int64 [M], each feature row's position in the table;
    skipped: the images that could not be read; reused: True when loaded from an existing cache.
    """

    features: np.ndarray
    rows: np.ndarray
    meta: dict
    cache_dir: Path
    skipped: list[Skipped] = field(default_factory=list)
    reused: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def targets(
        self,
        table: LabelTable,
        labels: Sequence[str] | str,
        policy: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets and mask [M, K] aligned with `features` (the table the set was built from)."""
        targets, mask = table.targets(resolve_labels(labels), policy)
        return targets[self.rows], mask[self.rows]


# ---------------------------------------------------------------------------------------------
# Fingerprint


def weights_identity(weights: WeightsSpec) -> str:
    """'imagenet' / 'none' as such; a file as resolved path + byte size + mtime.

    Size and mtime instead of a hash: hashing a 90 MB file on every call costs more than the
    check is worth, and replacing the file changes its mtime.
    """
    if str(weights) in ("imagenet", "none"):
        return str(weights)
    path = Path(weights).resolve()
    try:
        st = path.stat()
    except OSError:
        return f"{path}\0missing"
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"


def feature_fingerprint(
    table: LabelTable,
    backbone: str,
    weights: WeightsSpec,
    preprocessing: Preprocessing,
    *,
    keras_compat: bool = False,
) -> str:
    """The key a feature cache is stored under (see the module docstring for what it covers)."""
    values = table.values(OBSERVATIONS)
    # NaN has several bit patterns; a sentinel makes the bytes depend on the labels only.
    labels = np.where(np.isnan(values), -9.0, values).astype(np.float64)
    digest = hashlib.sha256()
    header = {
        "version": FEATURE_CACHE_VERSION,
        "backbone": backbone,
        "weights": weights_identity(weights),
        "keras_compat": keras_compat,
        "preprocessing": preprocessing.to_dict(),
        "images": files_fingerprint(table.image_paths(), preprocessing.geometry),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Cache read / write


def load_features(cache_dir: Path, expected_fingerprint: str | None = None) -> FeatureSet:
    """Load a complete feature cache; refuse it if its fingerprint is not the expected one."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / FEATURES_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{cache_dir}: no complete feature cache (missing {FEATURES_META})")
    meta = json.loads(meta_path.read_text())
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise StaleFeatureCacheError(
            f"{cache_dir}: feature cache was computed for other inputs "
            f"(backbone {meta.get('backbone')!r}, weights {meta.get('weights')!r}, "
            f"size {meta.get('preprocessing', {}).get('size')}, {meta.get('count')} images); "
            f"its fingerprint {str(meta.get('fingerprint'))[:12]} != "
            f"{expected_fingerprint[:12]}. Images, labels, weights or preprocessing changed: "
            "use another cache directory or rebuild it (overwrite=True / --overwrite)."
        )
    tensors = load_file(str(cache_dir / FEATURES_FILE))
    skipped = [Skipped(s["path"], s["reason"]) for s in meta.get("skipped", [])]
    return FeatureSet(
        features=tensors["features"].numpy(),
        rows=tensors["rows"].numpy(),
        meta=meta,
        cache_dir=cache_dir,
        skipped=skipped,
        reused=True,
    )


def _save_features(features: FeatureSet) -> None:
    cache_dir = features.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Old meta first: a crash mid-write must not leave a cache that looks complete.
    (cache_dir / FEATURES_META).unlink(missing_ok=True)
    tensors = {
        "features": torch.from_numpy(np.ascontiguousarray(features.features, dtype=np.float32)),
        "rows": torch.from_numpy(np.ascontiguousarray(features.rows, dtype=np.int64)),
    }
    with atomic_path(cache_dir / FEATURES_FILE) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(cache_dir / FEATURES_META, json.dumps(features.meta, indent=2))


# ---------------------------------------------------------------------------------------------
# Extraction


@torch.inference_mode()
def _run_backbone(
    model: nn.Module, dataset: CXRDataset, batch_size: int, progress: bool, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_skipping
    )
    chunks: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        if batch is None:
            continue
        chunks.append(model(batch["image"]).float().cpu().numpy())
        rows.append(batch["index"].numpy())
    if not chunks:
        raise ValueError("no readable images: nothing to extract features from")
    return np.concatenate(chunks).astype(np.float32), np.concatenate(rows).astype(np.int64)


def _build_backbone(
    backbone: str, weights: WeightsSpec, resize_mode: str
) -> tuple[nn.Module, Preprocessing]:
    # Fixed seed: with weights='none' the random init is then the same on every call, so a
    # rebuilt cache holds the same features (fork_rng leaves the caller's RNG untouched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(backbone, weights, resize_mode=resize_mode)


def extract_features(
    table: LabelTable,
    backbone_name: str,
    weights: WeightsSpec,
    preprocessing: Preprocessing | None,
    cache_dir: Path,
    *,
    batch_size: int = 32,
    image_cache: ImageCache | None = None,
    progress: bool = True,
    overwrite: bool = False,
    keras_compat: bool = False,
    resize_mode: str = "pad",
) -> FeatureSet:
    """Pooled features of every readable image of `table`, computed once and cached.

    preprocessing None uses the backbone's own (native size). A cache in `cache_dir` with the
    same fingerprint is loaded; one with another fingerprint raises StaleFeatureCacheError unless
    `overwrite` (then it is recomputed in place). `keras_compat` makes the backbone compute
    exactly what Keras does with the same weights (see models.make_keras_compatible).
    """
    cache_dir = Path(cache_dir)
    model: nn.Module | None = None
    prep = preprocessing
    if prep is None:
        model, prep = _build_backbone(backbone_name, weights, resize_mode)
    key = feature_fingerprint(table, backbone_name, weights, prep, keras_compat=keras_compat)
    if (cache_dir / FEATURES_META).is_file():
        try:
            found = load_features(cache_dir, key)
            log.info("%s: feature cache is up to date (%d images)", cache_dir, len(found))
            return found
        except StaleFeatureCacheError:
            if not overwrite:
                raise
            log.info("%s: feature cache is stale; recomputing (overwrite=True)", cache_dir)

    if model is None:
        model, _ = _build_backbone(backbone_name, weights, resize_mode)
    if keras_compat:
        make_keras_compatible(model)
    model.eval()
    dataset = CXRDataset(
        table, OBSERVATIONS, prep, cache=image_cache, on_error="skip", policy="U-Ignore"
    )
    feats, rows = _run_backbone(model, dataset, batch_size, progress, desc=backbone_name)
    skipped = list(dataset.skipped)
    if skipped:
        log.warning("%d image(s) skipped, e.g. %s", len(skipped), skipped[0])
    meta = {
        "version": FEATURE_CACHE_VERSION,
        "fingerprint": key,
        "backbone": backbone_name,
        "weights": str(weights),
        "weights_identity": weights_identity(weights),
        "keras_compat": keras_compat,
        "preprocessing": prep.to_dict(),
        "table_rows": len(table),
        "count": len(rows),
        "dim": int(feats.shape[1]),
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
    }
    result = FeatureSet(feats, rows, meta, cache_dir, skipped=skipped, reused=False)
    _save_features(result)
    log.info("%s: cached %d x %d features", cache_dir, *feats.shape)
    return result


# ---------------------------------------------------------------------------------------------
# Heads


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
        _fit_head(head, x, y, m, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  name=head_kind, on_epoch=on_epoch)  # fmt: skip
    return head.eval()


def _fit_head(
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    name: str,
    on_epoch: Callable[[int, float], None] | None,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = masked_bce_loss(head(x[idx]), y[idx], m[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        mean_loss = total / max(len(x), 1)
        log.debug("%s epoch %d: loss %.4f", name, epoch + 1, mean_loss)
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)


@torch.inference_mode()
def predict_head(head: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Sigmoid probabilities [M, K] of a trained head."""
    head.eval()
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    out = [torch.sigmoid(head(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The method's first experiment


def default_size(backbone: str) -> int:
    """The method's input sizes: 224 for MobileNet, 220 for the other backbones."""
    return 224 if backbone == "mobilenet" else 220


def _size_of(backbone: str, size_for: Mapping[str, int] | Callable[[str], int] | None) -> int:
    if size_for is None:
        return default_size(backbone)
    if isinstance(size_for, Mapping):
        return int(size_for.get(backbone, default_size(backbone)))
    return int(size_for(backbone))


def _weights_of(backbone: str, weights: WeightsSpec | Mapping[str, WeightsSpec]) -> WeightsSpec:
    if isinstance(weights, Mapping):
        return weights.get(backbone, "imagenet")
    return weights


def _preprocessing_for(backbone: str, size: int, resize_mode: str) -> Preprocessing:
    """The backbone's normalisation (from its architecture's pretrained config) at `size`."""
    # weights='none': only the config is needed, and it must not trigger a download.
    _, native = create_backbone(backbone, "none", resize_mode=resize_mode)
    return Preprocessing(size, native.mean, native.std, native.resize_mode, native.interpolation)


def features_for(
    table: LabelTable,
    backbone: str,
    weights: WeightsSpec,
    preprocessing: Preprocessing,
    cache_root: Path,
    part: str,
    **kwargs,
) -> FeatureSet:
    """`extract_features` into `<cache_root>/<part>-<backbone>-<fingerprint[:16]>`."""
    key = feature_fingerprint(
        table, backbone, weights, preprocessing, keras_compat=kwargs.get("keras_compat", False)
    )
    cache_dir = Path(cache_root) / f"{part}-{backbone}-{key[:16]}"
    return extract_features(table, backbone, weights, preprocessing, cache_dir, **kwargs)


def evaluate_head(
    head: nn.Module, features: np.ndarray, targets: np.ndarray, mask: np.ndarray, labels
) -> pd.DataFrame:
    """metrics.metrics_table for a head's predictions (per label + 'Mean', threshold 0.5)."""
    return metrics_table(targets, predict_head(head, features), mask, resolve_labels(labels))


def sweep(
    train_table: LabelTable,
    valid_table: LabelTable,
    backbones: Sequence[str],
    heads: Sequence[str] = tuple(HEADS),
    *,
    labels: Sequence[str] | str = "competition",
    weights: WeightsSpec | Mapping[str, WeightsSpec] = "imagenet",
    size_for: Mapping[str, int] | Callable[[str], int] | None = None,
    cache_dir: Path,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    hidden: int = 256,
    seed: int = 0,
    policy: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    certain_only: bool = True,
    extract_batch_size: int = 32,
    resize_mode: str = "pad",
    progress: bool = True,
) -> pd.DataFrame:
    """Frozen backbone x head grid: one row per model ("Xception_3_D"), the five mean metrics.

    Features are extracted once per backbone and table part; each head trains on the train
    features and is evaluated on the valid features. Protocol defaults follow the method: the
    five competition labels, images with at least one certain label among them, U-Ignore.
    """
    labels = resolve_labels(labels)
    if certain_only:
        train_table = filter_certain(train_table, labels)
        valid_table = filter_certain(valid_table, labels)
    rows = []
    for backbone in backbones:
        w = _weights_of(backbone, weights)
        prep = _preprocessing_for(backbone, _size_of(backbone, size_for), resize_mode)
        common = {"batch_size": extract_batch_size, "progress": progress}
        train = features_for(train_table, backbone, w, prep, cache_dir, "train", **common)
        valid = features_for(valid_table, backbone, w, prep, cache_dir, "valid", **common)
        y_train, m_train = train.targets(train_table, labels, policy)
        y_valid, m_valid = valid.targets(valid_table, labels, policy)
        for head_kind in heads:
            head = train_head(
                train.features, y_train, m_train, head_kind,
                epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, hidden=hidden,
            )  # fmt: skip
            table = evaluate_head(head, valid.features, y_valid, m_valid, labels)
            mean = table.set_index("Label").loc["Mean"]
            row = {"Model": model_display_name(backbone, head_kind)}
            row.update({m: float(mean[_METRIC_SOURCE.get(m, m)]) for m in METRICS})
            rows.append(row)
            log.info("%s: mean AUROC %.3f", row["Model"], row["AUROC"])
    return pd.DataFrame(rows, columns=["Model", *METRICS])


def format_sweep_table(df: pd.DataFrame) -> str:
    """Markdown in the layout of the method's Table I: Model | Acc | Prec | Recall | F | AUROC."""
    return markdown_table(df, ["Model", *METRICS], digits=2)


# ---------------------------------------------------------------------------------------------
# Entry points for the CLI: explicit parameters, files in and out.


def _load_filtered(
    csv: Path, fmt: str, view: str, labels: Sequence[str] | str, certain_only: bool
) -> LabelTable:
    table = filter_view(load_table(Path(csv), fmt), view)
    return filter_certain(table, resolve_labels(labels)) if certain_only else table


def run_extract(
    csv: Path,
    cache_dir: Path,
    *,
    backbone: str,
    weights: WeightsSpec = "imagenet",
    size: int | None = None,
    fmt: str = "auto",
    view: str = "all",
    labels: Sequence[str] | str = "competition",
    certain_only: bool = True,
    batch_size: int = 32,
    resize_mode: str = "pad",
    keras_compat: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FeatureSet:
    """Load a label CSV, filter it like the sweep does, and extract its features into cache_dir.

    size None means the method's default for the backbone (224 MobileNet, 220 others).
    """
    table = _load_filtered(csv, fmt, view, labels, certain_only)
    prep = _preprocessing_for(backbone, size or default_size(backbone), resize_mode)
    return extract_features(
        table, backbone, weights, prep, Path(cache_dir),
        batch_size=batch_size, progress=progress, overwrite=overwrite, keras_compat=keras_compat,
        resize_mode=resize_mode,
    )  # fmt: skip


def run_train_head(
    csv: Path,
    cache_dir: Path,
    out: Path,
    *,
    head: str,
    epochs: int,
    fmt: str = "auto",
    view: str = "all",
    labels: Sequence[str] | str = "competition",
    certain_only: bool = True,
    policy: UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    lr: float = 1e-3,
    batch_size: int = 64,
    hidden: int = 256,
    seed: int = 0,
) -> Path:
    """Train a head on a feature cache made by `run_extract` for the same CSV and filters.

    The table is reloaded and the cache's fingerprint re-checked against it, so features and
    labels cannot drift apart. Writes `out` (safetensors head weights) and `out`.json (spec).
    """
    table = _load_filtered(csv, fmt, view, labels, certain_only)
    meta = json.loads((Path(cache_dir) / FEATURES_META).read_text())
    prep = Preprocessing.from_dict(meta["preprocessing"])
    key = feature_fingerprint(
        table, meta["backbone"], meta["weights"], prep, keras_compat=meta["keras_compat"]
    )
    features = load_features(Path(cache_dir), key)
    label_names = resolve_labels(labels)
    y, m = features.targets(table, label_names, policy)
    model = train_head(
        features.features, y, m, head,
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, hidden=hidden,
    )  # fmt: skip
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    spec = {
        "head": head,
        "hidden": hidden,
        "labels": list(label_names),
        "in_features": features.dim,
        "backbone": meta["backbone"],
        "weights": meta["weights"],
        "preprocessing": meta["preprocessing"],
        "feature_fingerprint": key,
        "name": model_display_name(meta["backbone"], head),
    }
    atomic_write_text(out.with_suffix(out.suffix + ".json"), json.dumps(spec, indent=2))
    return out


def run_sweep(
    train_csv: Path,
    valid_csv: Path,
    cache_dir: Path,
    *,
    backbones: Sequence[str],
    heads: Sequence[str] = tuple(HEADS),
    weights: WeightsSpec | Mapping[str, WeightsSpec] = "imagenet",
    sizes: Mapping[str, int] | None = None,
    fmt: str = "auto",
    view: str = "all",
    labels: Sequence[str] | str = "competition",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    hidden: int = 256,
    seed: int = 0,
    out_csv: Path | None = None,
    out_markdown: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Load train/valid CSVs, run `sweep`, optionally write the table as CSV and markdown."""
    train = filter_view(load_table(Path(train_csv), fmt), view)
    valid = filter_view(load_table(Path(valid_csv), fmt), view)
    df = sweep(
        train, valid, backbones, heads,
        labels=labels, weights=weights, size_for=sizes, cache_dir=Path(cache_dir),
        epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden, seed=seed, progress=progress,
    )  # fmt: skip
    if out_csv is not None:
        atomic_write_text(Path(out_csv), df.to_csv(index=False))
    if out_markdown is not None:
        atomic_write_text(Path(out_markdown), format_sweep_table(df))
    return df


__all__ = [
    "FeatureSet",
    "StaleFeatureCacheError",
    "default_size",
    "evaluate_head",
    "extract_features",
    "feature_fingerprint",
    "features_for",
    "format_sweep_table",
    "load_features",
    "predict_head",
    "run_extract",
    "run_sweep",
    "run_train_head",
    "sweep",
    "train_head",
    "weights_identity",
]
