"""Tests for cxrlabel.data.transforms: resize geometry, dtype helpers, normalisation,
augmentation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlabel.data.transforms import (
    AUGMENT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    Preprocessing,
    augment,
    augment_batch,
    augment_draws,
    from_uint8,
    preprocess,
    resize,
    to_model_input,
    to_model_input_batch,
    to_uint8,
)

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fixtures"


def _prep(**overrides: object) -> Preprocessing:
    values: dict[str, object] = {
        "size": 32,
        "mean": (0.5, 0.25, 0.1),
        "std": (0.5, 0.25, 0.2),
        "resize_mode": "pad",
        "interpolation": "bilinear",
    }
    values.update(overrides)
    return Preprocessing(**values)  # type: ignore[arg-type]


def _left_bright(height: int = 40, width: int = 40) -> torch.Tensor:
    img = torch.zeros(height, width)
    img[:, : width // 2] = 1.0
    return img


# --------------------------------------------------------------------------------------------
# resize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_pad_keeps_aspect_and_pads_black(interpolation: str) -> None:
    img = np.ones((50, 100), dtype=np.float32)  # white, twice as wide as tall
    out = resize(img, 64, mode="pad", interpolation=interpolation)
    assert out.shape == (64, 64) and out.dtype == np.float32
    # Content is 32 rows tall, centred: rows 16..47 white, the rest black padding.
    assert np.all(out[:16] == 0) and np.all(out[48:] == 0)
    np.testing.assert_allclose(out[16:48], 1.0, atol=1e-6)


def test_pad_tall_image_pads_columns() -> None:
    out = resize(np.ones((100, 50), dtype=np.float32), 64, mode="pad")
    assert np.all(out[:, :16] == 0) and np.all(out[:, 48:] == 0)
    np.testing.assert_allclose(out[:, 16:48], 1.0, atol=1e-6)


def test_crop_fills_square_and_keeps_centre() -> None:
    img = np.zeros((50, 100), dtype=np.float32)
    img[:, 20:80] = 1.0  # white centre, black sides that crop removes
    out = resize(img, 40, mode="crop")
    assert out.shape == (40, 40) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)  # the black sides were cropped away


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (320, 320), (1955, 1841)])
def test_both_modes_give_exact_size(mode: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    img = rng.random(shape, dtype=np.float32)
    out = resize(img, 224, mode=mode, interpolation="bicubic")
    assert out.shape == (224, 224) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0  # bicubic overshoot clipped


def test_resize_is_deterministic_and_does_not_modify_input() -> None:
    img = np.random.default_rng(1).random((123, 77), dtype=np.float32)
    copy = img.copy()
    a, b = resize(img, 64), resize(img, 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img, copy)


def test_resize_same_size_is_identity() -> None:
    img = np.random.default_rng(2).random((32, 32), dtype=np.float32)
    out = resize(img, 32, mode="crop")
    np.testing.assert_array_equal(out, img)
    assert out is not img


def test_resize_rejects_bad_arguments() -> None:
    img = np.zeros((10, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="mode"):
        resize(img, 8, mode="stretch")
    with pytest.raises(ValueError, match="interpolation"):
        resize(img, 8, interpolation="nearest")
    with pytest.raises(ValueError, match="shape"):
        resize(np.zeros((3, 10, 10), dtype=np.float32), 8)


def test_resize_1024_to_320_is_fast() -> None:
    img = np.random.default_rng(3).random((1024, 1024), dtype=np.float32)
    resize(img, 320)
    start = time.perf_counter()
    for _ in range(5):
        resize(img, 320)
    per_call = (time.perf_counter() - start) / 5
    assert per_call < 0.1, f"1024->320 resize took {per_call * 1000:.1f} ms"


# --------------------------------------------------------------------------------------------
# uint8 helpers
# --------------------------------------------------------------------------------------------


def test_uint8_round_trip() -> None:
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(to_uint8(from_uint8(every)), every)
    floats = from_uint8(every)
    assert floats.dtype == np.float32 and floats.min() == 0.0 and floats.max() == 1.0


def test_to_uint8_rounds_and_clips() -> None:
    values = np.array([-0.5, 0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.7, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 0, 0, 255, 255, 0])
    assert to_uint8(np.array([0.6 / 255], dtype=np.float32))[0] == 1


def test_from_uint8_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError, match="uint8"):
        from_uint8(np.zeros(3, dtype=np.uint16))


# --------------------------------------------------------------------------------------------
# Model input
# --------------------------------------------------------------------------------------------


def test_to_model_input_shape_and_values() -> None:
    prep = _prep()
    img = np.full((32, 32), 0.75, dtype=np.float32)
    img[0, 0] = 0.0
    x = to_model_input(img, prep)
    assert isinstance(x, torch.Tensor)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(0.75 - 0.5) / 0.5, (0.75 - 0.25) / 0.25, (0.75 - 0.1) / 0.2]
    for channel, value in enumerate(expected):
        assert torch.allclose(x[channel, 1:, 1:], torch.tensor(value))
    assert torch.allclose(x[:, 0, 0], torch.tensor([-1.0, -1.0, -0.5]))


def test_to_model_input_accepts_tensors_and_batches() -> None:
    prep = _prep()
    img = torch.rand(32, 32)
    single = to_model_input(img, prep)
    assert torch.equal(to_model_input(img[None], prep), single)
    assert torch.equal(to_model_input(img.numpy(), prep), single)
    batch = to_model_input_batch(torch.stack([img, 1 - img]), prep)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[0], single)
    with pytest.raises(ValueError, match="shape"):
        to_model_input(torch.rand(3, 32, 32), prep)


def test_preprocess_resizes_then_normalises() -> None:
    prep = _prep(size=16, resize_mode="crop")
    x = preprocess(np.ones((40, 20), dtype=np.float32), prep)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[0], torch.tensor((1.0 - 0.5) / 0.5))


# --------------------------------------------------------------------------------------------
# Preprocessing config
# --------------------------------------------------------------------------------------------


def test_preprocessing_dict_round_trip() -> None:
    prep = _prep(resize_mode="crop", interpolation="bicubic")
    d = prep.to_dict()
    assert d == {
        "size": 32,
        "mean": [0.5, 0.25, 0.1],
        "std": [0.5, 0.25, 0.2],
        "resize_mode": "crop",
        "interpolation": "bicubic",
    }
    assert Preprocessing.from_dict(d) == prep


def test_preprocessing_rejects_unknown_and_missing_keys() -> None:
    d = _prep().to_dict()
    with pytest.raises(ValueError, match="unknown Preprocessing keys"):
        Preprocessing.from_dict({**d, "crop_pct": 0.9})
    del d["mean"]
    with pytest.raises(TypeError, match="mean"):
        Preprocessing.from_dict(d)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"size": 0}, "size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"interpolation": "nearest"}, "interpolation"),
    ],
)
def test_preprocessing_validates(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _prep(**overrides)


def test_from_timm_config() -> None:
    cfg = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    prep = Preprocessing.from_timm_config(cfg)
    assert prep == Preprocessing(224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "pad", "bicubic")
    assert Preprocessing.from_timm_config({"pretrained_cfg": cfg}, resize_mode="crop") == (
        Preprocessing(224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "crop", "bicubic")
    )
    imagenet = {"input_size": [3, 320, 320], "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    assert Preprocessing.from_timm_config(imagenet).mean == IMAGENET_MEAN
    with pytest.raises(KeyError, match="mean"):
        Preprocessing.from_timm_config({"input_size": (3, 224, 224), "std": (1, 1, 1)})
    with pytest.raises(ValueError, match="square"):
        Preprocessing.from_timm_config({**cfg, "input_size": (3, 224, 256)})


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

_STRONG = AugmentConfig(
    rotation_deg=10, scale=(0.9, 1.1), translate=0.05, brightness=0.2, contrast=0.2
)


def test_augment_deterministic_for_seeded_generator() -> None:
    img = torch.rand(1, 48, 48, generator=torch.Generator().manual_seed(0))
    a = augment(img, _STRONG, torch.Generator().manual_seed(42))
    b = augment(img, _STRONG, torch.Generator().manual_seed(42))
    c = augment(img, _STRONG, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == img.shape and a.dtype == img.dtype
    assert a.min() >= 0 and a.max() <= 1


def test_augment_2d_input_keeps_shape() -> None:
    img = torch.rand(30, 40)
    out = augment(img, _STRONG, torch.Generator().manual_seed(0))
    assert out.shape == (30, 40)


def test_augment_identity_when_disabled() -> None:
    img = torch.rand(1, 16, 16)
    assert not AugmentConfig.none().enabled
    assert AugmentConfig.none() == AugmentConfig()
    assert not AugmentConfig(hflip=True, hflip_p=0.0).enabled
    assert augment(img, AugmentConfig.none(), torch.Generator().manual_seed(0)) is img
    assert _STRONG.enabled and AugmentConfig(hflip=True).enabled


def test_augment_never_flips_by_default() -> None:
    img = _left_bright()
    cfg = AugmentConfig(brightness=0.1, contrast=0.1)  # enabled, rotation 0, hflip False
    assert not cfg.hflip
    for seed in range(20):
        out = augment(img, cfg, torch.Generator().manual_seed(seed))
        assert out[:, :20].mean() > out[:, 20:].mean() + 0.5, f"flipped with seed {seed}"


def test_augment_flips_when_asked() -> None:
    img = _left_bright()
    out = augment(img, AugmentConfig(hflip=True, hflip_p=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, img.flip(-1))


def test_augment_rotation_keeps_size_and_fills_black() -> None:
    img = torch.ones(1, 64, 64)
    out = augment(img, AugmentConfig(rotation_deg=45), torch.Generator().manual_seed(1))
    assert out.shape == img.shape
    assert out[0, 0, 0] < 0.5 or out[0, 0, -1] < 0.5  # a rotated corner is filled with black


def test_augment_config_validation_and_dict_round_trip() -> None:
    assert AugmentConfig.from_dict(_STRONG.to_dict()) == _STRONG
    with pytest.raises(ValueError, match="unknown AugmentConfig keys"):
        AugmentConfig.from_dict({"vflip": True})
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="translate"):
        AugmentConfig(translate=1.5)


# --------------------------------------------------------------------------------------------
# Real images end to end
# --------------------------------------------------------------------------------------------


def test_real_images_through_the_pipeline() -> None:
    if not FIXTURES.is_dir():
        pytest.skip(f"real-image fixtures folder {FIXTURES} is absent (expected ../shared/data)")
    from cxrlabel.data.images import read_image

    prep = Preprocessing.from_timm_config(
        {"input_size": (3, 320, 320), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    )
    paths = [
        *sorted(FIXTURES.glob("nih_320/*.jpg"))[:1],
        FIXTURES / "nih_1024_rgba/00001369_000.png",
    ]
    for path in paths:
        x = preprocess(read_image(path), prep)
        assert x.shape == (3, 320, 320) and torch.isfinite(x).all()


# --------------------------------------------------------------------------------------------
# augmentation presets and zoom
# --------------------------------------------------------------------------------------------


def test_augmentation_presets_values() -> None:
    from cxrlabel.data.transforms import AUGMENT_PRESETS

    mild, strong = AUGMENT_PRESETS["cxr-mild"], AUGMENT_PRESETS["cxr-strong"]
    assert (mild.rotation_deg, mild.scale, mild.translate, mild.brightness, mild.contrast) == (
        10.0, (0.9, 1.1), 0.05, 0.1, 0.1,
    )  # fmt: skip
    assert (
        strong.rotation_deg, strong.scale, strong.translate, strong.brightness, strong.contrast
    ) == (15.0, (0.85, 1.15), 0.08, 0.2, 0.2)  # fmt: skip
    assert not mild.hflip and not strong.hflip
    assert not AUGMENT_PRESETS["none"].enabled


def test_augment_config_set_fields_override_the_preset() -> None:
    from cxrlabel.data.transforms import augment_config, zoom_range

    assert zoom_range(0.0) == (1.0, 1.0) and zoom_range(0.2) == (0.8, 1.2)
    cfg = augment_config(
        "cxr-mild", rotation_deg=5.0, scale=zoom_range(0.0), translate=0.0, hflip=False
    )
    # rotation set explicitly wins; the zero/identity values leave the preset's.
    assert (cfg.rotation_deg, cfg.scale, cfg.translate, cfg.brightness) == (
        5.0,
        (0.9, 1.1),
        0.05,
        0.1,
    )
    cfg = augment_config("none", scale=zoom_range(0.2), contrast=0.3)
    assert cfg.scale == (0.8, 1.2) and cfg.contrast == 0.3 and cfg.rotation_deg == 0.0
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        augment_config("cxr-wild")


def test_scale_zooms_the_image() -> None:
    img = torch.zeros(1, 64, 64)
    img[:, 24:40, 24:40] = 1.0  # a centred bright square
    seen = set()
    for seed in range(8):
        out = augment(img, AugmentConfig(scale=(0.5, 1.5)), torch.Generator().manual_seed(seed))
        assert not torch.equal(out, img)
        seen.add(round(float(out.sum()), 1))
    # Zooming changes the square's area (in and out), not only its position.
    assert max(seen) > float(img.sum()) * 1.2 and min(seen) < float(img.sum()) * 0.8


@pytest.mark.parametrize("preset", ["cxr-mild", "cxr-strong"])
def test_presets_never_flip(preset: str) -> None:
    from cxrlabel.data.transforms import AUGMENT_PRESETS

    img = _left_bright(64, 64)
    for seed in range(40):
        out = augment(img, AUGMENT_PRESETS[preset], torch.Generator().manual_seed(seed))
        assert out[:, :32].mean() > out[:, 32:].mean() + 0.3, f"flipped with seed {seed}"


# --------------------------------------------------------------------------------------------
# equalisation
# --------------------------------------------------------------------------------------------


def test_hist_equalisation_spreads_a_low_contrast_film() -> None:
    from cxrlabel.data.transforms import equalize

    rng = np.random.default_rng(0)
    film = (0.4 + 0.1 * rng.random((64, 64))).astype(np.float32)  # values in [0.4, 0.5]
    out = equalize(film, "hist")
    assert out.dtype == np.float32 and out.shape == film.shape
    assert out.min() < 0.05 and out.max() > 0.95
    # Order-preserving: a brighter pixel stays at least as bright.
    order = np.argsort(film, axis=None)
    assert np.all(np.diff(out.ravel()[order]) >= 0)
    clahe = equalize(film, "clahe")
    assert clahe.std() > film.std() and not np.array_equal(clahe, out)
    assert equalize(film, "none") is film
    with pytest.raises(ValueError, match="equalize"):
        equalize(film, "gamma")


def test_preprocessing_records_equalisation_and_reads_old_dicts() -> None:
    old = _prep().to_dict()
    assert "equalize" not in old  # unchanged metadata for models without equalisation
    assert Preprocessing.from_dict(old).equalize == "none"
    prep = _prep(equalize="clahe")
    assert prep.to_dict()["equalize"] == "clahe" and Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError, match="equalize"):
        _prep(equalize="gamma")
    film = np.linspace(0.4, 0.5, 40 * 40, dtype=np.float32).reshape(40, 40)
    assert not torch.equal(preprocess(film, _prep(equalize="hist")), preprocess(film, _prep()))


# The batched augmentation (augment_batch, used on the device) against augment itself (the
# CPU float path), on the CPU: they differ by float rounding only (measured: 6e-8).
AUGMENT_BATCH_TOLERANCE = 1e-6


@pytest.mark.parametrize(
    "cfg",
    [
        AUGMENT_PRESETS["cxr-strong"],
        AugmentConfig(rotation_deg=30, scale=(0.7, 1.3), translate=0.2, contrast=0.3, hflip=True),
        AugmentConfig(brightness=0.3),
    ],
)
def test_augment_batch_matches_augment_row_by_row(cfg: AugmentConfig) -> None:
    images = torch.rand(6, 1, 36, 44, generator=torch.Generator().manual_seed(2))
    seeds = [5 * 1_000_003 + row for row in (3, 0, 9, 1, 4, 7)]
    expected = torch.stack(
        [
            augment(img, cfg, torch.Generator().manual_seed(s))
            for img, s in zip(images, seeds, strict=True)
        ]
    )
    got = augment_batch(images, cfg, augment_draws(cfg, seeds))
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= AUGMENT_BATCH_TOLERANCE
    assert not torch.equal(got, images)  # it did transform them


def test_augment_batch_identity_and_bad_input() -> None:
    images = torch.rand(2, 1, 8, 8)
    none = AugmentConfig.none()
    assert augment_batch(images, none, augment_draws(none, [0, 1])) is images
    draws = augment_draws(_STRONG, [0, 1])
    assert draws.shape == (2, 7)
    with pytest.raises(ValueError, match="B, 1, H, W"):
        augment_batch(images[:, 0], _STRONG, draws)
    with pytest.raises(TypeError, match="float"):
        augment_batch(images.to(torch.uint8), _STRONG, draws)
    with pytest.raises(ValueError, match="draws"):
        augment_batch(images, _STRONG, draws[:1])
