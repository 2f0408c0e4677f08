"""The one PNG encoder and the one contact-sheet renderer (cxrlabel.data.pictures)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFont

from cxrlabel.data.pictures import SheetStyle, encode_jpeg, encode_png, render_sheet
from cxrlabel.data.transforms import to_uint8


def _decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image


def test_float_grey_is_rounded_to_8_bits() -> None:
    grey = np.linspace(0.0, 1.0, 12 * 7, dtype=np.float32).reshape(12, 7)
    image = _decode(encode_png(grey))
    assert image.mode == "L" and image.size == (7, 12)
    np.testing.assert_array_equal(np.asarray(image), to_uint8(grey))


def test_uint8_grey_and_rgb_are_kept_exactly() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (9, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    decoded_grey, decoded_rgb = _decode(encode_png(grey)), _decode(encode_png(rgb))
    assert decoded_grey.mode == "L" and decoded_rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded_grey), grey)
    np.testing.assert_array_equal(np.asarray(decoded_rgb), rgb)


def test_pil_image_is_encoded_as_it_is() -> None:
    image = Image.new("RGB", (3, 2), (10, 20, 30))
    assert np.asarray(_decode(encode_png(image)))[1, 2].tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), np.float32),  # float RGB: no [0, 1] convention for colour
        np.zeros((4, 4, 4), np.uint8),  # RGBA
        np.zeros(5, np.uint8),  # 1-D
        np.zeros((4, 4), np.int64),
    ],
)
def test_other_arrays_are_refused_with_their_shape(array: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"cannot encode .* shape"):
        encode_png(array)


def test_jpeg_of_a_grey_film_is_grey_and_close() -> None:
    yy, xx = np.mgrid[0:32, 0:48]
    film = ((xx * 4 + yy * 2) % 256).astype(np.uint8)
    image = Image.open(io.BytesIO(encode_jpeg(film, quality=95)))
    assert image.format == "JPEG" and image.mode == "L" and image.size == (48, 32)
    assert np.abs(np.asarray(image).astype(int) - film).mean() < 3
    small = encode_jpeg(film, quality=10)
    assert len(small) < len(encode_jpeg(film, quality=95))
    with pytest.raises(ValueError, match="cannot encode"):
        encode_jpeg(np.zeros((4, 4, 4), np.uint8), quality=90)


def _tiles(n: int, size: int, mode: str = "L") -> list[Image.Image]:
    return [Image.new(mode, (size, size), 40 * (i + 1)) for i in range(n)]


def test_sheet_grid_size_and_tile_placement() -> None:
    style = SheetStyle(mode="L", background=255, caption_height=10, outline=None)
    sheet = render_sheet(_tiles(5, 8), [[]] * 5, tile=8, columns=2, style=style)
    assert sheet.mode == "L" and sheet.size == (2 * 8, 3 * (8 + 10))
    pixels = np.asarray(sheet)
    for i in range(5):
        x0, y0 = (i % 2) * 8, (i // 2) * 18
        assert (pixels[y0 : y0 + 8, x0 : x0 + 8] == 40 * (i + 1)).all()
        assert (pixels[y0 + 8 : y0 + 18, x0 : x0 + 8] == 255).all()  # empty caption band
    assert (pixels[36:, 8:] == 255).all()  # the missing sixth cell is background


def test_title_band_and_small_tiles_centred() -> None:
    small = Image.new("RGB", (4, 2), "red")
    sheet = render_sheet([small], [["x"]], tile=8, columns=1, style=SheetStyle(), title="t")
    assert sheet.size == (8, 18 + 8 + 16)
    pixels = np.asarray(sheet)
    cell = pixels[18:26]
    assert cell[3:5, 2:6].tolist() == [[[255, 0, 0]] * 4] * 2  # centred in the 8 x 8 tile
    assert (cell[:3] == 0).all() and (cell[:, :2] == 0).all()  # black around it


def test_captions_are_drawn_and_cut_at_their_cell() -> None:
    font = ImageFont.load_default(size=12)
    style = SheetStyle(
        mode="L", background=255, caption_height=20, caption_at=(2, 2), fill=0, head_fill=0,
        font=font, outline=None,
    )  # fmt: skip
    long_text = "W" * 40  # far wider than one 32 px cell
    sheet = render_sheet(_tiles(2, 32), [[long_text], []], tile=32, columns=2, style=style)
    band = np.asarray(sheet)[32:52]
    assert (band[:, :32] < 128).any()  # the first caption is there
    assert (band[:, 32:] == 255).all()  # and does not run into the neighbour's band


def test_outline_frames_every_cell() -> None:
    style = SheetStyle(mode="L", background=255, caption_height=4, outline=170)
    pixels = np.asarray(render_sheet(_tiles(2, 6), [[], []], tile=6, columns=2, style=style))
    for x0 in (0, 6):
        assert (pixels[0, x0 : x0 + 6] == 170).all() and (pixels[:, x0] == 170).all()
        assert (pixels[9, x0 : x0 + 6] == 170).all() and (pixels[:, x0 + 5] == 170).all()


def test_bad_sheet_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="2 tiles but 1 captions"):
        render_sheet(_tiles(2, 4), [[]], tile=4, columns=1, style=SheetStyle())
    with pytest.raises(ValueError, match="columns"):
        render_sheet(_tiles(1, 4), [[]], tile=4, columns=0, style=SheetStyle())
