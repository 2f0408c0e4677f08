"""The runnable model: what labelling, the service and evaluation need from any model.

`Predictor` is the protocol (an `Ensemble` of PyTorch checkpoints or an ONNX Runtime
`OnnxModel`); `load_model` turns checkpoints, run folders or an exported .onnx file into one.
Grad-CAM heatmaps, which need the PyTorch model behind a Predictor (`Predictor.torch_model`),
are set up by `cxrlabel.labelling.heatmaps.heatmap_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from cxrlabel.data.transforms import Preprocessing, ResizeGeometry
from cxrlabel.models.thresholds import Thresholds

if TYPE_CHECKING:
    from cxrlabel.models.factory import CXRModel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "native")


@runtime_checkable  # isinstance checks that every member is present (not their types)
class Predictor(Protocol):
    """What labelling, the service and evaluation need from a model: an Ensemble or an
    OnnxModel.

    `preprocessing` is the preprocessing of the first member (for a single model, or an
    ensemble whose members share it, simply the model's); `member_preprocessings` lists every
    member's, in order, because an ensemble's members may resize differently and
    `predict_images` then prepares each film once per distinct preprocessing.
    """

    labels: tuple[str, ...]
    thresholds: Thresholds
    name: str
    kind: str

    @property
    def preprocessing(self) -> Preprocessing: ...

    @property
    def member_preprocessings(self) -> tuple[Preprocessing, ...]: ...

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W) [0, 1] films -> (N, K) probabilities in `labels` order."""
        ...

    def model_info(self) -> dict[str, Any]:
        """JSON-ready description: name, kind, labels, thresholds, package and members (each
        with its path, backbone, head, preprocessing, epoch and weights sha256)."""
        ...

    def torch_model(self) -> tuple[CXRModel, Path]:
        """The PyTorch model of the first member and its checkpoint (what Grad-CAM runs on).

        Raises FileNotFoundError or ValueError (naming the file) when that checkpoint is not
        at hand or no longer the one the model was built from.
        """
        ...


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
    'onnx' (ONNX Runtime; checkpoints are exported in memory first), 'auto' (see
    `default_backend`; falls back to PyTorch, with a warning, when the in-memory export fails,
    e.g. members that cannot share one ONNX graph) or 'native' (each on the runtime it was
    saved for: checkpoints with PyTorch, an .onnx file with ONNX Runtime; nothing is exported
    in memory, so a checkpoint's heatmaps come from the very model that labels; `cxrlabel
    serve` uses it). Whatever the backend, an .onnx file runs with ONNX Runtime ('torch'
    refuses it).
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
    chosen = backend
    if backend == "auto":
        chosen = default_backend(device)
    elif backend == "native":
        chosen = "torch"
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


def shared_resize(models: Sequence[Predictor]) -> ResizeGeometry | None:
    """The one resize every model (every ensemble member) applies, or None when they differ.
    With one, a film can be resized once as soon as it is read (predict_images' own resize of
    an S x S film is then the identity) and the full-size film dropped."""
    preps = [prep for model in models for prep in model.member_preprocessings]
    geometries = {p.geometry for p in preps}  # mean and std do not change the resized film
    return geometries.pop() if len(geometries) == 1 else None
