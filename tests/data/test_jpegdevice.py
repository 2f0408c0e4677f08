"""The device JPEG path run on the CPU against the CPU reader: routing, header checks, pixels,
input-check measures and resize parity (the tolerances the module doc states)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlabel.data import jpegdevice
from cxrlabel.data.images import ImageTooLargeError, check_jpeg_frame, read_image_with_info
from cxrlabel.data.jpegdevice import (
    JpegProbe,
    decode_jpegs,
    prepare_films,
    probe_jpeg,
    resize_batch,
    use_device_decode,
)
from cxrlabel.data.sanity import flags_from_stats, sanity_flags
from cxrlabel.data.transforms import ResizeGeometry
from tests.helpers import SHARED_DATA

NIH = SHARED_DATA / "nih-cxr14" / "images"
FIXTURES = SHARED_DATA / "fixtures" / "nih_320"
# Max abs difference of a resized film, device path (on the CPU) vs the CPU reader, on the
# [0, 1] scale: measured 1.3e-5 (0.0034 of a grey level), float rounding between Pillow's
# and PyTorch's resampling; the decoded grey levels themselves are identical.
RESIZE_TOLERANCE = 2e-5
GEOMETRIES = (
    ResizeGeometry(224, "pad", "bilinear"),
    ResizeGeometry(320, "crop", "bicubic"),
    ResizeGeometry(512, "pad", "bicubic"),
    ResizeGeometry(97, "crop", "bilinear"),
)


def _films(folder: Path, limit: int | None = None) -> list[Path]:
    if not folder.is_dir():
        pytest.skip(f"shared data not found: {folder}")
    return sorted(folder.glob("*.jpg"))[:limit]


def _jpeg(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def _cpu_reference(data: bytes, geometry: ResizeGeometry):
    image, info = read_image_with_info(data)
    return geometry.apply(image), info, sanity_flags(image, info)


def _device_films(datas: list[bytes], geometry: ResizeGeometry):
    probes = [probe_jpeg(d, name="film.jpg") for d in datas]
    assert all(p is not None for p in probes)
    decoded = decode_jpegs(datas, [p.mode for p in probes if p], "cpu")
    assert all(t is not None for t in decoded)
    return prepare_films([t for t in decoded if t is not None], geometry)


@pytest.mark.parametrize(
    ("device_type", "head", "forced", "expected"),
    [
        ("cuda", b"\xff\xd8\xff\xe0", False, True),
        ("cpu", b"\xff\xd8\xff\xe0", False, False),
        ("mps", b"\xff\xd8\xff\xe0", False, False),
        ("cpu", b"\xff\xd8\xff\xe0", True, True),
        ("cuda", b"\x89PNG\r\n\x1a\n", False, False),  # a PNG named .jpg is not routed
        ("cuda", b"\x00" * 128 + b"DICM", True, False),
    ],
)
def test_routing_by_device_type_and_magic_bytes(
    device_type: str, head: bytes, forced: bool, expected: bool
) -> None:
    assert use_device_decode(device_type, head, forced=forced) is expected


def test_a_bomb_is_left_to_the_cpu_reader_which_refuses_it_before_decoding() -> None:
    # SOI, then a baseline frame header claiming 60000 x 60000 (no pixels follow).
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60000, 60000, 1) + b"\x01\x11\x00"
    bomb = b"\xff\xd8" + sof + b"\xff\xd9"
    assert probe_jpeg(bomb, name="bomb.jpg") is None
    with pytest.raises(ImageTooLargeError, match="JPEG frame is 60000x60000"):
        check_jpeg_frame(bomb, name="bomb.jpg")
    assert probe_jpeg(_jpeg(Image.new("L", (64, 32))), name="s.jpg", max_pixels=2047) is None


def test_probe_sends_what_the_device_cannot_match_to_the_cpu_reader() -> None:
    grey = Image.open(_films(FIXTURES, 1)[0])
    rotated = Image.Exif()
    rotated[0x0112] = 6
    assert probe_jpeg(_jpeg(grey), name="g.jpg") == JpegProbe(320, 320, "L")
    assert probe_jpeg(_jpeg(grey.convert("RGB")), name="c.jpg") == JpegProbe(320, 320, "RGB")
    assert probe_jpeg(_jpeg(grey, progressive=True), name="p.jpg") is None
    assert probe_jpeg(_jpeg(grey.convert("CMYK")), name="k.jpg") is None
    assert probe_jpeg(_jpeg(grey, exif=rotated), name="r.jpg") is None
    data = _jpeg(grey)
    assert probe_jpeg(data[: len(data) // 2], name="t.jpg") is None  # no EOI: truncated


def test_nih_films_match_the_cpu_reader_in_every_resize_mode() -> None:
    paths = _films(NIH)
    datas = [p.read_bytes() for p in paths]
    # Grey levels before any resize: torchvision's libjpeg-turbo and Pillow's agree exactly.
    decoded = decode_jpegs(datas[:50], ["L"] * 50, "cpu")
    for data, image in zip(datas[:50], decoded, strict=True):
        assert image is not None
        levels = read_image_with_info(data)[0] * 255
        assert np.abs(image[0].numpy() - levels).max() < 1e-3
    for geometry in GEOMETRIES:
        chosen = datas if geometry.size == 224 else datas[::10]
        films = _device_films(chosen, geometry)
        worst = 0.0
        for data, film in zip(chosen, films, strict=True):
            pixels, info, flags = _cpu_reference(data, geometry)
            assert film.pixels.shape == pixels.shape == (geometry.size, geometry.size)
            worst = max(worst, float(np.abs(film.pixels - pixels).max()))
            assert film.info == info
            assert flags_from_stats(info.height, info.width, film.info, film.stats) == flags
        assert worst <= RESIZE_TOLERANCE, (geometry, worst)


def test_colour_non_square_and_flagged_films_match_the_cpu_reader() -> None:
    grey = Image.open(_films(FIXTURES, 1)[0])
    rgb = grey.convert("RGB")
    tinted = Image.merge("RGB", (rgb.getchannel(0), rgb.getchannel(1).point(lambda v: v // 2),
                                 rgb.getchannel(2)))  # fmt: skip
    datas = [
        _jpeg(rgb),  # grey content stored as colour: chroma about 0
        _jpeg(tinted),  # real colour: the colour flag
        _jpeg(grey.crop((0, 0, 300, 120))),  # wide and small: aspect and small flags
        _jpeg(grey.crop((40, 0, 250, 320))),  # tall: the crop mode's centring
        _jpeg(Image.new("L", (256, 256), 128)),  # constant
    ]
    for geometry in GEOMETRIES:
        films = _device_films(datas, geometry)
        for data, film in zip(datas, films, strict=True):
            pixels, info, flags = _cpu_reference(data, geometry)
            assert np.abs(film.pixels - pixels).max() <= RESIZE_TOLERANCE
            assert film.info.chroma == pytest.approx(info.chroma, abs=1e-9)
            assert (film.info.width, film.info.height, film.info.mode) == (
                info.width,
                info.height,
                info.mode,
            )
            assert flags_from_stats(info.height, info.width, film.info, film.stats) == flags
    found = [
        flags_from_stats(f.info.height, f.info.width, f.info, f.stats)
        for f in _device_films(datas, GEOMETRIES[0])
    ]
    assert found == [(), ("colour",), ("small", "aspect"), (), ("constant",)]


def test_a_batch_the_decoder_refuses_is_retried_film_by_film(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = _films(FIXTURES, 2)
    datas = [good[0].read_bytes(), b"\xff\xd8refused", good[1].read_bytes()]
    real = jpegdevice._decode

    def refusing(encoded: list[torch.Tensor], mode: object, device: str) -> list[torch.Tensor]:
        if any(bytes(e[:10].tolist()) == b"\xff\xd8refused" for e in encoded):
            raise RuntimeError("nvjpeg refused it")
        return real(encoded, mode, device)

    monkeypatch.setattr(jpegdevice, "_decode", refusing)
    decoded = decode_jpegs(datas, ["L", "L", "L"], "cpu")
    assert decoded[1] is None
    assert [tuple(t.shape) for t in (decoded[0], decoded[2]) if t is not None] == [
        (1, 320, 320)
    ] * 2


def test_resize_batch_keeps_the_identity_and_the_device() -> None:
    batch = torch.rand(3, 64, 64)
    same = resize_batch(batch, ResizeGeometry(64, "pad", "bicubic"))
    assert torch.equal(same, batch) and same.device == batch.device
    wide = resize_batch(torch.ones(2, 32, 64), ResizeGeometry(16, "pad", "bilinear"))
    # pad: 8 rows of film centred between black bands, as transforms.resize places it
    assert wide.shape == (2, 16, 16)
    assert torch.all(wide[:, 4:12] == 1.0) and torch.all(wide[:, :4] == 0.0)
