"""JPEG films decoded and resized where the model runs (the GPU), as the CPU reader would.

``cxrlabel label`` on CUDA reads films in two places:

* In the reader's time-limited child process (:mod:`cxrlabel.labelling.reader`), as before:
  the file is read by ``read_film_bytes`` (a regular file under the size cap) and
  :func:`use_device_decode` routes it by its magic bytes (not its suffix). For a JPEG,
  :func:`probe_jpeg` says whether the device decoder may take it: a first frame header
  within ``max_pixels`` (a decompression bomb goes on to the CPU reader, which refuses it
  before decoding, with the same errors.csv row as ever, and never reaches the device),
  8-bit baseline or extended Huffman (SOF0/SOF1), grey or YCbCr
  (Pillow mode ``L``/``RGB``), no Adobe marker, no EXIF rotation, an EOI marker at the end
  (so a truncated file goes to the CPU reader, which reports it) and a frame header that
  Pillow reads alike. The compressed bytes go back to the labelling process.
* In the labelling process, on the device: :func:`decode_jpegs` (``torchvision.io.decode_jpeg``,
  batched; nvJPEG on CUDA) and :func:`prepare_films`: grey by Pillow's integer ITU-R 601 luma
  (for ``RGB``), ImageInfo.chroma and the input checks' measures (:class:`PixelStats`) on the
  same strided samples the CPU reader uses, then :func:`resize_batch` (antialiased
  ``F.interpolate``, Pillow's algorithm, pad and crop modes, bilinear and bicubic) and one
  download of the S x S float32 films per batch.

Everything else stays on the CPU reader: PNG, DICOM, a JPEG the probe turns away
(progressive, arithmetic or lossless coding, 12-bit, CMYK/Adobe, EXIF orientation other
than 1, no EOI, header disagreements), a JPEG the device decoder raises on (retried alone,
then read by the CPU reader, so a bad film is still an errors.csv row), runs with heatmaps and
runs whose models resize differently (no shared resize).

Tolerances, measured on CPU (``device="cpu"``; tests/data/test_jpegdevice.py) on the 497
nih-cxr14 films and the nih_320 fixtures: torchvision's libjpeg-turbo and Pillow's decode the
same grey levels (max difference 0); after the model's resize the films differ by at most
0.0034 of a grey level (1.4e-5 on the [0, 1] scale: float rounding between Pillow's and
PyTorch's resampling) in every mode; probabilities by at most 1e-5. nvJPEG on CUDA uses
its own IDCT and upsampling, so on a GPU the decoded levels may differ by a few levels more
(not measured here: no GPU was at hand).

Every function takes a ``device`` and runs on the CPU as well (the tests run it there).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image

from cxrlabel.data.images import (
    CHROMA_SAMPLE,
    MAX_PIXELS,
    ImageError,
    ImageInfo,
    check_jpeg_frame,
    sample_step,
    sniff_format,
)
from cxrlabel.data.sanity import SAMPLE_PIXELS, PixelStats
from cxrlabel.data.transforms import ResizeGeometry, scaled_shape

log = logging.getLogger(__name__)

# Huffman-coded sequential JPEG: what nvJPEG and libjpeg-turbo decode alike (progressive,
# arithmetic and lossless streams are left to the CPU reader).
_DEVICE_MARKERS = frozenset({0xC0, 0xC1})
_EOI = b"\xff\xd9"
_EOI_WINDOW = 4096  # as the CPU reader's end-marker check (images._has_end_marker)
_MODES = ("L", "RGB")
# Pillow's L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16 (libImaging/Convert.c), so an RGB
# film decoded on the device becomes the grey levels Pillow gives.
_LUMA = (19595, 38470, 7471)


def use_device_decode(device_type: str, head: bytes, *, forced: bool = False) -> bool:
    """Whether a film goes to the device JPEG path: the device is CUDA (or a test `forced`
    it) and the film is a JPEG by its first bytes, whatever its name says."""
    return (forced or device_type == "cuda") and sniff_format(head) == "jpeg"


@dataclass(frozen=True)
class JpegProbe:
    """What the child learnt of a JPEG the device may decode: its size and Pillow mode."""

    width: int
    height: int
    mode: str  # "L" or "RGB"


def probe_jpeg(data: bytes, *, name: str, max_pixels: int = MAX_PIXELS) -> JpegProbe | None:
    """The JPEG's size and mode when the device may decode it; None when the CPU reader should
    read it instead, which then reports whatever is wrong with it exactly as without the device
    path (a first frame over `max_pixels`, a decompression bomb, included: it is refused there
    before any pixel is decoded, and never reaches the device)."""
    try:
        frame = check_jpeg_frame(data, name=name, max_pixels=max_pixels)
    except ImageError:
        return None
    if frame.marker not in _DEVICE_MARKERS or frame.precision != 8:
        return None
    if frame.components not in (1, 3) or _EOI not in data[-_EOI_WINDOW:]:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the markers up to the scan only
            if im.format != "JPEG" or im.size != (frame.width, frame.height):
                return None
            if im.mode not in _MODES or "adobe" in im.info or "progressive" in im.info:
                return None
            if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                return None
            return JpegProbe(frame.width, frame.height, im.mode)
    except Exception:  # whatever the header parse refuses, the CPU reader reports, named
        return None


def decode_jpegs(
    datas: Sequence[bytes], modes: Sequence[str], device: torch.device | str
) -> list[torch.Tensor | None]:
    """Each JPEG decoded on `device` as uint8 ``(C, H, W)`` (C = 1 for mode L, 3 for RGB),
    one batched call per mode; None for a film the decoder refused (a failed batch is retried
    film by film, so one bad film costs only itself)."""
    from torchvision.io import ImageReadMode  # ~1 s to import: only this path needs it

    out: list[torch.Tensor | None] = [None] * len(datas)
    for mode in _MODES:
        index = [k for k, m in enumerate(modes) if m == mode]
        if not index:
            continue
        read_mode = ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB
        encoded = [torch.frombuffer(bytearray(datas[k]), dtype=torch.uint8) for k in index]
        try:
            decoded: list[torch.Tensor | None] = list(_decode(encoded, read_mode, device))
        except Exception as exc:  # nvJPEG and libjpeg raise RuntimeError, whoever's bug
            log.debug("batched JPEG decode failed (%s); decoding film by film", exc)
            decoded = [_decode_one(e, read_mode, device) for e in encoded]
        channels = 1 if mode == "L" else 3
        for k, image in zip(index, decoded, strict=True):
            # A decoder sizing the film otherwise than the header checked is not trusted.
            if image is not None and (image.ndim != 3 or image.shape[0] != channels):
                image = None
            out[k] = image
    return out


def _decode(encoded: list[torch.Tensor], mode: object, device: torch.device | str) -> list:
    from torchvision.io import decode_jpeg

    return list(decode_jpeg(encoded, mode=mode, device=device))  # type: ignore[arg-type]


def _decode_one(
    encoded: torch.Tensor, mode: object, device: torch.device | str
) -> torch.Tensor | None:
    try:
        return _decode([encoded], mode, device)[0]
    except Exception as exc:
        log.debug("JPEG decode failed on the device (%s)", exc)
        return None


@dataclass
class DeviceFilm:
    """One device-decoded film: the resized film on the CPU and what the checks need."""

    pixels: np.ndarray  # (S, S) float32 in [0, 1], as ResizeGeometry.apply gives
    info: ImageInfo
    stats: PixelStats


def prepare_films(images: Sequence[torch.Tensor], geometry: ResizeGeometry) -> list[DeviceFilm]:
    """Decoded uint8 ``(C, H, W)`` films -> resized films, ImageInfo and PixelStats, on the
    films' device; films of one shape are processed as one stack."""
    out: list[DeviceFilm | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    for (channels, height, width), index in groups.items():
        stack = torch.stack([images[k] for k in index])  # (B, C, H, W) uint8
        grey, chroma = _grey_and_chroma(stack)
        stats = _pixel_stats(grey)
        unit = grey.to(torch.float32) / 255.0  # as the CPU reader: float32 level / 255
        resized = resize_batch(unit, geometry).cpu().numpy()
        mode = "L" if channels == 1 else "RGB"
        for j, k in enumerate(index):
            info = ImageInfo("jpeg", width, height, mode, chroma[j])
            out[k] = DeviceFilm(resized[j], info, stats[j])
    return [film for film in out if film is not None]


def _grey_and_chroma(stack: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(B, H, W) uint8 grey levels and each film's ImageInfo.chroma from (B, C, H, W)."""
    if stack.shape[1] == 1:
        return stack[:, 0], [0.0] * stack.shape[0]
    height, width = stack.shape[-2:]
    step = sample_step(height, width, CHROMA_SAMPLE)
    sample = stack[:, :3, ::step, ::step]
    spread = (sample.amax(dim=1).to(torch.float64) - sample.amin(dim=1)).flatten(1)
    chroma = (spread.mean(dim=1) / 255.0).tolist()
    rgb = stack.to(torch.int32)
    luma = rgb[:, 0] * _LUMA[0] + rgb[:, 1] * _LUMA[1] + rgb[:, 2] * _LUMA[2] + 0x8000
    return (luma >> 16).to(torch.uint8), chroma


def _pixel_stats(grey: torch.Tensor) -> list[PixelStats]:
    """sanity.pixel_stats of each (H, W) film of a (B, H, W) uint8 stack, on its device, from
    one 256-level histogram per film: the levels present, and the standard deviation of
    level / 255 (in float64; NumPy's float32 std differs by about 1e-7)."""
    batch, height, width = grey.shape
    step = sample_step(height, width, SAMPLE_PIXELS)
    sample = grey[:, ::step, ::step].flatten(1)
    offsets = torch.arange(batch, device=grey.device)[:, None] * 256
    counts = torch.bincount((sample.long() + offsets).flatten(), minlength=batch * 256)
    hist = counts.view(batch, 256).to(torch.float64)
    values = torch.arange(256, device=grey.device, dtype=torch.float64) / 255.0
    n = hist.sum(dim=1)
    mean = (hist * values).sum(dim=1) / n
    var = (hist * (values[None] - mean[:, None]) ** 2).sum(dim=1) / n
    levels = (hist > 0).sum(dim=1)
    return [
        PixelStats(float(v) ** 0.5, int(k))
        for v, k in zip(var.tolist(), levels.tolist(), strict=True)
    ]


def resize_batch(batch: torch.Tensor, geometry: ResizeGeometry) -> torch.Tensor:
    """:meth:`ResizeGeometry.apply` of each ``(H, W)`` film of a float ``(B, H, W)`` stack in
    [0, 1], on its device: antialiased ``F.interpolate`` (Pillow's resampling, bicubic with
    a = -0.5 as Pillow's), clipped to [0, 1], then the same centred pad or crop."""
    import torch.nn.functional as F

    size = geometry.size
    height, width = batch.shape[-2:]
    new_h, new_w = scaled_shape((height, width), size, geometry.resize_mode)
    scaled = batch
    if (new_h, new_w) != (height, width):
        scaled = F.interpolate(
            batch[:, None],
            size=(new_h, new_w),
            mode=geometry.interpolation,
            align_corners=False,
            antialias=True,
        )[:, 0].clamp_(0.0, 1.0)
    if geometry.resize_mode == "pad":
        out = torch.zeros((batch.shape[0], size, size), dtype=batch.dtype, device=batch.device)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        out[:, top : top + new_h, left : left + new_w] = scaled
        return out
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return scaled[:, top : top + size, left : left + size].contiguous()
