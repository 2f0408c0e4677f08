"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint named ``<dir>/<stem>`` is up to three files::

    <stem>.safetensors         model weights (the state dict, loaded strictly)
    <stem>.state.safetensors   optional, for resuming: optimizer tensors (``state.{i}.{name}``),
                               RNG state (``rng.torch``, ``rng.cuda.{i}``) as uint8 tensors and,
                               with an EMA of the weights, its state dict (``ema.{name}``)
    <stem>.json                metadata: config, ModelSpec, preprocessing, epoch/step, versions,
                               optimizer scalars (param_groups, non-tensor state) and progress

Each file is written atomically (temporary file, then rename). The JSON is written last and
holds the SHA-256 of the tensor files, so a crash between the writes is detected on load
instead of pairing new weights with old metadata.

Loading trusts none of it: a checkpoint is often someone else's file. Every metadata field
is checked before use, the model is rebuilt only from a backbone that needs no download
(`factory.offline_backbone`; timm's pretrained=False), its files must sit beside the JSON
under their own names, and any fault (bad JSON, a poisoned or mismatched tensor file) is a
`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import cxrlabel
from cxrlabel.data.transforms import Preprocessing
from cxrlabel.fileio import atomic_path, atomic_write_text
from cxrlabel.models.factory import (
    HEADS,
    BackboneError,
    CXRModel,
    ModelSpec,
    create_model,
    make_keras_compatible,
    offline_backbone,
)
from cxrlabel.models.tensor_file import WeightsError, read_safetensors
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.safetensors"
META_SUFFIX = ".json"
# Approach-1 models: which frozen backbone and weights the features came from, and whether the
# network was made Keras-compatible (that has no tensors, so loading must redo it).
FROZEN_BACKBONE_KEY = "frozen_backbone"
# Keys that describe the tensor files or how to rebuild the model: changing them in place would
# pair the weights with metadata they were not saved with, so `update_metadata` refuses them.
PROTECTED_KEYS = frozenset(
    {"format", "files", "sha256", "model", "preprocessing", "optimizer", FROZEN_BACKBONE_KEY}
)
THRESHOLDS_KEY = "thresholds"
EMA_PREFIX = "ema."  # the EMA model's tensors in a training-state file
# Bounds on what a checkpoint may ask the loader to build (the method uses 220-320 px and 256
# hidden units): a crafted size or width would otherwise allocate without limit.
MIN_INPUT_SIZE = 16
MAX_INPUT_SIZE = 2048
MAX_HIDDEN = 65536


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, inconsistent or does not fit what loads it."""


def checkpoint_paths(path: Path) -> tuple[Path, Path, Path]:
    """(weights, training state, metadata) paths for a checkpoint given by any of its files."""
    path = Path(path)
    name = path.name
    for suffix in (STATE_SUFFIX, WEIGHTS_SUFFIX, META_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    base = path.with_name(name)
    return (
        base.with_name(name + WEIGHTS_SUFFIX),
        base.with_name(name + STATE_SUFFIX),
        base.with_name(name + META_SUFFIX),
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    # safetensors wants contiguous, unshared CPU tensors (channels_last weights are neither
    # contiguous in its sense nor necessarily on the CPU).
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp))
    return _sha256(path)


def library_versions() -> dict[str, str]:
    import safetensors
    import timm

    return {
        "cxrlabel": cxrlabel.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
    }


# --------------------------------------------------------------------------------------------
# Optimizer and RNG state as (tensors, JSON scalars)
# --------------------------------------------------------------------------------------------


def flatten_optimizer_state(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (`state.{i}.{name}`) and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [dict(group) for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def unflatten_optimizer_state(
    tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`: a dict `optimizer.load_state_dict` takes."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in scalars.get("state_scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    # JSON turned tuples (Adam's betas) into lists; the optimizer's own defaults are tuples.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in scalars["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def rng_tensors() -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU and each CUDA device) as uint8 tensors."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# --------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    model: CXRModel,
    *,
    config: Mapping[str, Any],
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
    thresholds: Thresholds | None = None,
    frozen_backbone: Mapping[str, Any] | None = None,
    ema: torch.nn.Module | None = None,
) -> Path:
    """Write weights (and, with `optimizer`, resumable training state); return the JSON path.

    `ema` (with `optimizer` only): a moving average of the weights, saved in the state file.
    `extra` is stored as-is under "extra" (it must be JSON-serialisable), e.g. training
    progress or validation metrics. `thresholds` (for the model's labels) are stored under
    "thresholds"; without them readers use the method's fixed 0.5. `frozen_backbone` (an
    approach-1 model: backbone, weights identity and sha256, keras_compat) is stored as such.
    """
    weights_path, state_path, meta_path = checkpoint_paths(path)
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(epoch),
        "step": int(step),
        "config": dict(config),
        "model": {**asdict(model.spec), "labels": list(model.spec.labels)},
        "preprocessing": model.preprocessing.to_dict(),
        "versions": library_versions(),
        "files": {"weights": weights_path.name},
        "sha256": {"weights": _save_tensors(weights_path, model.state_dict())},
        "extra": dict(extra or {}),
    }
    if frozen_backbone is not None:
        meta[FROZEN_BACKBONE_KEY] = dict(frozen_backbone)
    if thresholds is not None:
        meta[THRESHOLDS_KEY] = thresholds.subset(model.spec.labels).to_dict()
    if optimizer is not None:
        tensors, scalars = flatten_optimizer_state(optimizer.state_dict())
        tensors.update(rng_tensors())
        if ema is not None:
            tensors.update({EMA_PREFIX + k: v for k, v in ema.state_dict().items()})
        meta["files"]["state"] = state_path.name
        meta["sha256"]["state"] = _save_tensors(state_path, tensors)
        meta["optimizer"] = {"class": type(optimizer).__name__, **scalars}
    else:
        # A stale state file from an earlier save must not pass for this checkpoint's.
        state_path.unlink(missing_ok=True)
    # Last: the metadata names the hashes of the files above, which marks the set complete.
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=_json_default))
    return meta_path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def _read_json(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{meta_path}: not readable checkpoint metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: checkpoint metadata must be a JSON object")
    return meta


def _check_files(meta_path: Path, meta: Mapping[str, Any]) -> None:
    """`files` names the weights (and maybe the state) file beside the metadata, by exactly the
    names `checkpoint_paths` gives: those are the files the loaders read, so the hashes checked
    are theirs, and no name can point elsewhere (`../x`, an absolute path)."""
    weights, state, _ = checkpoint_paths(meta_path)
    expected = {"weights": weights.name, "state": state.name}
    files, hashes = meta.get("files"), meta.get("sha256")
    if not isinstance(files, dict) or "weights" not in files or not set(files) <= set(expected):
        raise CheckpointError(
            f"{meta_path}: 'files' must name the weights file (and optionally the state file), "
            f"not {files!r}"
        )
    for kind, name in files.items():
        if name != expected[kind]:
            raise CheckpointError(
                f"{meta_path}: files.{kind} is {name!r}, but a checkpoint's {kind} file is "
                f"{expected[kind]!r} beside its metadata"
            )
        if not isinstance(hashes, dict) or not isinstance(hashes.get(kind), str):
            raise CheckpointError(f"{meta_path}: no sha256.{kind} for its {kind} file")


def read_metadata(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON metadata, after checking its tensor files match their hashes."""
    _, _, meta_path = checkpoint_paths(path)
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: checkpoint metadata not found")
    meta = _read_json(meta_path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    _check_files(meta_path, meta)
    for kind, name in meta["files"].items():
        file = meta_path.with_name(name)
        if not file.is_file():
            raise CheckpointError(f"{meta_path}: {kind} file {file} is missing")
        if _sha256(file) != meta["sha256"][kind]:
            raise CheckpointError(f"{file}: contents do not match {meta_path} (interrupted save?)")
    return meta


def update_metadata(path: Path, **changes: Any) -> dict[str, Any]:
    """Set top-level metadata keys of a saved checkpoint; the tensor files are not touched.

    The hashes are verified first (a torn checkpoint is not patched), keys that describe the
    weights (`PROTECTED_KEYS`) are refused, and the JSON is replaced atomically. A value of
    None removes the key. Returns the new metadata.
    """
    refused = sorted(set(changes) & PROTECTED_KEYS)
    if refused:
        raise CheckpointError(f"{path}: metadata keys {refused} describe the weights; not changed")
    meta = read_metadata(path)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    _, _, meta_path = checkpoint_paths(path)
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=_json_default))
    return meta


def set_thresholds(path: Path, thresholds: Thresholds) -> dict[str, Any]:
    """Store `thresholds` (one per label the model predicts, in its order) in a checkpoint."""
    meta = read_metadata(path)
    labels = meta["model"]["labels"]
    try:
        ordered = thresholds.subset(labels)
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc.args[0]} (the model predicts {labels})") from exc
    return update_metadata(path, **{THRESHOLDS_KEY: ordered.to_dict()})


def thresholds_from_metadata(meta: Mapping[str, Any]) -> Thresholds:
    """A checkpoint's stored thresholds, or the method's fixed 0.5 for its labels."""
    labels = tuple(meta["model"]["labels"])
    stored = meta.get(THRESHOLDS_KEY)
    if not stored:
        return Thresholds.fixed(labels)
    return Thresholds.from_dict(stored).subset(labels)


def rename_checkpoint(src: Path, dst: Path) -> Path:
    """Move a checkpoint's files to another stem, rewriting the file names in its metadata.

    Tensor files move first, then the new JSON (naming them and their unchanged hashes) is
    written, then the old JSON is removed: a crash leaves at worst a JSON whose files are
    missing, which `read_metadata` reports, never weights paired with the wrong metadata.
    """
    meta = read_metadata(src)
    src_paths, dst_paths = checkpoint_paths(src), checkpoint_paths(dst)
    kinds = {"weights": 0, "state": 1}
    for kind in meta["files"]:
        os.replace(src_paths[kinds[kind]], dst_paths[kinds[kind]])
        meta["files"][kind] = dst_paths[kinds[kind]].name
    if "state" not in meta["files"]:
        dst_paths[1].unlink(missing_ok=True)  # a stale state file must not pass for this one's
    atomic_write_text(dst_paths[2], json.dumps(meta, indent=2, default=_json_default))
    src_paths[2].unlink()
    return dst_paths[2]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint's files (metadata first, so no half-deleted set looks complete)."""
    weights, state, meta = checkpoint_paths(path)
    for file in (meta, weights, state):
        file.unlink(missing_ok=True)


def spec_from_metadata(meta: Mapping[str, Any], where: str | Path) -> ModelSpec:
    """The checkpoint's `model` entry, checked field by field (`where` names the file)."""
    entry = meta.get("model")
    names = {f.name for f in fields(ModelSpec)}
    if not isinstance(entry, dict) or not {"backbone", "head", "labels"} <= set(entry):
        raise CheckpointError(f"{where}: 'model' must hold backbone, head and labels")
    if set(entry) - names:
        raise CheckpointError(f"{where}: model has unknown key(s) {sorted(set(entry) - names)}")
    try:
        backbone = offline_backbone(entry["backbone"])
    except BackboneError as exc:
        raise CheckpointError(f"{where}: model.backbone: {exc}") from exc
    if entry["head"] not in HEADS:
        raise CheckpointError(f"{where}: model.head {entry['head']!r} is not one of {list(HEADS)}")
    hidden = entry.get("hidden", 256)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN:
        raise CheckpointError(f"{where}: model.hidden must be an int in [1, {MAX_HIDDEN}]")
    labels = entry["labels"]
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise CheckpointError(f"{where}: model.labels must be a non-empty list of distinct names")
    return ModelSpec(backbone=backbone, head=entry["head"], labels=tuple(labels), hidden=hidden)


def preprocessing_from_metadata(meta: Mapping[str, Any], where: str | Path) -> Preprocessing:
    """The checkpoint's `preprocessing`, checked (its size bounds what building the model costs)."""
    try:
        prep = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: unusable preprocessing ({exc})") from exc
    if isinstance(prep.size, bool) or not isinstance(prep.size, int):
        raise CheckpointError(f"{where}: preprocessing.size must be an int, not {prep.size!r}")
    if not MIN_INPUT_SIZE <= prep.size <= MAX_INPUT_SIZE:
        raise CheckpointError(
            f"{where}: preprocessing.size {prep.size} is outside [{MIN_INPUT_SIZE}, "
            f"{MAX_INPUT_SIZE}]"
        )
    return prep


def model_from_metadata(
    meta: Mapping[str, Any], where: str | Path = "checkpoint metadata"
) -> CXRModel:
    """A randomly initialised model of the checkpoint's architecture and preprocessing.

    Every field is checked first and the model is built with weights='none' (timm's
    pretrained=False) from a backbone `offline_backbone` accepts, so nothing is downloaded.
    """
    spec = spec_from_metadata(meta, where)
    prep = preprocessing_from_metadata(meta, where)
    frozen = meta.get(FROZEN_BACKBONE_KEY, {})
    if not isinstance(frozen, dict):
        raise CheckpointError(f"{where}: {FROZEN_BACKBONE_KEY} must be a JSON object")
    try:
        model = create_model(
            spec.backbone,
            spec.head,
            spec.labels,
            weights="none",
            hidden=spec.hidden,
            size=prep.size,
            resize_mode=prep.resize_mode,
        )
    except (ValueError, RuntimeError, AssertionError) as exc:  # e.g. a size the net refuses
        raise CheckpointError(f"{where}: cannot build model {spec.backbone!r} ({exc})") from exc
    # The saved preprocessing is what the weights were trained with; it wins over defaults.
    model.preprocessing = prep
    if frozen.get("keras_compat"):
        make_keras_compatible(model.backbone)
    return model


def load_checkpoint(path: Path) -> tuple[CXRModel, dict[str, Any]]:
    """Rebuild the model (weights='none') and load its saved weights strictly.

    `path` may name any file of the checkpoint. Returns the model in eval mode and the metadata.
    """
    meta = read_metadata(path)
    weights_path, _, meta_path = checkpoint_paths(path)
    model = model_from_metadata(meta, meta_path)
    _load_weights(weights_path, model)
    model.eval()
    log.info(
        "loaded checkpoint %s (epoch %s, step %s)", meta_path, meta.get("epoch"), meta.get("step")
    )
    return model, meta


def _load_weights(weights_path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights file strictly; whatever is wrong with it, a CheckpointError
    naming it (never a safetensors or torch traceback)."""
    try:
        state = read_safetensors(weights_path, model.state_dict())
        model.load_state_dict(state, strict=True)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path} does not fit its own metadata: {exc}") from exc


def load_weights_into(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load a checkpoint's weights (hashes checked) into an existing model; return its metadata.

    For continuing from a run's own checkpoint, e.g. its best epoch, without rebuilding it.
    """
    meta = read_metadata(path)
    _load_weights(checkpoint_paths(path)[0], model)
    return meta


def load_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ema: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Load weights, optimizer state and the global RNG state into a run (and, with `ema`, the
    saved moving average of the weights into it); return the metadata."""
    meta = read_metadata(path)
    weights_path, state_path, _ = checkpoint_paths(path)
    if "state" not in meta["files"]:
        raise CheckpointError(f"{path}: checkpoint has no training state to resume from")
    _load_weights(weights_path, model)
    try:
        tensors = read_safetensors(state_path, what="training state")
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        if ema is not None:
            saved = {
                k[len(EMA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)
            }
            if not saved:
                raise CheckpointError(f"{path}: checkpoint has no EMA weights to resume from")
            ema.load_state_dict(saved, strict=True)
        restore_rng(tensors)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"{state_path}: training state does not fit this run ({exc})"
        ) from exc
    return meta
