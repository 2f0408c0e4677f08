"""The runnable model: what labelling, the service and evaluation need from any model.

`Predictor` is the protocol (an `Ensemble` of PyTorch checkpoints or an ONNX Runtime
`OnnxModel`); `load_model` turns checkpoints, run folders or an exported .onnx file into one.
Grad-CAM heatmaps, which need the PyTorch model behind a Predictor (`Predictor.torch_model`),
are set up by `cxrlabel.labelling.heatmaps.heatmap_model`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from cxrlabel.data.transforms import Preprocessing, ResizeGeometry
from cxrlabel.hardware import cpu_has_amx_bf16
from cxrlabel.models.thresholds import Thresholds

if TYPE_CHECKING:
    from cxrlabel.models.factory import CXRModel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "native")
PRECISIONS = ("auto", "fp32", "bf16")


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
        """JSON-ready description: name, kind, labels, thresholds, package, precision (fp32 or
        bf16) and members (each with its path, backbone, head, preprocessing, epoch and weights
        sha256)."""
        ...

    def torch_model(self) -> tuple[CXRModel, Path]:
        """The PyTorch model of the first member and its checkpoint (what Grad-CAM runs on).

        Raises FileNotFoundError or ValueError (naming the file) when that checkpoint is not
        at hand or no longer the one the model was built from.
        """
        ...


def model_id(info: Mapping[str, Any]) -> str:
    """A short stable id of a model_info(): sha256 over the members' weight hashes (else over
    the info), first 16 hex. `/model`, run.json readers and the SR/FHIR outputs all show it."""
    hashes = [str(m.get("sha256")) for m in info.get("members", []) if m.get("sha256")]
    text = "\n".join(hashes) if hashes else json.dumps(info, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class InferencePlan:
    """What `load_model` runs checkpoints with, and why it was chosen."""

    backend: str  # "torch" or "onnx"
    precision: str  # "fp32" or "bf16" (bf16 only with torch)
    reason: str


def inference_plan(
    device: str = "auto", precision: str = "auto", *, flags: frozenset[str] | None = None
) -> InferencePlan:
    """The backend and precision `--backend auto` labels checkpoints with: the fastest path
    measured for the device (benchmarks/bench_label.py, DenseNet121 320 px, batch 16).

    - CPU with AMX (cpu flag amx_bf16): PyTorch bf16 autocast + channels_last. On an Intel
      Xeon with AMX (issue 12) it ran 58.0 images/s in-process against 24.6 for channels_last
      fp32, and the whole ONNX Runtime label job 38.7; rerun bench_label.py on such a CPU to
      see the two side by side.
    - Every other CPU, AVX512-BF16 without AMX included: ONNX Runtime fp32. On an AMD EPYC
      with AVX512-BF16 (2 cores) bf16 ran 9.7 images/s, ONNX Runtime 12.1; on AVX2-only CPUs
      bf16 is emulated and slower still.
    - CUDA: PyTorch fp32.

    `precision` fp32 or bf16 overrides the measured choice (fp32 -> ONNX Runtime on CPU, bf16
    -> PyTorch). `flags` are the CPU's feature flags (tests inject them, as for the training
    plan; by default /proc/cpuinfo's).
    """
    from cxrlabel.models.factory import resolve_device

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "bf16":
        return InferencePlan("torch", "bf16", "precision bf16 was asked for")
    if resolve_device(device).type != "cpu":
        return InferencePlan("torch", "fp32", "CUDA")
    if precision == "auto" and cpu_has_amx_bf16(flags):
        return InferencePlan("torch", "bf16", "CPU has AMX: bf16 measured fastest")
    return InferencePlan("onnx", "fp32", "CPU without AMX: ONNX Runtime fp32 measured fastest")


def default_backend(device: str = "auto", *, flags: frozenset[str] | None = None) -> str:
    """The backend `auto` picks for checkpoints (see `inference_plan`)."""
    return inference_plan(device, flags=flags).backend


def load_model(
    specs: Sequence[str | Path] | str | Path,
    *,
    backend: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    precision: str = "auto",
    flags: frozenset[str] | None = None,
    compile: bool = False,
) -> Predictor:
    """Checkpoints, run folders or an exported .onnx file -> a model that labels films.

    backend: 'torch' (an Ensemble; on CPU its members run channels_last, measured faster),
    'onnx' (ONNX Runtime fp32; checkpoints are exported in memory first), 'auto' (see
    `inference_plan`: PyTorch bf16 on CPUs with AMX, ONNX Runtime elsewhere on CPU; falls
    back to PyTorch, with a warning, when the in-memory export fails, e.g. members that cannot
    share one ONNX graph) or 'native' (each on the runtime it was saved for: checkpoints with
    PyTorch, an .onnx file with ONNX Runtime; nothing is exported in memory, so a checkpoint's
    heatmaps come from the very model that labels; `cxrlabel serve` uses it). Whatever the
    backend, an .onnx file runs with ONNX Runtime ('torch' refuses it).

    precision: 'auto' (with backend 'auto', see `inference_plan`; with 'torch' or 'native',
    fp32), 'fp32' or 'bf16' (bf16 autocast, PyTorch only; runs, emulated and slowly, on any
    CPU). The model's `model_info()["precision"]` says which one it computes in. `flags`: the
    CPU's feature flags (tests inject them; by default /proc/cpuinfo's).

    compile: run the PyTorch members through torch.compile (off by default; PyTorch only, so
    with it 'auto' labels with PyTorch, and 'onnx' or an .onnx file is refused).
    """
    from cxrlabel.models.ensemble import load_ensemble
    from cxrlabel.models.onnx import OnnxModel

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    specs = [specs] if isinstance(specs, str | Path) else list(specs)
    if compile and (backend == "onnx" or any(str(s).lower().endswith(".onnx") for s in specs)):
        raise ValueError("compile runs PyTorch models; ONNX Runtime has its own optimiser")
    if any(str(s).lower().endswith(".onnx") for s in specs):
        if backend == "torch":
            raise ValueError(f"{specs}: an .onnx file runs with --backend onnx, not torch")
        if precision == "bf16":
            raise ValueError(f"{specs}: an .onnx file runs in fp32; bf16 needs a checkpoint")
        if len(specs) != 1:
            raise ValueError(
                f"{specs}: give one .onnx file (an ensemble is exported as one graph) or "
                "checkpoints only"
            )
        return OnnxModel(Path(specs[0]), device=device, threads=threads)
    if backend == "onnx" and precision == "bf16":
        raise ValueError("ONNX Runtime runs in fp32; bf16 needs --backend torch or auto")
    if backend == "auto":
        plan = inference_plan(device, precision, flags=flags)
        chosen, chosen_precision = plan.backend, plan.precision
        if compile and chosen == "onnx":
            chosen = "torch"  # compile is a PyTorch path; fp32, as the ONNX plan was
        log.info("backend auto: %s %s (%s)", chosen, chosen_precision, plan.reason)
    elif backend == "onnx":
        chosen, chosen_precision = "onnx", "fp32"
    else:  # torch or native: fp32 unless bf16 is asked for, the reference path
        chosen, chosen_precision = "torch", "fp32" if precision == "auto" else precision
    if chosen == "onnx":
        # Loaded outside the try, so a missing checkpoint is reported as itself; auto only
        # picks ONNX on CPU in fp32, so this CPU ensemble is also the PyTorch fallback.
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
        ensemble = load_ensemble(specs, device=device, precision=chosen_precision, compile=compile)
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
