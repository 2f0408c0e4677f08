"""Pictures: PNG and JPEG encoding, and the one contact-sheet renderer.

:func:`encode_png` turns a film or an overlay into PNG bytes (HTTP responses, files written
atomically by the caller); :func:`encode_jpeg` does the same for the synthetic films.
:func:`render_sheet` lays captioned tiles out on a grid; the synthetic dataset's sheet and the
Grad-CAM sheets differ only in their :class:`SheetStyle`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrlabel.data.transforms import to_uint8

__all__ = ["SheetStyle", "encode_jpeg", "encode_png", "render_sheet"]

Colour = int | str | tuple[int, ...]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def encode_png(picture: np.ndarray | Image.Image) -> bytes:
    """PNG bytes of a picture.

    Arrays may be a grey ``[0, 1]`` float image (rounded to 8 bits, see ``to_uint8``), a uint8
    grey ``(H, W)`` image or a uint8 RGB ``(H, W, 3)`` image; anything else is refused rather
    than guessed at. A PIL image is encoded as it is.
    """
    if isinstance(picture, Image.Image):
        image = picture
    else:
        image = Image.fromarray(_as_8bit(np.asarray(picture)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(picture: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a picture (the arrays :func:`encode_png` takes) at a Pillow quality 1-95."""
    buffer = io.BytesIO()
    Image.fromarray(_as_8bit(np.asarray(picture))).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _as_8bit(array: np.ndarray) -> np.ndarray:
    grey = array.ndim == 2
    rgb = array.ndim == 3 and array.shape[2] == 3
    if array.dtype == np.uint8 and (grey or rgb):
        return array
    if np.issubdtype(array.dtype, np.floating) and grey:
        return to_uint8(array)
    raise ValueError(
        f"cannot encode a {array.dtype} array of shape {array.shape}: expected a [0, 1] "
        "float (H, W) image, a uint8 (H, W) image or a uint8 (H, W, 3) RGB image"
    )


@dataclass(frozen=True)
class SheetStyle:
    """How a contact sheet looks.

    mode / background: PIL mode of the sheet ("L" or "RGB") and the colour behind tiles and
        captions.
    caption_height: height of the caption band under each tile.
    caption_at: (x, y) of the first caption line, relative to the band's top-left corner.
    line_height: distance between caption lines.
    head_fill / fill: colour of the first caption line and of the others.
    font: caption and title font; None is Pillow's default.
    outline: colour of a frame drawn round each cell (tile and caption), None for none.
    title_height: height of the title band above the grid when there is a title.
    """

    mode: str = "RGB"
    background: Colour = "black"
    caption_height: int = 16
    caption_at: tuple[int, int] = (3, 2)
    line_height: int = 0
    head_fill: Colour = "white"
    fill: Colour = "white"
    font: Font | None = None
    outline: Colour | None = None
    title_height: int = 18


def render_sheet(
    tiles: Sequence[Image.Image],
    captions: Sequence[Sequence[str]],
    *,
    tile: int,
    columns: int,
    style: SheetStyle,
    title: str = "",
) -> Image.Image:
    """A grid of ``tile`` x ``tile`` cells, each with its caption lines in a band below it.

    The sheet is ``columns * tile`` wide and ``ceil(len(tiles) / columns)`` cells high (plus the
    title band when ``title`` is given). A tile smaller than the cell is centred in it. Each cell
    is drawn on its own and then pasted, so a caption wider than its tile is cut at the cell's
    edge instead of running into the neighbour's.
    """
    if len(tiles) != len(captions):
        raise ValueError(f"{len(tiles)} tiles but {len(captions)} captions")
    if tile < 1 or columns < 1:
        raise ValueError(f"tile and columns must be >= 1, got tile={tile}, columns={columns}")
    cell_h = tile + style.caption_height
    header = style.title_height if title else 0
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new(style.mode, (columns * tile, header + rows * cell_h), style.background)
    if title:
        ImageDraw.Draw(sheet).text((4, 3), title, fill=style.head_fill, font=style.font)
    for i, (picture, lines) in enumerate(zip(tiles, captions, strict=True)):
        cell = _cell(picture, lines, tile, style)
        sheet.paste(cell, ((i % columns) * tile, header + (i // columns) * cell_h))
    return sheet


def _cell(picture: Image.Image, lines: Sequence[str], tile: int, style: SheetStyle) -> Image.Image:
    cell = Image.new(style.mode, (tile, tile + style.caption_height), style.background)
    cell.paste(picture, ((tile - picture.width) // 2, (tile - picture.height) // 2))
    draw = ImageDraw.Draw(cell)
    x, y = style.caption_at
    for j, text in enumerate(lines):
        fill = style.head_fill if j == 0 else style.fill
        draw.text((x, tile + y + j * style.line_height), text, fill=fill, font=style.font)
    if style.outline is not None:
        draw.rectangle([0, 0, tile - 1, tile + style.caption_height - 1], outline=style.outline)
    return cell
