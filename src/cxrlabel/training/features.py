"""Approach 1, "extract once": a frozen backbone's pooled features, computed once and cached.

The backbone is frozen, so its pooled features for an image never change: `extract_features`
runs it once per (images, backbone, weights, preprocessing) and stores the result; every head and
every epoch afterwards (training.heads) trains on the stored matrix in seconds.

Feature cache layout (one directory per table x backbone configuration):

    <cache_dir>/features.safetensors   "features" float32 [M, D], "rows" int64 [M]
    <cache_dir>/meta.json              fingerprint, backbone, weights, preprocessing, counts,
                                       skipped images; written last, so it marks completeness

`rows` are the positions in the table of the M images that were read; unreadable images are
skipped, listed in meta.json and left out of the matrix.

While it runs, an extraction journals each finished batch as its own file,
`<cache_dir>/.cxrlabel-parts/batch-NNNNNN.safetensors` (features, rows and the batch's skipped
images, tagged with the fingerprint and batch size), written atomically. Batch b is the
dataset's positions [b*B, (b+1)*B) for batch size B, whatever the number of processes. A run
started again skips the batches already on disk with its tag (others are recomputed), so a
killed extraction continues where it stopped. Under torchrun (cxrlabel.distributed) batch b goes
to rank b % N, so every batch has the shape and contents it has in one process and the features
are bit-identical; after a barrier rank 0 merges the parts in batch order into the two cache
files, byte-identical to a one-process run, and removes the parts folder. Other ranks write only
their parts.

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
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cxrlabel.data.cache import ImageCache, Skipped
from cxrlabel.data.cache import fingerprint as files_fingerprint
from cxrlabel.data.dataset import CXRDataset, collate_skipping
from cxrlabel.data.labels import (
    OBSERVATIONS,
    LabelPolicy,
    LabelTable,
    UncertaintyPolicy,
    resolve_labels,
)
from cxrlabel.data.transforms import Preprocessing
from cxrlabel.distributed import DistEnv, barrier
from cxrlabel.fileio import atomic_path, atomic_write_text
from cxrlabel.models.factory import TINY_PREPROCESSING, create_backbone, make_keras_compatible

log = logging.getLogger(__name__)

FEATURE_CACHE_VERSION = 1
FEATURES_FILE, FEATURES_META = "features.safetensors", "meta.json"
PARTS_DIR = ".cxrlabel-parts"  # the journal of an unfinished extraction, inside its cache_dir

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
        policy: LabelPolicy | UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
        *,
        seed: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets and mask [M, K] aligned with `features` (the table the set was built from);
        `seed` draws LSR soft targets (`LabelTable.targets`), none gives 0/1 ones."""
        targets, mask = table.targets(resolve_labels(labels), policy, seed=seed)
        return targets[self.rows], mask[self.rows]

    def subset(self, positions: np.ndarray | Sequence[int]) -> FeatureSet:
        """The features of table rows `positions`, re-indexed to `table.subset(positions)`.

        `positions` are increasing positions in the table this set was built from (what
        `np.flatnonzero` of a row mask gives); images of them that were skipped stay absent.
        So features extracted once for a whole table serve each part of it (cross-validation
        folds) without re-running the backbone.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and np.any(np.diff(positions) <= 0):
            raise ValueError("positions must be strictly increasing table positions")
        keep = np.isin(self.rows, positions)
        rows = np.searchsorted(positions, self.rows[keep]).astype(np.int64)
        return FeatureSet(self.features[keep], rows, self.meta, self.cache_dir, [], self.reused)


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


@dataclass(frozen=True)
class FeaturePart:
    """One batch's pooled features (float32 [n, D]; [0, 0] when none of its images could be
    read), their table rows (int64 [n]) and the images of the batch that were skipped."""

    features: np.ndarray
    rows: np.ndarray
    skipped: list[Skipped]


def part_path(parts_dir: Path, batch: int) -> Path:
    return Path(parts_dir) / f"batch-{batch:06d}.safetensors"


def _part_tag(fingerprint: str, batch_size: int, batch: int) -> dict[str, str]:
    # The batch size is part of the tag: batch b covers other images at another batch size.
    return {"fingerprint": fingerprint, "batch_size": str(batch_size), "batch": str(batch)}


def write_part(path: Path, part: FeaturePart, tag: dict[str, str]) -> None:
    """One finished batch, atomically, with its tag and skipped images in the metadata."""
    tensors = {
        "features": torch.from_numpy(np.ascontiguousarray(part.features, dtype=np.float32)),
        "rows": torch.from_numpy(np.ascontiguousarray(part.rows, dtype=np.int64)),
    }
    skipped = json.dumps([{"path": s.path, "reason": s.reason} for s in part.skipped])
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**tag, "skipped": skipped})


def _stored_tag(path: Path) -> dict[str, str] | None:
    """The tag of a part file; None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as exc:
        log.warning("%s: unreadable feature part, recomputing it (%s)", path, exc)
        return None
    return {key: metadata.get(key, "") for key in ("fingerprint", "batch_size", "batch")}


def read_part(path: Path, tag: dict[str, str]) -> FeaturePart:
    """A part file written with `tag`; a missing or other extraction's part is an error."""
    if _stored_tag(path) != tag:
        raise RuntimeError(
            f"{path}: feature part of batch {tag['batch']} is missing or belongs to another "
            "extraction (a rank did not finish its batches?); run the extraction again"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        features = handle.get_tensor("features").numpy()
        rows = handle.get_tensor("rows").numpy()
    skipped = [Skipped(s["path"], s["reason"]) for s in json.loads(metadata["skipped"])]
    return FeaturePart(features, rows, skipped)


@torch.inference_mode()
def _extract_batch(model: nn.Module, dataset: CXRDataset, positions: range) -> FeaturePart:
    # What a DataLoader (num_workers=0, collate_skipping) does for one batch, so the batch's
    # tensor, and so its features, are those of the one-process run.
    before = len(dataset.skipped)
    batch = collate_skipping([dataset[i] for i in positions])
    skipped = list(dataset.skipped[before:])
    if batch is None:
        return FeaturePart(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), skipped)
    features = model(batch["image"]).float().cpu().numpy().astype(np.float32)
    return FeaturePart(features, batch["index"].numpy().astype(np.int64), skipped)


def _batches(count: int, batch_size: int) -> list[range]:
    """The one-process run's batches: consecutive dataset positions, batch_size each."""
    return [range(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def _run_backbone(
    model: nn.Module,
    dataset: CXRDataset,
    batches: list[range],
    parts_dir: Path,
    tags: list[dict[str, str]],
    env: DistEnv,
    on_batch: Callable[[int], None] | None,
    progress: bool,
    desc: str,
) -> None:
    """This rank's batches (b % world == rank) into the journal; those already there are kept."""
    mine = range(env.rank, len(batches), env.world_size)
    done = 0
    for b in tqdm(mine, desc=desc, disable=not progress, unit="batch"):
        path = part_path(parts_dir, b)
        if _stored_tag(path) == tags[b]:
            done += 1
            continue
        write_part(path, _extract_batch(model, dataset, batches[b]), tags[b])
        if on_batch is not None:
            on_batch(b)
    if done:
        log.info("rank %d: %d of its %d batches were journaled already", env.rank, done, len(mine))


def _merge_parts(
    parts_dir: Path, tags: list[dict[str, str]]
) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """Every batch's part, in batch order: the features, rows and skipped of one process."""
    chunks: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    skipped: list[Skipped] = []
    for b, tag in enumerate(tags):
        part = read_part(part_path(parts_dir, b), tag)
        if len(part.rows):
            chunks.append(part.features)
            rows.append(part.rows)
        skipped.extend(part.skipped)
    if not chunks:
        raise ValueError("no readable images: nothing to extract features from")
    return np.concatenate(chunks).astype(np.float32), np.concatenate(rows).astype(np.int64), skipped


def build_backbone(
    backbone: str, weights: WeightsSpec, resize_mode: str
) -> tuple[nn.Module, Preprocessing]:
    """The frozen backbone features are extracted with (and approach-1 checkpoints hold)."""
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
    env: DistEnv | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureSet:
    """Pooled features of every readable image of `table`, computed once and cached.

    preprocessing None uses the backbone's own (native size). A cache in `cache_dir` with the
    same fingerprint is loaded; one with another fingerprint raises StaleFeatureCacheError unless
    `overwrite` (then it is recomputed in place). `keras_compat` makes the backbone compute
    exactly what Keras does with the same weights (see models.make_keras_compatible).

    `env` (cxrlabel.distributed.dist_env(), process group initialised): under torchrun every
    rank calls this with the same arguments, computes its batches, and rank 0 merges them (see
    the module docstring); every rank returns the same features. `on_batch(b)` is called after
    batch b was journaled by this process (tests stop a rank there, as if it were killed).
    """
    env = env or DistEnv.single()
    cache_dir = Path(cache_dir)
    model: nn.Module | None = None
    prep = preprocessing
    if prep is None:
        model, prep = build_backbone(backbone_name, weights, resize_mode)
    key = feature_fingerprint(table, backbone_name, weights, prep, keras_compat=keras_compat)
    if (cache_dir / FEATURES_META).is_file():
        try:
            found = load_features(cache_dir, key)
            log.info("%s: feature cache is up to date (%d images)", cache_dir, len(found))
            if env.is_main:  # left by a run stopped between writing the cache and this
                shutil.rmtree(cache_dir / PARTS_DIR, ignore_errors=True)
            return found
        except StaleFeatureCacheError:
            if not overwrite:
                raise
            log.info("%s: feature cache is stale; recomputing (overwrite=True)", cache_dir)

    if model is None:
        model, _ = build_backbone(backbone_name, weights, resize_mode)
    if keras_compat:
        make_keras_compatible(model)
    model.eval()
    dataset = CXRDataset(
        table, OBSERVATIONS, prep, cache=image_cache, on_error="skip", policy="U-Ignore"
    )
    # Images the image cache could not prepare are known before any batch runs.
    skipped = list(dataset.skipped)
    batches = _batches(len(dataset), batch_size)
    tags = [_part_tag(key, batch_size, b) for b in range(len(batches))]
    parts_dir = cache_dir / PARTS_DIR
    _run_backbone(model, dataset, batches, parts_dir, tags, env, on_batch,
                  progress and env.is_main, backbone_name)  # fmt: skip
    barrier(env)  # every rank's parts are on disk
    if not env.is_main:
        barrier(env)  # rank 0 has written the cache
        return replace(load_features(cache_dir, key), reused=False)
    try:
        feats, rows, batch_skipped = _merge_parts(parts_dir, tags)
    except Exception:
        barrier(env)  # release the other ranks; they fail to load the missing cache
        raise
    skipped += batch_skipped
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
    shutil.rmtree(parts_dir)
    log.info("%s: cached %d x %d features", cache_dir, *feats.shape)
    barrier(env)
    return result


# ---------------------------------------------------------------------------------------------
# Preprocessing the method extracts with


def default_size(backbone: str) -> int:
    """The method's input sizes: 224 for MobileNet, 220 for the other backbones.

    The tiny test CNN (not in the method) keeps its native size.
    """
    if backbone == "tiny":
        return TINY_PREPROCESSING.size
    return 224 if backbone == "mobilenet" else 220


def extraction_preprocessing(backbone: str, size: int, resize_mode: str) -> Preprocessing:
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


__all__ = [
    "PARTS_DIR",
    "FeaturePart",
    "FeatureSet",
    "StaleFeatureCacheError",
    "build_backbone",
    "default_size",
    "extract_features",
    "extraction_preprocessing",
    "feature_fingerprint",
    "features_for",
    "load_features",
    "part_path",
    "read_part",
    "weights_identity",
    "write_part",
]
