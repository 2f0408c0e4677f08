"""Input sanity flags: each check flags what it should, and normal chest films get none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlabel.data.images import ImageInfo, read_image, read_image_with_info
from cxrlabel.data.sanity import (
    DEFAULT_LIMITS,
    SanityLimits,
    describe_flags,
    join_flags,
    sanity_flags,
)
from cxrlabel.synth import generate_image
from tests.helpers import SHARED_DATA, write_dicom

FIXTURES = SHARED_DATA / "fixtures"


def synth_film(size: int = 320, seed: int = 3) -> np.ndarray:
    """A normal synthetic chest film (uint8) from the project's generator."""
    return generate_image({}, np.random.default_rng(seed), size=size)


def flags_of(path: Path, limits: SanityLimits = DEFAULT_LIMITS) -> tuple[str, ...]:
    image, info = read_image_with_info(path)
    return sanity_flags(image, info, limits)


def save_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def test_a_normal_synthetic_chest_film_has_no_flags(tmp_path: Path) -> None:
    film = synth_film()
    assert flags_of(save_png(tmp_path / "film.png", film)) == ()
    dicom = write_dicom(tmp_path / "film.dcm", film, Modality="DX", BodyPartExamined="CHEST")
    assert flags_of(dicom) == ()
    # Grey stored as RGB (and JPEG-compressed) is not colour.
    Image.fromarray(film).convert("RGB").save(tmp_path / "rgb.jpg", quality=85)
    image, info = read_image_with_info(tmp_path / "rgb.jpg")
    assert info.mode == "RGB" and info.chroma < 0.005
    assert sanity_flags(image, info) == ()


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared real films not found at {FIXTURES}")
def test_real_chest_films_have_no_flags_and_the_tibia_dicom_is_flagged() -> None:
    chests = [
        *sorted((FIXTURES / "nih_320").glob("*.jpg")),
        *sorted((FIXTURES / "nih_512").glob("*.png")),
        *sorted((FIXTURES / "nih_1024_rgba").glob("*.png")),
        *sorted((FIXTURES / "dicom").glob("siim_*.dcm")),
    ]
    assert len(chests) >= 4
    assert {str(p): flags_of(p) for p in chests} == {str(p): () for p in chests}
    assert flags_of(FIXTURES / "non_chest" / "pydicom_RG3_J2KI_tibia.dcm") == (
        "body_part:EXTREMITY",
    )


def test_a_one_pixel_image_is_small_and_constant(tmp_path: Path) -> None:
    one = save_png(tmp_path / "one.png", np.full((1, 1), 200, np.uint8))
    assert flags_of(one) == ("small", "constant")


def test_small_is_the_smallest_side_under_the_minimum(tmp_path: Path) -> None:
    film = synth_film(512)
    assert flags_of(save_png(tmp_path / "ok.png", film[:128, :160])) == ()
    assert flags_of(save_png(tmp_path / "small.png", synth_film(96))) == ("small",)
    assert flags_of(save_png(tmp_path / "x.png", film[:300, :300]), SanityLimits(min_side=301)) == (
        "small",
    )


def test_aspect_flags_long_thin_films(tmp_path: Path) -> None:
    film = synth_film(512)
    assert flags_of(save_png(tmp_path / "wide.png", np.hstack([film, film, film[:, :100]]))) == (
        "aspect",
    )
    assert flags_of(save_png(tmp_path / "tall.png", np.vstack([film, film[:30]]))) == ()
    tall = np.ascontiguousarray(np.vstack([film, film, film]).T)
    assert flags_of(save_png(tmp_path / "tall3.png", tall)) == ("aspect",)


def test_colour_is_real_colour_content_not_grey_stored_as_rgb(tmp_path: Path) -> None:
    film = synth_film()
    tinted = np.stack([film, (film * 0.8).astype(np.uint8), (film * 0.5).astype(np.uint8)], -1)
    image, info = read_image_with_info(save_png(tmp_path / "photo.png", tinted))
    assert info.mode == "RGB" and info.chroma > DEFAULT_LIMITS.max_chroma
    assert sanity_flags(image, info) == ("colour",)
    # The array itself is grey: only the info says colour was there.
    assert image.ndim == 2
    # A small coloured marker on a grey film is not "colour".
    marked = np.repeat(film[..., None], 3, axis=-1)
    marked[:20, :20] = (255, 0, 0)
    assert flags_of(save_png(tmp_path / "marked.png", marked)) == ()
    # Palette images are measured through their palette.
    palette = Image.fromarray(tinted).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "palette.png")
    assert flags_of(tmp_path / "palette.png") == ("colour",)


def test_colour_dicom_is_measured_too(tmp_path: Path) -> None:
    film = synth_film()
    rgb = np.stack([film, film // 2, film // 3], -1)
    write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", Modality="CR")
    image, info = read_image_with_info(tmp_path / "rgb.dcm")
    assert info.mode == "RGB" and info.chroma > 0.1
    assert sanity_flags(image, info) == ("colour",)


def test_constant_is_low_spread_or_few_levels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    flat = (128 + rng.integers(-1, 2, (400, 400))).astype(np.uint8)  # 3 levels, std ~0.003
    assert flags_of(save_png(tmp_path / "flat.png", flat)) == ("constant",)
    binary = np.where(synth_film(400) > 128, 255, 0).astype(np.uint8)  # high std, 2 levels
    assert flags_of(save_png(tmp_path / "binary.png", binary)) == ("constant",)
    # A dark 12-bit film in a 16-bit PNG keeps its levels: not constant.
    dark = (synth_film(400).astype(np.uint16) * 16).astype(np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert flags_of(tmp_path / "dark16.png") == ()


# Lower case and accents are invalid in a CS value, but real files hold them.
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        ({"Modality": "CR", "BodyPartExamined": "CHEST"}, ()),
        ({"Modality": "DX", "BodyPartExamined": "thorax"}, ()),
        ({"Modality": "RG", "BodyPartExamined": "Tórax PA"}, ()),
        ({"Modality": "CR"}, ()),  # no body part: nothing to judge
        ({}, ()),  # no Modality either
        ({"Modality": "MR", "BodyPartExamined": "CHEST"}, ("modality:MR",)),
        ({"Modality": "OT"}, ("modality:OT",)),
        ({"Modality": "CR", "BodyPartExamined": "KNEE"}, ("body_part:KNEE",)),
        ({"Modality": "DX", "BodyPartExamined": "left knee;x"}, ("body_part:LEFT_KNEE_X",)),
        ({"Modality": "MG", "BodyPartExamined": "BREAST"}, ("modality:MG", "body_part:BREAST")),
    ],
)
def test_dicom_modality_and_body_part(
    tmp_path: Path, elements: dict[str, str], expected: tuple[str, ...]
) -> None:
    path = write_dicom(tmp_path / "film.dcm", synth_film(), **elements)
    assert flags_of(path) == expected


def test_flags_join_and_describe() -> None:
    flags = ("small", "constant", "modality:MR")
    assert join_flags(flags) == "small;constant;modality:MR"
    assert join_flags(()) == ""
    text = describe_flags(flags)
    assert "small (smallest side under 128 px)" in text and "modality:MR (DICOM Modality" in text


def test_sanity_flags_is_pure_and_info_is_the_readers() -> None:
    image = np.zeros((300, 300), np.float32)
    info = ImageInfo("png", 300, 300, "L")
    assert sanity_flags(image, info) == ("constant",)
    assert sanity_flags(image, ImageInfo("png", 300, 300, "RGB", chroma=0.5)) == (
        "colour",
        "constant",
    )
    assert image.max() == 0  # not changed


def test_read_image_with_info_gives_read_images_array(tmp_path: Path) -> None:
    path = save_png(tmp_path / "film.png", synth_film())
    image, info = read_image_with_info(path)
    np.testing.assert_array_equal(image, read_image(path))
    assert info == ImageInfo("png", 320, 320, "L", 0.0)
    image, info = read_image_with_info(path.read_bytes(), name="x.bin")
    assert info.format == "png"
