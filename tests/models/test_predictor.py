"""The runnable-model layer: the Predictor protocol (Ensemble and OnnxModel), load_model's
backends, the shared resize, and the model Grad-CAM runs on (heatmap_model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlabel.data.images import read_image
from cxrlabel.data.transforms import Preprocessing
from cxrlabel.labelling.heatmaps import find_target_layer, gradcams, heatmap_model
from cxrlabel.labelling.service import public_info
from cxrlabel.models.checkpoint import checkpoint_paths, save_checkpoint
from cxrlabel.models.ensemble import Ensemble, load_ensemble
from cxrlabel.models.factory import CXRModel, create_model
from cxrlabel.models.onnx import OnnxModel, export_onnx
from cxrlabel.models.predictor import (
    BACKENDS,
    PRECISIONS,
    InferencePlan,
    Predictor,
    default_backend,
    inference_plan,
    load_model,
    shared_resize,
)
from cxrlabel.models.thresholds import Thresholds
from tests.helpers import copy_checkpoint

LABELS = ("Atelectasis", "Cardiomegaly", "Edema")
INFO_KEYS = {"name", "kind", "labels", "thresholds", "package", "precision", "members"}
MEMBER_KEYS = {"path", "backbone", "head", "preprocessing", "epoch", "sha256"}
# CPU feature flags injected so that no test depends on the CPU that runs it.
AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}
AMX = AVX2_ONLY | {"amx_tile", "amx_bf16"}
# How far bf16 autocast may move a probability from fp32 (README, benchmarks/bench_label.py).
BF16_TOLERANCE = 0.005


def _checkpoint(path: Path, *, seed: int, size: int = 64) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny", "linear", LABELS, weights="none", size=size)
    thresholds = Thresholds(LABELS, (0.3, 0.5, 0.7), "youden").with_band(0.05)
    save_checkpoint(
        path, model, config={"name": f"run{seed}"}, epoch=1, step=3, thresholds=thresholds
    )
    return path


def _films(tiny_dataset: Path, n: int) -> list[np.ndarray]:
    films = [read_image(p) for p in sorted(tiny_dataset.rglob("*.jpg"))[:n]]
    films.append(np.random.default_rng(0).random((50, 90), dtype=np.float32))  # not square
    return films


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("predictor")
    return {
        "a": _checkpoint(folder / "a" / "best.safetensors", seed=1),
        "b": _checkpoint(folder / "b" / "best.safetensors", seed=2),
        "small": _checkpoint(folder / "small" / "best.safetensors", seed=3, size=48),
    }


def _models(checkpoints: dict[str, Path], tmp_path: Path) -> dict[str, Predictor]:
    a, b, small = checkpoints["a"], checkpoints["b"], checkpoints["small"]
    return {
        "single checkpoint": load_ensemble([a], device="cpu"),
        "mixed-size ensemble": load_ensemble([a, small], device="cpu"),
        "onnx file": OnnxModel(export_onnx([a], tmp_path / "a.onnx")),
        "onnx ensemble": OnnxModel.from_checkpoints([a, b], device="cpu"),
    }


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


def test_ensemble_and_onnx_model_satisfy_the_protocol(
    checkpoints: dict[str, Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    films = _films(tiny_dataset, 3)
    for kind, model in _models(checkpoints, tmp_path).items():
        assert isinstance(model, Predictor), kind
        assert model.labels == LABELS, kind
        assert isinstance(model.thresholds, Thresholds) and model.thresholds.labels == LABELS
        assert isinstance(model.name, str) and model.name, kind
        assert isinstance(model.kind, str) and model.kind, kind
        assert isinstance(model.preprocessing, Preprocessing), kind
        preps = model.member_preprocessings
        info = model.model_info()
        assert set(info) >= INFO_KEYS, (kind, set(info))
        assert info["labels"] == list(LABELS) and info["name"] == model.name
        assert len(preps) == len(info["members"]) > 0, kind
        assert preps[0] == model.preprocessing, kind
        for member, prep in zip(info["members"], preps, strict=True):
            assert set(member) >= MEMBER_KEYS, kind
            assert Preprocessing.from_dict(member["preprocessing"]) == prep, kind
        probs = model.predict_images(films)
        assert probs.shape == (len(films), len(LABELS)) and probs.dtype == np.float32, kind
        assert np.all((probs >= 0) & (probs <= 1)), kind
        assert model.predict_images([]).shape == (0, len(LABELS)), kind
        torch_model, path = model.torch_model()
        assert isinstance(torch_model, CXRModel) and path == checkpoints["a"], kind
    assert not isinstance(object(), Predictor)


def test_an_ensemble_of_different_preprocessings_says_so(checkpoints: dict[str, Path]) -> None:
    mixed = load_ensemble([checkpoints["a"], checkpoints["small"]], device="cpu")
    assert mixed.preprocessing.size == 64  # the first member's
    assert [p.size for p in mixed.member_preprocessings] == [64, 48]
    assert shared_resize([mixed]) is None
    same = load_ensemble([checkpoints["a"], checkpoints["b"]], device="cpu")
    assert shared_resize([same]) == same.preprocessing.geometry
    assert shared_resize([same, load_ensemble([checkpoints["small"]], device="cpu")]) is None


def test_shared_resize_ignores_normalisation_and_spans_backends(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    torch_model = load_ensemble([checkpoints["a"]], device="cpu")
    onnx_model = OnnxModel(export_onnx([checkpoints["b"]], tmp_path / "b.onnx"))
    assert shared_resize([torch_model, onnx_model]) == torch_model.preprocessing.geometry
    prep = torch_model.preprocessing
    other_norm = Preprocessing(
        prep.size, (0.1,) * 3, (0.9,) * 3, prep.resize_mode, prep.interpolation
    )
    assert other_norm.geometry == prep.geometry
    crop = Preprocessing(prep.size, prep.mean, prep.std, "crop", prep.interpolation)
    assert crop.geometry != prep.geometry


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


def test_load_model_backends(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    a = checkpoints["a"]
    onnx_path = export_onnx([a], tmp_path / "model.onnx")
    assert BACKENDS == ("auto", "torch", "onnx", "native")
    assert default_backend("cpu", flags=AVX2_ONLY) == "onnx"
    assert type(load_model([a], backend="torch", device="cpu")) is Ensemble
    assert type(load_model([a], backend="onnx", device="cpu")) is OnnxModel
    auto = load_model(a, backend="auto", device="cpu", flags=AVX2_ONLY)  # one spec, not a list
    assert type(auto) is OnnxModel
    for backend in ("auto", "onnx", "native"):
        assert type(load_model([onnx_path], backend=backend, device="cpu")) is OnnxModel
    with pytest.raises(ValueError, match="not torch"):
        load_model([onnx_path], backend="torch", device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        load_model([a], backend="tensorflow", device="cpu")


def test_auto_plan_follows_the_cpu_flags() -> None:
    """bf16 autocast + channels_last where AMX is present (measured faster there than ONNX
    Runtime); ONNX Runtime fp32 elsewhere, AVX512-BF16 without AMX included (measured slower
    in bf16); an explicit precision wins."""
    assert PRECISIONS == ("auto", "fp32", "bf16")
    for flags in (AMX, AVX512_BF16 | AMX):
        plan = inference_plan("cpu", flags=flags)
        assert (plan.backend, plan.precision) == ("torch", "bf16"), flags
        assert "AMX" in plan.reason
        assert default_backend("cpu", flags=flags) == "torch"
        exact = inference_plan("cpu", "fp32", flags=flags)
        assert (exact.backend, exact.precision) == ("onnx", "fp32"), flags
    onnx_plan = InferencePlan("onnx", "fp32", "CPU without AMX: ONNX Runtime fp32 measured fastest")
    for flags in (AVX2_ONLY, AVX512_BF16):
        assert inference_plan("cpu", flags=flags) == onnx_plan, flags
        assert default_backend("cpu", flags=flags) == "onnx"
        asked = inference_plan("cpu", "bf16", flags=flags)
        assert (asked.backend, asked.precision) == ("torch", "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_plan("cpu", "fp16")


def test_load_model_takes_the_planned_path(checkpoints: dict[str, Path]) -> None:
    a = checkpoints["a"]
    fast = load_model([a], backend="auto", device="cpu", flags=AMX)
    assert type(fast) is Ensemble and fast.precision == "bf16"
    conv = next(p for p in fast.members[0].model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    info = fast.model_info()
    assert info["precision"] == "bf16" and public_info(info)["precision"] == "bf16"  # /model
    for flags in (AVX2_ONLY, AVX512_BF16):
        slow = load_model([a], backend="auto", device="cpu", flags=flags)
        assert type(slow) is OnnxModel and slow.model_info()["precision"] == "fp32"
    exact = load_model([a], backend="auto", device="cpu", precision="fp32", flags=AMX)
    assert type(exact) is OnnxModel
    # --backend torch and the service's native backend stay fp32 unless bf16 is asked for.
    for backend in ("torch", "native"):
        plain = load_model([a], backend=backend, device="cpu", flags=AMX)
        assert plain.model_info()["precision"] == "fp32", backend
        asked = load_model([a], backend=backend, device="cpu", precision="bf16")
        assert asked.model_info()["precision"] == "bf16", backend
    with pytest.raises(ValueError, match="ONNX Runtime runs in fp32"):
        load_model([a], backend="onnx", device="cpu", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_model([a], backend="torch", device="cpu", precision="half")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_ensemble([a], device="cpu", precision="half")


def test_bf16_probabilities_stay_within_the_tolerance_of_fp32(
    checkpoints: dict[str, Path], tiny_dataset: Path
) -> None:
    """bf16 autocast runs on any CPU (emulated where it is not native), so this holds on
    every machine; the two really differ, so bf16 was in effect."""
    films = _films(tiny_dataset, 6)
    specs = [checkpoints["a"], checkpoints["small"]]  # a mixed-size ensemble too
    fp32 = load_model(specs, backend="torch", device="cpu", precision="fp32")
    bf16 = load_model(specs, backend="torch", device="cpu", precision="bf16")
    want, got = fp32.predict_images(films), bf16.predict_images(films)
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = np.abs(got - want).max()
    assert 0 < diff <= BF16_TOLERANCE, diff
    np.testing.assert_allclose(
        want, load_ensemble(specs, device="cpu").predict_images(films), atol=1e-6
    )


def test_native_backend_keeps_each_file_on_its_own_runtime(
    checkpoints: dict[str, Path], tmp_path: Path, tiny_dataset: Path
) -> None:
    """What the service loads: checkpoints stay PyTorch (never exported on the fly, as
    `label --backend auto` may), an .onnx file runs with ONNX Runtime."""
    a = checkpoints["a"]
    onnx_path = export_onnx([a], tmp_path / "model.onnx")
    native = load_model([a], backend="native", device="cpu")
    assert type(native) is Ensemble
    films = _films(tiny_dataset, 2)
    expected = load_ensemble([a], device="cpu").predict_images(films)
    np.testing.assert_allclose(native.predict_images(films), expected, atol=1e-6)
    assert type(load_model([onnx_path], backend="native", device="cpu")) is OnnxModel
    upper = onnx_path.rename(tmp_path / "MODEL.ONNX")  # the suffix is matched in any case
    assert type(load_model([upper], backend="native", device="cpu")) is OnnxModel
    with pytest.raises(ValueError, match=r"give one \.onnx file"):
        load_model([upper, a], backend="native")


# --------------------------------------------------------------------------------------------
# heatmap_model: the PyTorch model (and target layer) Grad-CAM runs on
# --------------------------------------------------------------------------------------------


def test_heatmap_model_of_an_ensemble_is_its_first_member(checkpoints: dict[str, Path]) -> None:
    single = load_ensemble([checkpoints["a"]], device="cpu")
    cam = heatmap_model(single)
    assert cam.available and cam.reason is None
    assert cam.model is single.members[0].model and not cam.model.training
    assert cam.layer is find_target_layer(cam.model)
    assert cam.note == f"Grad-CAM from {checkpoints['a']}"
    pair = heatmap_model(load_ensemble([checkpoints["b"], checkpoints["a"]], device="cpu"))
    assert pair.note.startswith(f"Grad-CAM from {checkpoints['b']}")
    assert "the first of the 2 ensemble members" in pair.note


def test_heatmap_model_of_an_onnx_file_reloads_its_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, tiny_dataset: Path
) -> None:
    ckpt = copy_checkpoint(checkpoints["a"], tmp_path / "run")
    onnx_model = OnnxModel(export_onnx([ckpt], tmp_path / "m.onnx"))
    cam = heatmap_model(onnx_model)
    assert cam.available and cam.note == f"Grad-CAM from {ckpt}"
    film = _films(tiny_dataset, 1)[0]
    torch_cam = heatmap_model(load_ensemble([ckpt], device="cpu"))
    got = gradcams(cam.model, film, ["Edema"], target_layer=cam.layer)["Edema"]
    want = gradcams(torch_cam.model, film, ["Edema"], target_layer=torch_cam.layer)["Edema"]
    np.testing.assert_allclose(got, want, atol=1e-5)

    _checkpoint(ckpt, seed=9)  # retrained in place: the graph no longer matches it
    with pytest.raises(ValueError, match="has changed"):
        heatmap_model(onnx_model)
    changed = heatmap_model(onnx_model, required=False)
    assert not changed.available and changed.model is None and changed.layer is None
    assert changed.reason.startswith("heatmaps unavailable: ") and "has changed" in changed.reason


def test_heatmap_model_without_the_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = copy_checkpoint(checkpoints["a"], tmp_path / "gone")
    onnx_model = OnnxModel(export_onnx([ckpt], tmp_path / "m.onnx"))
    for path in checkpoint_paths(ckpt):
        path.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="was not found"):
        heatmap_model(onnx_model)
    with caplog.at_level("WARNING", logger="cxrlabel.labelling.heatmaps"):
        missing = heatmap_model(onnx_model, required=False)
    assert not missing.available and missing.model is None
    assert "PyTorch checkpoint" in missing.reason and str(ckpt) in missing.reason
    assert missing.reason in caplog.text


def test_compiled_models_give_the_eager_probabilities(
    checkpoints: dict[str, Path], tiny_dataset: Path
) -> None:
    """torch.compile (issue 12's `compile` option) for inference: same probabilities, the
    members stay eager modules (Grad-CAM hooks them), recorded in model_info; not for ONNX."""
    films = _films(tiny_dataset, 4)
    eager = load_model([checkpoints["a"]], backend="torch", device="cpu")
    compiled = load_model([checkpoints["a"]], backend="torch", device="cpu", compile=True)
    np.testing.assert_allclose(
        compiled.predict_images(films), eager.predict_images(films), atol=1e-5
    )
    assert type(compiled.members[0].model) is CXRModel
    assert compiled.model_info()["compiled"] is True and "compiled" not in eager.model_info()
    # auto would choose ONNX Runtime on this CPU (flags injected); compile means PyTorch.
    chosen = load_model([checkpoints["a"]], backend="auto", device="cpu", flags=AVX2_ONLY,
                        compile=True)  # fmt: skip
    assert type(chosen) is Ensemble and chosen.precision == "fp32"
    with pytest.raises(ValueError, match="compile runs PyTorch models"):
        load_model([checkpoints["a"]], backend="onnx", device="cpu", compile=True)
