"""Grad-CAM heatmaps: target layer per backbone, CAM geometry, overlays and contact sheets."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlabel.data.transforms import Preprocessing
from cxrlabel.labelling.heatmaps import (
    contact_sheet_png,
    find_target_layer,
    gradcam,
    gradcams,
    overlay_png,
    overlay_rgb,
)
from cxrlabel.models.factory import create_model

LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion", "Pneumothorax")


def film(height: int = 72, width: int = 96) -> np.ndarray:
    """A film-like image: a bright blob left of centre on a gradient, not square."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.exp(-(((yy - height * 0.5) / 10) ** 2 + ((xx - width * 0.35) / 12) ** 2))
    return np.clip(0.2 + 0.3 * xx / width + 0.5 * blob, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny", "linear", LABELS, weights="none", size=64).eval()


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("tiny", "backbone.features"), ("densenet121", "backbone.features"), ("mobilenet", None)],
)
def test_target_layer_is_the_last_spatial_map(backbone: str, expected: str | None) -> None:
    model = create_model(backbone, "linear", LABELS, weights="none", size=64).eval()
    layer = find_target_layer(model)
    name = next(n for n, m in model.named_modules() if m is layer)
    if expected is not None:
        assert name == expected
    shapes = []
    handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    handle.remove()
    assert len(shapes[0]) == 4 and shapes[0][2] * shapes[0][3] > 1
    cam = gradcam(model, film(), "Edema")
    assert cam.shape == (72, 96) and cam.dtype == np.float32


def test_cam_is_in_range_at_film_size_and_differs_between_labels(tiny) -> None:
    image = film()
    cams = gradcams(tiny, image, list(LABELS))
    for cam in cams.values():
        assert cam.shape == image.shape and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0
    varying = [name for name, cam in cams.items() if cam.std() > 1e-3]
    assert varying, "every CAM is constant"
    pairs = [(a, b) for a in cams for b in cams if a < b]
    assert any(np.abs(cams[a] - cams[b]).max() > 1e-2 for a, b in pairs)
    # One pass for several labels gives what separate calls give.
    single = gradcam(tiny, image, varying[0])
    np.testing.assert_allclose(single, cams[varying[0]], atol=1e-5)


def test_cam_follows_pad_geometry(tiny) -> None:
    # A wide film padded into the square: the CAM maps back over the film only, and a film
    # twice as large gives the same CAM at twice the size (up to resampling).
    image = film(40, 120)
    cam = gradcam(tiny, image, "Edema")
    big = gradcam(tiny, np.asarray(Image.fromarray(image).resize((240, 80))), "Edema")
    small_of_big = np.asarray(Image.fromarray(big).resize((120, 40), Image.Resampling.BILINEAR))
    assert cam.shape == (40, 120) and big.shape == (80, 240)
    assert np.abs(small_of_big - cam).mean() < 0.1


def test_crop_mode_leaves_the_unseen_edges_empty() -> None:
    torch.manual_seed(1)
    model = create_model("tiny", "linear", LABELS, weights="none", size=64).eval()
    model.preprocessing = Preprocessing(64, (0.5,) * 3, (0.25,) * 3, "crop", "bilinear")
    cams = gradcams(model, film(64, 128), list(LABELS))
    # The model saw only the central 64 x 64 of the 128-wide film.
    for cam in cams.values():
        assert cam[:, :10].max() == 0.0 and cam[:, -10:].max() == 0.0


def test_wrong_label_and_bad_shapes_are_refused(tiny) -> None:
    with pytest.raises(ValueError, match="not predicted"):
        gradcam(tiny, film(), "Fracture")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        gradcam(tiny, np.zeros((3, 8, 8), np.float32), "Edema")
    with pytest.raises(ValueError, match="same"):
        overlay_png(film(), np.zeros((5, 5), np.float32))


def test_overlay_keeps_the_film_where_the_cam_is_zero() -> None:
    image = film()
    cam = np.zeros_like(image)
    cam[20:40, 30:60] = 1.0
    rgb = overlay_rgb(image, cam)
    grey = np.rint(image * 255).astype(np.uint8)
    assert (rgb[0, 0] == grey[0, 0]).all()
    inside = rgb[30, 45].astype(int)
    assert inside.max() - inside.min() > 30  # coloured, not grey
    png = overlay_png(image, cam)
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (96, 72) and decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), rgb)


def test_contact_sheet_has_the_film_and_one_tile_per_label(tiny) -> None:
    image = film()
    cams = gradcams(tiny, image, ["Edema", "Cardiomegaly"])
    sheet = Image.open(io.BytesIO(contact_sheet_png(image, cams, title="t", tile=64)))
    assert sheet.size == (3 * 64, 18 + 64 + 16)
    empty = Image.open(io.BytesIO(contact_sheet_png(image, {}, tile=64)))
    assert empty.size == (64, 64 + 16)
