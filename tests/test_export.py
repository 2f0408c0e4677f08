"""ONNX export: metadata, dynamic batch, ensembles, and ONNX Runtime matching PyTorch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cxrlabel.checkpoint import save_checkpoint
from cxrlabel.cli import main
from cxrlabel.ensemble import load_ensemble
from cxrlabel.export import OnnxModel, OnnxModelError, export_onnx
from cxrlabel.images import read_image
from cxrlabel.models import create_model
from cxrlabel.predict import load_model
from cxrlabel.thresholds import Thresholds

LABELS = ("Atelectasis", "Cardiomegaly", "Edema")


def make_checkpoint(path: Path, *, seed: int, size: int = 64, head: str = "linear") -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny", head, LABELS, weights="none", size=size)
    thresholds = Thresholds(LABELS, (0.3, 0.5, 0.7), "youden").with_band(0.05)
    save_checkpoint(path, model, config={}, epoch=2, step=10, thresholds=thresholds)
    return path


def films(tiny_dataset: Path, n: int) -> list[np.ndarray]:
    return [read_image(p) for p in sorted(tiny_dataset.rglob("*.jpg"))[:n]]


def test_export_metadata_and_probabilities_match_torch(tiny_dataset: Path, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "a" / "best.safetensors", seed=0, head="mlp3")
    out = export_onnx([ckpt], tmp_path / "model.onnx")
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["labels"]) == list(LABELS)
    assert json.loads(meta["preprocessing"])["size"] == 64
    stored = Thresholds.from_dict(json.loads(meta["thresholds"]))
    assert stored.values == (0.3, 0.5, 0.7) and stored.band is not None
    info = json.loads(meta["model_info"])
    assert info["kind"] == "single model" and info["members"][0]["epoch"] == 2
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    onnx_model = OnnxModel(out)
    torch_model = load_ensemble([ckpt], device="cpu")
    assert onnx_model.labels == torch_model.labels
    assert onnx_model.thresholds == torch_model.thresholds
    assert onnx_model.name == torch_model.name and onnx_model.kind == torch_model.kind
    images = films(tiny_dataset, 7)
    images.append(np.random.default_rng(0).random((50, 90), dtype=np.float32))  # non-square
    for batch in (images[:1], images):  # dynamic batch size
        a = onnx_model.predict_images(batch)
        b = torch_model.predict_images(batch)
        assert a.shape == b.shape == (len(batch), 3)
        assert np.abs(a - b).max() < 1e-4
    assert onnx_model.model_info()["backend"] == "onnxruntime"


def test_ensemble_exports_as_one_averaging_graph(tiny_dataset: Path, tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a" / "best.safetensors", seed=1)
    b = make_checkpoint(tmp_path / "b" / "best.safetensors", seed=2)
    out = export_onnx([a, b], tmp_path / "ens.onnx")
    onnx_model = OnnxModel(out)
    assert onnx_model.kind == "ensemble of 2 checkpoints"
    images = films(tiny_dataset, 4)
    expected = load_ensemble([a, b], device="cpu").predict_images(images)
    single = load_ensemble([a], device="cpu").predict_images(images)
    got = onnx_model.predict_images(images)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - single).max() > 1e-4  # the second member really counts


def test_members_with_different_preprocessing_are_refused(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a" / "best.safetensors", seed=1, size=64)
    b = make_checkpoint(tmp_path / "b" / "best.safetensors", seed=2, size=96)
    with pytest.raises(ValueError, match="export these checkpoints separately"):
        export_onnx([a, b], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    # The auto backend falls back to PyTorch for such an ensemble instead of failing.
    model = load_model([a, b], backend="auto", device="cpu")
    assert type(model).__name__ == "Ensemble"


def test_foreign_onnx_is_refused_with_the_file_named(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    path = tmp_path / "plain.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(OnnxModelError, match=r"plain\.onnx.*lacks cxrlabel metadata"):
        OnnxModel(path)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match=r"junk\.onnx"):
        OnnxModel(tmp_path / "junk.onnx")


def test_cli_export_then_label_with_the_onnx_file(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "tiny"
    ckpt = make_checkpoint(run / "checkpoints" / "best.safetensors", seed=4)
    assert main(["export", str(run), "--onnx"]) == 0
    assert (run / "model.onnx").is_file()
    valid = str(tiny_dataset / "valid")
    options = ["--no-progress", "--device", "cpu"]
    onnx_args = ["--model", str(run / "model.onnx"), "--out", str(tmp_path / "o")]
    torch_args = ["--model", str(ckpt), "--backend", "torch", "--out", str(tmp_path / "t")]
    assert main(["label", valid, *onnx_args, *options]) == 0
    assert main(["label", valid, *torch_args, *options]) == 0
    with open(tmp_path / "o" / "probabilities.csv") as f:
        onnx_rows = list(csv.DictReader(f))
    with open(tmp_path / "t" / "probabilities.csv") as f:
        torch_rows = list(csv.DictReader(f))
    assert len(onnx_rows) == len(torch_rows) == 3
    for x, y in zip(onnx_rows, torch_rows, strict=True):
        assert x["Path"] == y["Path"]
        assert all(abs(float(x[k]) - float(y[k])) < 1e-4 for k in LABELS)
    run_info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run_info["model"]["backend"] == "onnxruntime"


def test_heatmaps_with_an_onnx_file_use_its_checkpoint_and_notice_changes(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    from cxrlabel.predict import label_inputs

    ckpt = make_checkpoint(tmp_path / "a" / "best.safetensors", seed=5)
    onnx_model = load_model([export_onnx([ckpt], tmp_path / "m.onnx")])
    summary = label_inputs(
        [tiny_dataset / "valid"],
        onnx_model,
        tmp_path / "out",
        heatmaps=True,
        heatmap_labels=["Edema"],
        progress=False,
    )
    assert summary.heatmaps == 2 * summary.labelled > 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert str(ckpt) in run["heatmaps"]["model"]
    make_checkpoint(ckpt, seed=6)  # retrained in place: the .onnx no longer matches it
    with pytest.raises(ValueError, match="has changed"):
        label_inputs(
            [tiny_dataset / "valid"], onnx_model, tmp_path / "out2", heatmaps=True, progress=False
        )
