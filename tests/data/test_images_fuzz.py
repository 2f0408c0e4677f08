"""Property tests (Hypothesis) for cxrlabel.data.images: whatever the bytes, the reader either
returns a finite float32 (H, W) array in [0, 1] or raises a named ImageError subclass naming
the source; never another exception, never past a time bound, never a large allocation.

Inputs: arbitrary bytes, and mutations (bit flips, overwritten runs, truncations, insertions,
splices) of small generated PNG/JPEG/DICOM files of every encoding the reader handles plus the
real fixtures in ../shared/data/fixtures when present. `derandomize=True` and no example
database make every run test the same inputs, so CI is deterministic.
"""

from __future__ import annotations

import io
import resource
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxrlabel.data.images import ImageError, read_dicom_metadata, read_image

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fixtures"
MAX_PIXELS = 300_000
"""Low, so that no input can make the reader allocate much (the 512x512 fixtures still fit)."""
MAX_RSS_GROWTH = 1 << 30
"""Peak resident memory may not grow by more than this over a whole property test."""
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),  # generous: the machine running tests may be loaded
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NAMES = ("film.png", "film.jpg", "film.dcm", "upload")
"""What the source is called: a .dcm suffix sends anything to the DICOM reader."""


# --------------------------------------------------------------------------------------------
# Seeds: small valid files of every kind the reader decodes
# --------------------------------------------------------------------------------------------


def _pillow_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _gradient(height: int = 32, width: int = 48) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)


def _dicom_bytes(edit: Callable[[Dataset], None] | None = None, **elements: Any) -> bytes:
    """A small MONOCHROME2 DICOM (8-bit gradient), changed by `edit`, as bytes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.set_pixel_data(_gradient(), "MONOCHROME2", 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if edit is not None:
        edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _encapsulated(syntax: str, frame: bytes) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"

    return edit


def _rle(ds: Dataset) -> None:
    ds.compress(RLELossless, encoding_plugin="pydicom")


def _deflated(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian


def _generated_seeds() -> list[bytes]:
    import openjpeg

    grey = Image.fromarray(_gradient())
    twelve_bit = (np.arange(32 * 48).reshape(32, 48) * 5).astype(np.uint16)
    return [
        _pillow_bytes(grey, "PNG"),
        _pillow_bytes(grey.convert("RGBA"), "PNG"),
        _pillow_bytes(grey.convert("P"), "PNG"),
        _pillow_bytes(Image.fromarray(twelve_bit), "PNG"),  # 16-bit
        _pillow_bytes(grey, "JPEG"),
        _pillow_bytes(grey.convert("RGB"), "JPEG"),
        _dicom_bytes(),
        _dicom_bytes(PhotometricInterpretation="MONOCHROME1", WindowCenter=128, WindowWidth=64),
        _dicom_bytes(_encapsulated(JPEGBaseline8Bit, _pillow_bytes(grey, "JPEG"))),
        _dicom_bytes(_encapsulated(JPEG2000Lossless, bytes(openjpeg.encode(_gradient())))),
        _dicom_bytes(_rle),
        _dicom_bytes(_deflated),
    ]


def _fixture_seeds() -> list[bytes]:
    if not FIXTURES.is_dir():
        return []
    paths = sorted(p for p in FIXTURES.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".dcm"})
    return [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    found = _generated_seeds() + _fixture_seeds()
    for seed in found[:12]:  # the generated ones must themselves decode
        _assert_decoded(read_image(seed, name="seed", max_pixels=MAX_PIXELS))
    return found


# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------


@st.composite
def _mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "overwrite", "truncate", "insert", "splice")))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            run = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(run)] = run
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:  # the head of this file with the tail of another
            other = draw(st.sampled_from(seeds))
            data[at:] = other[draw(st.integers(0, len(other) - 1)) :]
    return bytes(data)


# --------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------


def _assert_decoded(img: Any) -> None:
    assert isinstance(img, np.ndarray) and img.dtype == np.float32 and img.ndim == 2
    assert img.size > 0 and img.size <= MAX_PIXELS
    assert bool(np.isfinite(img).all())
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def _read_or_named_error(data: bytes, name: str) -> None:
    """The property: a valid array, or an ImageError subclass naming `name`."""
    try:
        img = read_image(data, name=name, max_pixels=MAX_PIXELS)
    except ImageError as exc:
        assert type(exc) is not ImageError, f"base ImageError, not a named subclass: {exc}"
        assert name in str(exc)
    else:
        _assert_decoded(img)
    try:
        fields = read_dicom_metadata(data, name=name)
    except ImageError as exc:
        assert type(exc) is not ImageError, f"base ImageError, not a named subclass: {exc}"
    else:
        assert isinstance(fields, dict) and isinstance(fields["number_of_frames"], int)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.mark.filterwarnings("ignore")  # pydicom and Pillow warn about much of this input
def test_arbitrary_bytes_decode_or_raise_a_named_error() -> None:
    before = _peak_rss_bytes()

    @settings(FUZZ, max_examples=500)
    @given(
        data=st.one_of(
            st.binary(max_size=2048),
            # Valid magic, random rest: reaches past the format sniffer into each decoder.
            st.sampled_from((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", bytes(128) + b"DICM")).flatmap(
                lambda magic: st.binary(max_size=2048).map(lambda rest: magic + rest)
            ),
        ),
        name=st.sampled_from(NAMES),
    )
    def check(data: bytes, name: str) -> None:
        _read_or_named_error(data, name)

    check()
    assert _peak_rss_bytes() - before < MAX_RSS_GROWTH


@pytest.mark.filterwarnings("ignore")
def test_mutated_real_and_generated_files_decode_or_raise_a_named_error(
    seeds: list[bytes],
) -> None:
    before = _peak_rss_bytes()

    @settings(FUZZ, max_examples=1500)
    @given(data=_mutated(seeds), name=st.sampled_from(NAMES))
    def check(data: bytes, name: str) -> None:
        _read_or_named_error(data, name)

    check()
    assert _peak_rss_bytes() - before < MAX_RSS_GROWTH


def test_seed_dicoms_cover_each_encoding(seeds: list[bytes]) -> None:
    """The generated DICOM seeds really are native, JPEG, JPEG 2000, RLE and deflated."""
    syntaxes = set()
    for seed in seeds[6:12]:
        meta = pydicom.dcmread(io.BytesIO(seed), stop_before_pixels=True).file_meta
        syntaxes.add(str(meta.TransferSyntaxUID))
    assert syntaxes == {
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEG2000Lossless,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
    }
