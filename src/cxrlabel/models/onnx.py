"""ONNX export of a checkpoint (or an ensemble) and an ONNX Runtime model for labelling.

The exported graph takes the film already resized by the model's preprocessing — input
``image``: float32 ``(N, 1, S, S)`` in [0, 1], 1 = white — and does the rest itself: repeat to
three channels, normalise with the saved mean/std, every member's forward pass, sigmoid, and the
mean over members. Output ``probabilities``: ``(N, K)``. The batch dimension is dynamic.
Resizing stays outside the graph (it is Pillow's antialiased resize, which ONNX has no
operator for); its settings are in the metadata.

Metadata (``metadata_props``, each a JSON string): ``labels``, ``preprocessing``,
``thresholds``, ``model_info`` (the Ensemble's, plus the export's opset) and ``input``.

The TorchScript-based exporter is used: on this project's 2-core CPU (busy at the time) it
exported the tiny CNN in 0.3 s and DenseNet121 in 9 s, against 5-12 s and 60 s for the
torch.export-based one, and both graphs match PyTorch to ~1e-6. The in-memory export behind
`cxrlabel label --backend auto` pays this once per run. When a future torch drops the
TorchScript exporter (its `torch.onnx.export` no longer takes `dynamic_axes`), the
torch.export-based one is used instead.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlabel.data.transforms import Preprocessing
from cxrlabel.fileio import atomic_write_bytes
from cxrlabel.models.checkpoint import load_checkpoint
from cxrlabel.models.ensemble import Ensemble, load_ensemble
from cxrlabel.models.factory import CXRModel
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
INPUT_DESCRIPTION = (
    "image: float32 (N, 1, S, S), the film resized as 'preprocessing' says (size, resize_mode, "
    "interpolation), values in [0, 1], 1 = white; channel repeat and mean/std normalisation "
    "happen inside the graph. Output probabilities: float32 (N, K) in 'labels' order."
)
METADATA_KEYS = ("labels", "preprocessing", "thresholds", "model_info", "input")


class OnnxModelError(ValueError):
    """An ONNX file that cannot be used as a cxrlabel model, naming the file and the problem."""


class ProbabilityGraph(nn.Module):
    """What the ONNX graph computes: normalise, each member, sigmoid, mean over members."""

    def __init__(self, models: Sequence[CXRModel], prep: Preprocessing) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.expand(-1, 3, -1, -1) - self.mean) / self.std
        probs = [torch.sigmoid(member(x).float()) for member in self.members]
        return torch.stack(probs).mean(dim=0)


def shared_preprocessing(models: Sequence[CXRModel], names: Sequence[str]) -> Preprocessing:
    """The one preprocessing all members use; one graph cannot take two input sizes."""
    first = models[0].preprocessing
    for model, name in zip(models[1:], names[1:], strict=True):
        if model.preprocessing != first:
            raise ValueError(
                f"{name} uses preprocessing {model.preprocessing.to_dict()}, but {names[0]} "
                f"uses {first.to_dict()}: one ONNX graph needs one input size and "
                "normalisation; export these checkpoints separately"
            )
    return first


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers and node attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _refuse_external_data(proto: Any, name: str) -> None:
    """cxrlabel's exports hold every tensor inline; a graph naming external data files would
    make ONNX Runtime read files relative to the serving process's folder, so it is refused."""
    from onnx.external_data_helper import uses_external_data

    if any(uses_external_data(t) for t in _graph_tensors(proto.graph)):
        raise OnnxModelError(
            f"{name}: the graph keeps tensors in external data files; cxrlabel only runs "
            "self-contained ONNX files (re-export it with `cxrlabel export --onnx`)"
        )


def _check_no_equalization(prep: Preprocessing, name: str) -> None:
    """Refuse a model whose preprocessing equalises the film: the graph takes the resized film
    and has no histogram-equalisation operator, so it would label unequalised films."""
    if prep.equalize != "none":
        raise ValueError(
            f"{name} equalises its films (equalize={prep.equalize!r}), which the ONNX graph "
            "cannot do; label it with PyTorch (--backend torch)"
        )


def _torchscript_exporter_available() -> bool:
    """Whether torch.onnx.export still has the TorchScript exporter (its `dynamo=False` mode).

    Decided from the signature, not by catching TypeError around the export: a TypeError raised
    while tracing the model is a real error and must not send us to the other exporter.
    """
    params = inspect.signature(torch.onnx.export).parameters
    return "dynamo" in params and "dynamic_axes" in params


def _export_bytes(module: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    if _torchscript_exporter_available():
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation on every call; see the doc.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                module,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        return buffer.getvalue()
    log.info("torch %s has no TorchScript ONNX exporter; using torch.export", torch.__version__)
    program = torch.onnx.export(
        module,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    return program.model_proto.SerializeToString()


def onnx_bytes(ensemble: Ensemble, *, opset: int = OPSET) -> bytes:
    """Serialised ONNX model (graph + metadata) for a loaded Ensemble."""
    import onnx

    models = [m.model for m in ensemble.members]
    names = [str(m.path) for m in ensemble.members]
    prep = shared_preprocessing(models, names)
    _check_no_equalization(prep, names[0])
    graph = ProbabilityGraph([m.to("cpu") for m in models], prep).eval()
    example = torch.rand(2, 1, prep.size, prep.size)
    proto = onnx.load_from_string(_export_bytes(graph, example, opset))
    info = {**ensemble.model_info(), "onnx": {"opset": opset, "input": INPUT_NAME}}
    metadata = {
        "labels": json.dumps(list(ensemble.labels)),
        "preprocessing": json.dumps(prep.to_dict()),
        "thresholds": json.dumps(ensemble.thresholds.to_dict()),
        "model_info": json.dumps(info),
        "input": INPUT_DESCRIPTION,
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"cxrlabel {info['name']} ({info['kind']})"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(model_specs: Sequence[str | Path] | str | Path, out_path: Path) -> Path:
    """Checkpoint(s) or run folder(s) -> one .onnx file (written atomically); returns its path.

    Several specs become one graph that averages their probabilities (they must share labels
    and preprocessing).
    """
    specs = [model_specs] if isinstance(model_specs, str | Path) else list(model_specs)
    ensemble = load_ensemble(specs, device="cpu")
    data = onnx_bytes(ensemble)
    out_path = Path(out_path)
    atomic_write_bytes(out_path, data)
    log.info("wrote %s (%.1f MB) for %s", out_path, len(data) / 1e6, ensemble.name)
    return out_path


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"device 'cuda' was asked for but onnxruntime has no CUDA provider ({available})"
        )
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """An exported model run by ONNX Runtime; a `cxrlabel.models.predictor.Predictor`, as an
    Ensemble is. One graph has one preprocessing, shared by all the members it averages."""

    def __init__(
        self,
        model: Path | bytes,
        *,
        device: str = "cpu",
        threads: int | None = None,
        source: str = "",
    ) -> None:
        import onnx
        import onnxruntime as ort

        self.source = source or (str(model) if isinstance(model, Path) else "<in memory>")
        data = Path(model).read_bytes() if isinstance(model, str | Path) else model
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:  # onnx raises DecodeError and others from protobuf
            raise OnnxModelError(f"{self.source}: not an ONNX model ({exc})") from exc
        _refuse_external_data(proto, self.source)
        meta = {p.key: p.value for p in proto.metadata_props}
        missing = [k for k in METADATA_KEYS if k not in meta]
        if missing:
            raise OnnxModelError(
                f"{self.source}: ONNX model lacks cxrlabel metadata {missing}; export it with "
                "`cxrlabel export --onnx`"
            )
        try:
            self.labels: tuple[str, ...] = tuple(json.loads(meta["labels"]))
            self.preprocessing = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
            _check_no_equalization(self.preprocessing, self.source)
            self.thresholds: Thresholds = Thresholds.from_dict(
                json.loads(meta["thresholds"])
            ).subset(self.labels)
            self._info: dict[str, Any] = json.loads(meta["model_info"])
        except (ValueError, KeyError, TypeError) as exc:
            raise OnnxModelError(f"{self.source}: unreadable cxrlabel metadata ({exc})") from exc
        self.session = ort.InferenceSession(
            data, _session_options(threads), providers=_providers(device)
        )
        self.device = "cuda" if "CUDA" in self.session.get_providers()[0] else "cpu"
        self.name: str = self._info.get("name", Path(self.source).stem)
        self.kind: str = self._info.get("kind", "single model")

    @classmethod
    def from_checkpoints(
        cls, specs: Sequence[str | Path], *, device: str = "cpu", threads: int | None = None
    ) -> OnnxModel:
        """Export checkpoints/run folders in memory and run them with ONNX Runtime."""
        ensemble = load_ensemble(specs, device="cpu")
        return cls.from_ensemble(ensemble, device=device, threads=threads, source=str(specs[0]))

    @classmethod
    def from_ensemble(
        cls,
        ensemble: Ensemble,
        *,
        device: str = "cpu",
        threads: int | None = None,
        source: str = "",
    ) -> OnnxModel:
        """Export a loaded Ensemble in memory and run it with ONNX Runtime."""
        return cls(onnx_bytes(ensemble), device=device, threads=threads, source=source)

    @property
    def checkpoint_paths(self) -> list[Path]:
        """The checkpoints this graph was exported from (for heatmaps, which need PyTorch)."""
        return [Path(m["path"]) for m in self._info.get("members", [])]

    @property
    def member_preprocessings(self) -> tuple[Preprocessing, ...]:
        """Every member's preprocessing: the graph's one, as the export requires."""
        return (self.preprocessing,) * max(1, len(self.checkpoint_paths))

    def torch_model(self) -> tuple[CXRModel, Path]:
        """The first checkpoint this graph was exported from, reloaded with PyTorch (for
        Grad-CAM); refused when it is gone or its weights changed since the export, because
        its heatmaps would then not explain these labels."""
        paths = self.checkpoint_paths
        if not paths or not paths[0].is_file():
            raise FileNotFoundError(
                f"heatmaps need the PyTorch checkpoint behind {self.name}, and "
                f"{paths[0] if paths else 'none'} was not found; pass the checkpoint or run "
                "folder as --model"
            )
        path = paths[0]
        model, meta = load_checkpoint(path)
        recorded = self._info["members"][0].get("sha256")
        if recorded and meta["sha256"]["weights"] != recorded:
            raise ValueError(
                f"{path} has changed since {self.name} was exported (weights hash differs), "
                "so its heatmaps would not explain these labels; pass the checkpoint as --model"
            )
        return model.eval(), path

    def predict_batch(self, resized: np.ndarray) -> np.ndarray:
        """(N, S, S) or (N, 1, S, S) resized [0, 1] films -> (N, K) probabilities."""
        x = np.asarray(resized, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        size = self.preprocessing.size
        if x.ndim != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"expected (N, 1, {size}, {size}) films, got {x.shape}")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x)})[0]

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W) [0, 1] films -> (N, K) probabilities (resized here, as PyTorch would)."""
        if not len(images):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        geometry = self.preprocessing.geometry
        return self.predict_batch(np.stack([geometry.apply(img) for img in images]))

    def model_info(self) -> dict[str, Any]:
        # The graph is exported in fp32 whatever the ensemble computed in.
        info = {**self._info, "backend": "onnxruntime", "precision": "fp32"}
        return {**info, "onnx_source": self.source}
