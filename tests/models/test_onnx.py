"""ONNX export: metadata, dynamic batch, ensembles, and ONNX Runtime matching PyTorch."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cxrlabel.cli import main
from cxrlabel.data.images import read_image
from cxrlabel.models import onnx as export
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.factory import create_model
from cxrlabel.models.onnx import OnnxModel, OnnxModelError, export_onnx
from cxrlabel.models.predictor import load_model
from cxrlabel.models.thresholds import Thresholds

LABELS = ("Atelectasis", "Cardiomegaly", "Edema")
# A CPU without AMX/AVX512-BF16, where --backend auto exports to ONNX (injected, so that no
# test depends on the CPU that runs it).
AVX2_ONLY = frozenset({"avx", "avx2", "fma"})


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
    model = load_model([a, b], backend="auto", device="cpu", flags=AVX2_ONLY)
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
    from cxrlabel.labelling.batch import label_inputs

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


def test_default_onnx_path_stays_inside_the_run(tmp_path: Path) -> None:
    from cxrlabel.cli import _default_onnx_path

    run = tmp_path / "runs" / "foo"
    (run / "checkpoints").mkdir(parents=True)
    assert _default_onnx_path(f"{run}:best3") == run / "model-best3.onnx"
    assert _default_onnx_path(run) == run / "model.onnx"
    assert _default_onnx_path(f"{run}:folds") == run / "model-folds.onnx"
    ckpts = run / "checkpoints"
    for given in ("best-2.safetensors", "best-2.json", "best-2.state.safetensors"):
        assert _default_onnx_path(ckpts / given) == ckpts / "best-2.onnx"

    kept = []
    for rank, epoch in enumerate((3, 1), start=1):
        make_checkpoint(ckpts / f"epoch-{epoch:04d}.safetensors", seed=10 + epoch)
        kept.append(
            {"rank": rank, "epoch": epoch, "path": f"checkpoints/epoch-{epoch:04d}.safetensors"}
        )
    (ckpts / "kept.json").write_text(json.dumps({"keep_best": 2, "kept": kept}))
    assert main(["export", f"{run}:best2", "--onnx"]) == 0
    assert (run / "model-best2.onnx").is_file()
    assert OnnxModel(run / "model-best2.onnx").kind == "ensemble of 2 checkpoints"
    assert not list(run.parent.glob("*:*"))


class _TracingTypeError(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        raise TypeError("a bug in the model's forward")


def test_a_type_error_while_tracing_is_not_retried_with_the_other_exporter() -> None:
    module = _TracingTypeError()
    with pytest.raises(TypeError, match="a bug in the model's forward"):
        export._export_bytes(module, torch.rand(2, 1, 8, 8), export.OPSET)
    assert module.calls == 1


def test_a_torch_without_the_torchscript_exporter_uses_torch_export(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict] = []

    class Program:
        model_proto = onnx.ModelProto(doc_string="dynamo")

    def export_without_torchscript(model, args=(), f=None, *, dynamo=True, **kwargs):
        calls.append({"dynamo": dynamo, **kwargs})
        return Program()

    monkeypatch.setattr(torch.onnx, "export", export_without_torchscript)
    assert not export._torchscript_exporter_available()
    data = export._export_bytes(nn.Identity(), torch.rand(2, 1, 8, 8), export.OPSET)
    assert onnx.load_from_string(data).doc_string == "dynamo"
    assert calls[0]["dynamo"] is True and "dynamic_shapes" in calls[0]


def _fail_export(*args, **kwargs) -> bytes:
    raise RuntimeError("exporter broke")


def _fail_check(*args, **kwargs) -> None:
    raise onnx.checker.ValidationError("graph is invalid")


@pytest.mark.parametrize(
    ("target", "replacement", "error"),
    [
        ("cxrlabel.models.onnx._export_bytes", _fail_export, RuntimeError),
        ("onnx.checker.check_model", _fail_check, onnx.checker.ValidationError),
    ],
)
def test_auto_backend_falls_back_to_torch_when_the_export_fails(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    target: str,
    replacement,
    error: type[Exception],
) -> None:
    ckpt = make_checkpoint(tmp_path / "a" / "best.safetensors", seed=7)
    monkeypatch.setattr(target, replacement)
    with caplog.at_level(logging.WARNING, logger="cxrlabel.models.predictor"):
        model = load_model([ckpt], backend="auto", device="cpu", flags=AVX2_ONLY)
    assert type(model).__name__ == "Ensemble"
    assert error.__name__ in caplog.text and "labelling with PyTorch" in caplog.text
    with pytest.raises(error):
        load_model([ckpt], backend="onnx", device="cpu")


def test_equalising_models_are_not_exported_and_auto_labels_with_torch(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The graph cannot equalise, so export refuses; --backend auto falls back to PyTorch,
    which equalises (checkpoint round trip of the setting included)."""
    torch.manual_seed(0)
    model = create_model("tiny", "linear", LABELS, weights="none", size=64, equalize="hist")
    ckpt = tmp_path / "eq" / "best.safetensors"
    save_checkpoint(ckpt, model, config={}, epoch=1, step=1)
    with pytest.raises(ValueError, match=r"equalize=.hist.*--backend torch"):
        export_onnx([ckpt], tmp_path / "model.onnx")
    with caplog.at_level(logging.WARNING):
        labeller = load_model([ckpt], backend="auto", device="cpu", flags=AVX2_ONLY)
    assert not isinstance(labeller, OnnxModel)
    assert "ONNX Runtime not used" in caplog.text
    assert labeller.preprocessing.equalize == "hist"
    images = films(tiny_dataset, 3)
    plain = create_model("tiny", "linear", LABELS, weights="none", size=64)
    plain.load_state_dict(model.state_dict())
    plain_ckpt = tmp_path / "plain" / "best.safetensors"
    save_checkpoint(plain_ckpt, plain, config={}, epoch=1, step=1)
    plain_probs = load_ensemble([plain_ckpt], device="cpu").predict_images(images)
    assert not np.allclose(labeller.predict_images(images), plain_probs)


def test_onnx_with_external_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crafted graph whose initializer lives in another file (read relative to the serving
    process's folder): cxrlabel's exports never use external data, so it is refused unread."""
    from onnx import TensorProto

    ckpt = make_checkpoint(tmp_path / "a" / "best.safetensors", seed=0)
    proto = onnx.load(str(export_onnx([ckpt], tmp_path / "model.onnx")))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"\0" * size)
    crafted = tmp_path / "crafted.onnx"
    crafted.write_bytes(proto.SerializeToString())
    with pytest.raises(OnnxModelError, match=r"crafted\.onnx.*external data"):
        OnnxModel(crafted)
