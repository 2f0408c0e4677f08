"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint named ``<dir>/<stem>`` is up to three files::

    <stem>.safetensors         model weights (the state dict, loaded strictly)
    <stem>.state.safetensors   optional, for resuming: optimizer tensors (``state.{i}.{name}``)
                               and RNG state (``rng.torch``, ``rng.cuda.{i}``) as uint8 tensors
    <stem>.json                metadata: config, ModelSpec, preprocessing, epoch/step, versions,
                               optimizer scalars (param_groups, non-tensor state) and progress

Each file is written atomically (temporary file, then rename). The JSON is written last and
holds the SHA-256 of the tensor files, so a crash between the writes is detected on load
instead of pairing new weights with old metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import cxrlabel
from cxrlabel.fileio import atomic_path, atomic_write_text
from cxrlabel.models import CXRModel, ModelSpec, create_model
from cxrlabel.transforms import Preprocessing

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.safetensors"
META_SUFFIX = ".json"


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
) -> Path:
    """Write weights (and, with `optimizer`, resumable training state); return the JSON path.

    `extra` is stored as-is under "extra" (it must be JSON-serialisable), e.g. training
    progress or validation metrics.
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
    if optimizer is not None:
        tensors, scalars = flatten_optimizer_state(optimizer.state_dict())
        tensors.update(rng_tensors())
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


def read_metadata(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON metadata, after checking its tensor files match their hashes."""
    _, _, meta_path = checkpoint_paths(path)
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: checkpoint metadata not found")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    for kind, name in meta["files"].items():
        file = meta_path.with_name(name)
        if not file.is_file():
            raise CheckpointError(f"{meta_path}: {kind} file {file} is missing")
        if _sha256(file) != meta["sha256"][kind]:
            raise CheckpointError(f"{file}: contents do not match {meta_path} (interrupted save?)")
    return meta


def model_from_metadata(meta: Mapping[str, Any]) -> CXRModel:
    """A randomly initialised model of the checkpoint's architecture and preprocessing."""
    spec = ModelSpec(**{**meta["model"], "labels": tuple(meta["model"]["labels"])})
    prep = Preprocessing.from_dict(meta["preprocessing"])
    model = create_model(
        spec.backbone,
        spec.head,
        spec.labels,
        weights="none",
        hidden=spec.hidden,
        size=prep.size,
        resize_mode=prep.resize_mode,
    )
    # The saved preprocessing is what the weights were trained with; it wins over defaults.
    model.preprocessing = prep
    return model


def load_checkpoint(path: Path) -> tuple[CXRModel, dict[str, Any]]:
    """Rebuild the model (weights='none') and load its saved weights strictly.

    `path` may name any file of the checkpoint. Returns the model in eval mode and the metadata.
    """
    meta = read_metadata(path)
    weights_path, _, meta_path = checkpoint_paths(path)
    model = model_from_metadata(meta)
    state = load_file(str(weights_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path} does not fit its own metadata: {exc}") from exc
    model.eval()
    log.info("loaded checkpoint %s (epoch %s, step %s)", meta_path, meta["epoch"], meta["step"])
    return model, meta


def load_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load weights, optimizer state and the global RNG state into a run; return the metadata."""
    meta = read_metadata(path)
    weights_path, state_path, _ = checkpoint_paths(path)
    if "state" not in meta["files"]:
        raise CheckpointError(f"{path}: checkpoint has no training state to resume from")
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    tensors = load_file(str(state_path))
    optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
    restore_rng(tensors)
    return meta
