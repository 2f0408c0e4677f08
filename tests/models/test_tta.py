"""Test-time augmentation: the fixed transforms (no flips) and TTAPredictor on every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlabel.data.images import read_image
from cxrlabel.labelling.heatmaps import heatmap_model
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.factory import create_model
from cxrlabel.models.onnx import OnnxModel, export_onnx
from cxrlabel.models.predictor import Predictor, load_model
from cxrlabel.models.thresholds import Thresholds
from cxrlabel.models.tta import MAX_TTA, TTA_TRANSFORMS, TTAPredictor, check_tta, with_tta

LABELS = ("Atelectasis", "Cardiomegaly", "Edema")


def _checkpoint(path: Path, *, seed: int, size: int = 64) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny", "linear", LABELS, weights="none", size=size)
    thresholds = Thresholds(LABELS, (0.3, 0.5, 0.7), "youden")
    save_checkpoint(
        path, model, config={"name": f"run{seed}"}, epoch=1, step=1, thresholds=thresholds
    )
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tta")
    return {
        "a": _checkpoint(folder / "a" / "best.safetensors", seed=1),
        "small": _checkpoint(folder / "small" / "best.safetensors", seed=3, size=48),
    }


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    a, small = checkpoints["a"], checkpoints["small"]
    onnx_path = export_onnx([a], tmp_path_factory.mktemp("tta-onnx") / "a.onnx")
    return {
        "torch": load_ensemble([a], device="cpu"),
        "mixed-size ensemble": load_ensemble([a, small], device="cpu"),
        "onnx": OnnxModel(onnx_path),
        "native onnx file": load_model(onnx_path, backend="native"),
    }


def _films(tiny_dataset: Path) -> list[np.ndarray]:
    films = [read_image(p) for p in sorted(tiny_dataset.rglob("*.jpg"))[:2]]
    films.append(np.random.default_rng(0).random((50, 90), dtype=np.float32))  # not square
    return films


def test_tta_1_is_exactly_the_inner_model(models: dict[str, Predictor], tiny_dataset: Path) -> None:
    films = _films(tiny_dataset)
    for backend, inner in models.items():
        assert with_tta(inner, 1) is inner, backend  # off: nothing wrapped, outputs unchanged
        wrapped = TTAPredictor(inner, 1)
        assert np.array_equal(wrapped.predict_images(films), inner.predict_images(films)), backend
        assert wrapped.kind == inner.kind and wrapped.model_info()["tta"] == 1


def test_tta_3_is_the_mean_over_three_transformed_inputs(
    models: dict[str, Predictor], tiny_dataset: Path
) -> None:
    films = _films(tiny_dataset)
    for backend, inner in models.items():
        tta = with_tta(inner, 3)
        by_hand = np.mean(
            [inner.predict_images([t.apply(f) for f in films]) for t in TTA_TRANSFORMS[:3]],
            axis=0,
        )
        got = tta.predict_images(films)
        assert got.shape == (len(films), len(LABELS)) and got.dtype == np.float32, backend
        np.testing.assert_allclose(got, by_hand, rtol=0, atol=1e-6, err_msg=backend)
        # The transforms do change the film: TTA is not the identity prediction.
        assert not np.allclose(got, inner.predict_images(films), atol=1e-6), backend
        assert tta.predict_images([]).shape == (0, len(LABELS)), backend


def test_tta_predictor_satisfies_the_protocol_and_keeps_labels_and_thresholds(
    models: dict[str, Predictor], checkpoints: dict[str, Path]
) -> None:
    for backend, inner in models.items():
        tta = TTAPredictor(inner, 2)
        assert isinstance(tta, Predictor), backend
        assert tta.labels == inner.labels and tta.thresholds == inner.thresholds, backend
        assert tta.name == inner.name and tta.kind == f"{inner.kind}, TTA x2", backend
        assert tta.preprocessing == inner.preprocessing, backend
        assert tta.member_preprocessings == inner.member_preprocessings, backend
        info = tta.model_info()
        assert info["tta"] == 2 and info["tta_transforms"] == ["identity", "zoom 1.05"]
        assert info["kind"] == tta.kind and info["members"] == inner.model_info()["members"]
        torch_model, path = tta.torch_model()
        assert path == checkpoints["a"] and torch_model is not None, backend


def test_heatmaps_say_they_are_drawn_without_tta(models: dict[str, Predictor]) -> None:
    cam = heatmap_model(TTAPredictor(models["torch"], 3))
    assert cam.available and "without the labels' 3-transform TTA" in cam.note
    assert "TTA" not in heatmap_model(models["torch"]).note


def _asymmetric_film() -> np.ndarray:
    """Bright in the top-left quadrant only: a left-right (or up-down) flip moves it away."""
    film = np.zeros((64, 80), dtype=np.float32)
    film[6:28, 6:34] = 0.9
    film[10:20, 8:18] = 1.0
    return film


def _quadrant_sums(img: np.ndarray) -> np.ndarray:
    top, half = img.shape[0] // 2, img.shape[1] // 2
    return np.array(
        [
            img[:top, :half].sum(),
            img[:top, half:].sum(),
            img[top:, :half].sum(),
            img[top:, half:].sum(),
        ]
    )


def test_no_transform_flips_the_film() -> None:
    film = _asymmetric_film()
    for t in TTA_TRANSFORMS:
        out = t.apply(film)
        assert out.shape == film.shape and out.dtype == np.float32, t.name
        assert out.min() >= 0.0 and out.max() <= 1.0, t.name
        top_left, *others = _quadrant_sums(out)
        assert top_left > 10 * max(max(others), 1e-3), (t.name, top_left, others)
        # Mild: much nearer the film than its left-right mirror image.
        near, mirrored = np.abs(out - film).mean(), np.abs(out - film[:, ::-1]).mean()
        assert near < mirrored / 3, (t.name, near, mirrored)
    # The check can fail: a flipped film does.
    flipped_sums = _quadrant_sums(film[:, ::-1])
    assert flipped_sums[1] > 10 * flipped_sums[0]


def test_transforms_are_fixed_ordered_and_deterministic() -> None:
    assert TTA_TRANSFORMS[0].is_identity and MAX_TTA == len(TTA_TRANSFORMS) >= 5
    assert len({t.name for t in TTA_TRANSFORMS}) == MAX_TTA
    assert all(not t.is_identity for t in TTA_TRANSFORMS[1:])
    film = _asymmetric_film()
    assert TTA_TRANSFORMS[0].apply(film) is film
    for t in TTA_TRANSFORMS[1:]:
        assert np.array_equal(t.apply(film), t.apply(film.copy())), t.name
        assert not np.array_equal(t.apply(film), film), t.name


@pytest.mark.parametrize("n", [0, -1, MAX_TTA + 1, 100])
def test_a_tta_outside_the_list_is_a_clear_error(n: int, models: dict[str, Predictor]) -> None:
    with pytest.raises(ValueError, match=f"between 1 \\(off\\) and {MAX_TTA}.*got {n}"):
        check_tta(n)
    with pytest.raises(ValueError, match="--tta must be between"):
        TTAPredictor(models["torch"], n)
    with pytest.raises(ValueError, match="--tta must be between"):
        with_tta(models["torch"], n)


def test_tta_must_be_a_whole_number() -> None:
    for bad in (True, 2.0, "2"):
        with pytest.raises(ValueError, match="whole number"):
            check_tta(bad)  # type: ignore[arg-type]
    assert check_tta(MAX_TTA) == MAX_TTA
