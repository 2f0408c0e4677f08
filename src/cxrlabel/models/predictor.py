"""The runnable model: what labelling, the service and evaluation need from any model.

`Predictor` is the protocol (an `Ensemble` of PyTorch checkpoints or an ONNX Runtime
`OnnxModel`); `load_model` turns checkpoints, run folders or an exported .onnx file into one,
and `heatmap_model` finds the PyTorch model Grad-CAM runs on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cxrlabel.data.transforms import Preprocessing, ResizeGeometry
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")


class Predictor(Protocol):
    """What labelling needs from a model: an Ensemble or an OnnxModel."""

    labels: tuple[str, ...]
    thresholds: Thresholds
    name: str
    kind: str

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def model_info(self) -> dict[str, Any]: ...


def default_backend(device: str = "auto") -> str:
    """The backend `auto` picks: ONNX Runtime on CPU (measured fastest, see
    benchmarks/bench_label.py; onnxruntime is a dependency), PyTorch on CUDA."""
    from cxrlabel.models.factory import resolve_device

    return "onnx" if resolve_device(device).type == "cpu" else "torch"


def load_model(
    specs: Sequence[str | Path] | str | Path,
    *,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
) -> Predictor:
    """Checkpoints, run folders or an exported .onnx file -> a model that labels films.

    backend: 'torch' (an Ensemble; on CPU its members run channels_last, measured faster),
    'onnx' (ONNX Runtime; checkpoints are exported in memory first) or 'auto' (see
    `default_backend`; falls back to PyTorch, with a warning, when the in-memory export fails,
    e.g. members that cannot share one ONNX graph).
    """
    from cxrlabel.models.ensemble import load_ensemble
    from cxrlabel.models.onnx import OnnxModel

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    specs = [specs] if isinstance(specs, str | Path) else list(specs)
    if any(str(s).lower().endswith(".onnx") for s in specs):
        if backend == "torch":
            raise ValueError(f"{specs}: an .onnx file runs with --backend onnx, not torch")
        if len(specs) != 1:
            raise ValueError(
                f"{specs}: give one .onnx file (an ensemble is exported as one graph) or "
                "checkpoints only"
            )
        return OnnxModel(Path(specs[0]), device=device, threads=threads)
    chosen = default_backend(device) if backend == "auto" else backend
    if chosen == "onnx":
        # Loaded outside the try, so a missing checkpoint is reported as itself; auto only
        # picks ONNX on CPU, so this CPU ensemble is also the PyTorch fallback.
        ensemble = load_ensemble(specs, device="cpu")
        try:
            return OnnxModel.from_ensemble(
                ensemble, device=device, threads=threads, source=str(specs[0])
            )
        except Exception as exc:  # the exporter, onnx.checker and ORT raise many types
            if backend == "onnx":
                raise
            log.warning(
                "ONNX Runtime not used (%s: %s); labelling with PyTorch", type(exc).__name__, exc
            )
    else:
        ensemble = load_ensemble(specs, device=device)
    if ensemble.device.type == "cpu":
        for member in ensemble.members:
            member.model.to(memory_format=torch.channels_last)
    return ensemble


def heatmap_model(model: Predictor) -> tuple[torch.nn.Module, str]:
    """The PyTorch model Grad-CAM runs on (an ensemble's first member) and a note saying so."""
    from cxrlabel.models.checkpoint import load_checkpoint

    members = getattr(model, "members", None)
    if members is not None:
        first = members[0]
        torch_model, path = first.model, first.path
    else:
        paths = getattr(model, "checkpoint_paths", [])
        if not paths or not Path(paths[0]).is_file():
            raise FileNotFoundError(
                f"heatmaps need the PyTorch checkpoint behind {model.name}, and "
                f"{paths[0] if paths else 'none'} was not found; pass the checkpoint or run "
                "folder as --model"
            )
        path = Path(paths[0])
        torch_model, meta = load_checkpoint(path)
        recorded = model.model_info()["members"][0].get("sha256")
        if recorded and meta["sha256"]["weights"] != recorded:
            raise ValueError(
                f"{path} has changed since {model.name} was exported (weights hash differs), "
                "so its heatmaps would not explain these labels; pass the checkpoint as --model"
            )
    n = len(model.model_info().get("members", [])) or 1
    note = f"Grad-CAM from {path}"
    if n > 1:
        note += f" (the first of the {n} ensemble members; the labels are the ensemble's)"
    return torch_model.eval(), note


def resize_geometry(prep: Preprocessing) -> ResizeGeometry:
    """What `resize` depends on (mean and std do not change the resized film)."""
    return prep.geometry


def shared_resize(models: Sequence[Predictor]) -> ResizeGeometry | None:
    """The one resize every model (every ensemble member) applies, or None when they differ.
    With one, a film can be resized once as soon as it is read (predict_images' own resize of
    an S x S film is then the identity) and the full-size film dropped."""
    preps: list[Preprocessing] = []
    for model in models:
        members = getattr(model, "members", None)
        if members is not None:
            preps.extend(m.model.preprocessing for m in members)
        else:
            preps.append(model.preprocessing)  # type: ignore[attr-defined]
    geometries = {resize_geometry(p) for p in preps}
    return geometries.pop() if len(geometries) == 1 else None
