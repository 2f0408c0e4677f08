"""Tests for cxrlabel.data.images: every fixture kind reads to one convention; bad inputs fail
clearly; a file's bytes read exactly as the file.

Real-image tests use ../shared/data/fixtures beside the project and skip when it is absent;
synthetic tests (files written to tmp_path) always run. Every file a test reads goes through
`read_both`/`metadata_both`, which also read its bytes and require the same result or the same
error, so each test below checks the bytes route as well.
"""

from __future__ import annotations

import errno
import io
import pickle
import re
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydicom
import pydicom.pixels
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cxrlabel.data.images import (
    MAX_PIXELS,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    MissingImageError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
    UnreadableImageError,
    UnsupportedDicomError,
    read_dicom_metadata,
    read_image,
    sniff_format,
)
from tests.helpers import write_dicom

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FIXTURES = SHARED_DATA / "fixtures"
SIIM_GLOB = "dicom/siim_*.dcm"
MONO1_TWIN = "dicom/txv_fake_MONOCHROME1_same_pixels.dcm"
J2K_CHEST = "dicom/pydicom_RG1_J2KI_chest_PA.dcm"
RGBA_PNG = "nih_1024_rgba/00001369_000.png"


@pytest.fixture(scope="module")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real-image fixtures folder {FIXTURES} is absent (expected ../shared/data)")
    return FIXTURES


def _one(fixtures: Path, pattern: str) -> Path:
    matches = sorted(fixtures.glob(pattern))
    if not matches:
        pytest.skip(f"no fixture matching {pattern!r} in {fixtures}")
    return matches[0]


def _same_error_from_bytes(path: Path, error: ImageError, read: Any, **kwargs: Any) -> None:
    """The bytes of `path`, named as it, fail with the error the file gave."""
    if not path.is_file():
        return  # a missing path or a directory has no bytes to read
    with pytest.raises(ImageError) as info:
        read(path.read_bytes(), name=str(path), **kwargs)
    assert type(info.value) is type(error)
    assert info.value.path == error.path
    # Decoder messages may quote an object's repr, whose address differs between two reads.
    assert _without_addresses(info.value.reason) == _without_addresses(error.reason)


def _without_addresses(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def read_both(path: Path, **kwargs: Any) -> np.ndarray:
    """read_image on the file and on its bytes: the very same array, or the same error."""
    try:
        from_file = read_image(path, **kwargs)
    except ImageError as error:
        _same_error_from_bytes(path, error, read_image, **kwargs)
        raise
    from_bytes = read_image(path.read_bytes(), name=str(path), **kwargs)
    assert from_bytes.dtype == from_file.dtype and from_bytes.flags.c_contiguous
    np.testing.assert_array_equal(from_bytes, from_file)
    return from_file


def metadata_both(path: Path) -> dict[str, Any]:
    """read_dicom_metadata on the file and on its bytes: the same fields, or the same error."""
    try:
        from_file = read_dicom_metadata(path)
    except ImageError as error:
        _same_error_from_bytes(path, error, read_dicom_metadata)
        raise
    assert read_dicom_metadata(path.read_bytes(), name=str(path)) == from_file
    return from_file


def _assert_unit_image(img: np.ndarray) -> None:
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.float32
    assert img.ndim == 2
    assert img.flags.c_contiguous
    assert float(img.min()) >= 0.0
    assert float(img.max()) <= 1.0
    assert float(img.std()) > 0.02, "image is (nearly) constant"


def _mediastinum_brighter_than_lungs(img: np.ndarray) -> bool:
    """On a correctly displayed PA film the spine/mediastinum is whiter than the lung fields."""
    h, w = img.shape
    rows = slice(int(0.3 * h), int(0.5 * h))
    lungs = (img[rows, int(0.2 * w) : int(0.35 * w)].mean()) / 2 + (
        img[rows, int(0.65 * w) : int(0.8 * w)].mean()
    ) / 2
    mediastinum = img[rows, int(0.45 * w) : int(0.55 * w)].mean()
    return bool(mediastinum > lungs + 0.15)


# --------------------------------------------------------------------------------------------
# Synthetic file builders
# --------------------------------------------------------------------------------------------


def _write_dicom(path: Path, pixels: np.ndarray | None, **kwargs: Any) -> Path:
    """A CR film DICOM with ids and a view (overridable), as the readers' tests expect."""
    defaults = {
        "StudyInstanceUID": generate_uid(),
        "Modality": "CR",
        "PatientID": "SYNTH-1",
        "ViewPosition": "AP",
    }
    return write_dicom(path, pixels, **{**defaults, **kwargs})


def _ramp(height: int = 48, width: int = 64, high: int = 4095) -> np.ndarray:
    values = np.linspace(0, high, height * width).round().reshape(height, width)
    return values.astype(np.uint16)


def _noise_image(path: Path, fmt: str) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(path, fmt)
    return path


def _png_with_claimed_size(path: Path, width: int, height: int) -> Path:
    """A valid tiny PNG whose IHDR (with a correct CRC) claims width x height."""
    Image.new("1", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[16:29])  # after signature(8) + length(4) + b"IHDR"(4)
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def _cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# --------------------------------------------------------------------------------------------
# Real fixtures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "nih_320/*.jpg",
        RGBA_PNG,
        "nih_512/*.png",
        SIIM_GLOB,
        MONO1_TWIN,
        J2K_CHEST,
        "non_chest/*.dcm",
        "non_chest/*.png",
    ],
)
def test_every_fixture_kind_reads_to_unit_float32(fixtures: Path, pattern: str) -> None:
    _assert_unit_image(read_both(_one(fixtures, pattern)))


def test_all_nih_jpegs_read_at_320(fixtures: Path) -> None:
    for path in sorted(fixtures.glob("nih_320/*.jpg")):
        img = read_both(path)
        assert img.shape == (320, 320), path.name
        _assert_unit_image(img)


def test_rgba_png_becomes_2d_luminance(fixtures: Path) -> None:
    path = fixtures / RGBA_PNG
    img = read_both(path)
    assert img.shape == (1024, 1024)
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        expected = np.asarray(im.convert("L"), dtype=np.float32) / 255
    np.testing.assert_array_equal(img, expected)
    assert _mediastinum_brighter_than_lungs(img)


def test_monochrome1_twin_is_inverse_of_monochrome2(fixtures: Path) -> None:
    mono2 = read_both(_one(fixtures, SIIM_GLOB))
    mono1 = read_both(fixtures / MONO1_TWIN)
    assert mono1.shape == mono2.shape == (1024, 1024)
    assert float(np.abs(mono1 - (1.0 - mono2)).max()) <= 1 / 255 + 1e-6
    assert _mediastinum_brighter_than_lungs(mono2)


def test_15_bit_jpeg2000_monochrome1_decodes(fixtures: Path) -> None:
    path = fixtures / J2K_CHEST
    meta = metadata_both(path)
    img = read_both(path)
    assert (meta["rows"], meta["columns"]) == (1955, 1841)
    assert img.shape == (1955, 1841)  # (Rows, Columns) = (height, width)
    _assert_unit_image(img)
    assert 0.2 < float(img.mean()) < 0.95
    # MONOCHROME1 must be inverted: bone white, lungs darker.
    assert _mediastinum_brighter_than_lungs(img)


def test_read_dicom_metadata_on_fixtures(fixtures: Path) -> None:
    siim = metadata_both(_one(fixtures, SIIM_GLOB))
    twin = metadata_both(fixtures / MONO1_TWIN)
    assert siim["view_position"] == "PA"
    assert siim["photometric_interpretation"] == "MONOCHROME2"
    assert twin["photometric_interpretation"] == "MONOCHROME1"
    assert siim["patient_id"] == twin["patient_id"]
    assert siim["study_instance_uid"]
    assert (siim["rows"], siim["columns"]) == (1024, 1024)
    assert siim["number_of_frames"] == 1
    assert siim["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.50"
    tibia = metadata_both(_one(fixtures, "non_chest/*.dcm"))
    assert tibia["laterality"] == "R"
    assert tibia["body_part_examined"] == "EXTREMITY"


@pytest.mark.parametrize(
    "pattern", ["nih_320/*.jpg", "nih_512/*.png", RGBA_PNG, SIIM_GLOB, J2K_CHEST]
)
@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")  # pydicom, cut DICOM
def test_real_file_cut_in_half_is_truncated(fixtures: Path, tmp_path: Path, pattern: str) -> None:
    src = _one(fixtures, pattern)
    cut = _cut_in_half(src, tmp_path / f"half_{src.name}")
    with pytest.raises(TruncatedImageError, match=re.escape(f"half_{src.name}")):
        read_both(cut)


# --------------------------------------------------------------------------------------------
# Synthetic PNG / JPEG
# --------------------------------------------------------------------------------------------


def test_16_bit_png_scaled_by_65535(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 40 * 50).round().astype(np.uint16).reshape(40, 50)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    img = read_both(path)
    assert img.dtype == np.float32 and img.shape == (40, 50)
    np.testing.assert_allclose(img, values / 65535.0, atol=1e-6)
    assert img.min() == 0.0 and img.max() == 1.0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I"])
def test_png_modes_give_grey_over_255(tmp_path: Path, mode: str) -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16 x 64
    base = Image.fromarray(grey)
    suffix = "png"
    if mode == "P":
        im = Image.frombytes("P", base.size, grey.tobytes())
        im.putpalette([v for g in range(256) for v in (g, g, g)])
    elif mode == "I":
        # Pillow cannot write mode I as PNG; a TIFF exercises the same 32-bit reading rule.
        im, suffix = Image.fromarray(grey.astype(np.int32) * 257), "tif"
    elif mode in ("LA", "RGBA"):
        im = base.convert(mode)
        im.putalpha(255)
    else:
        im = base.convert(mode)
    path = tmp_path / f"{mode}.{suffix}"
    im.save(path)
    img = read_both(path)
    assert img.shape == grey.shape and img.dtype == np.float32
    np.testing.assert_allclose(img, grey / 255.0, atol=1e-6)


def test_colour_png_uses_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 3, 3), dtype=np.uint8)
    rgb[:, 0, 0], rgb[:, 1, 1], rgb[:, 2, 2] = 255, 255, 255  # pure R, G, B columns
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    img = read_both(path)
    np.testing.assert_allclose(img[0], [76 / 255, 150 / 255, 29 / 255], atol=1.5 / 255)


def test_alpha_is_dropped_not_composited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    im = Image.new("LA", (8, 8), (200, 0))  # grey 200, fully transparent
    path = tmp_path / "transparent.png"
    im.save(path)
    with caplog.at_level("WARNING", logger="cxrlabel.data.images"):
        img = read_both(path)
    np.testing.assert_allclose(img, 200 / 255, atol=1e-6)
    assert "alpha" in caplog.text


def test_jpeg_reads_close_to_source(tmp_path: Path) -> None:
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    path = tmp_path / "smooth.jpg"
    Image.fromarray(grey).save(path, quality=100)
    img = read_both(path)
    assert img.shape == (64, 64)
    assert float(np.abs(img - grey / 255.0).max()) < 3 / 255


def test_no_global_pillow_state_changed(tmp_path: Path) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    read_both(_noise_image(tmp_path / "a.png", "PNG"))
    with pytest.raises(TruncatedImageError):
        read_both(_cut_in_half(tmp_path / "a.png", tmp_path / "b.png"))
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


# --------------------------------------------------------------------------------------------
# Synthetic DICOM
# --------------------------------------------------------------------------------------------


def test_dicom_scaled_by_bits_stored(tmp_path: Path) -> None:
    pixels = _ramp(high=4095)
    img = read_both(_write_dicom(tmp_path / "d12.dcm", pixels, bits_stored=12))
    np.testing.assert_allclose(img, pixels / 4095.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = _ramp(high=4095)
    mono2 = read_both(_write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=12))
    path = _write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12)
    mono1 = read_both(path)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_rescale_and_signed_values(tmp_path: Path) -> None:
    pixels = (_ramp(high=4095).astype(np.int16) - 2048).astype(np.int16)
    path = _write_dicom(
        tmp_path / "signed.dcm", pixels, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100
    )
    img = read_both(path)
    # Stored range [-2048, 2047] maps through the rescale to the full [0, 1].
    np.testing.assert_allclose(img, (pixels + 2048) / 4095.0, atol=1e-6)


def test_dicom_window_applied(tmp_path: Path) -> None:
    pixels = _ramp(high=4095)
    path = _write_dicom(
        tmp_path / "win.dcm", pixels, bits_stored=12, WindowCenter=2048, WindowWidth=1024
    )
    img = read_both(path)
    assert img[pixels <= 1500].max() == 0.0  # below the window: black
    assert img[pixels >= 2600].min() == 1.0  # above the window: white
    inside = (pixels > 1600) & (pixels < 2500)
    expected = (pixels[inside] - 2047.5) / 1023 + 0.5  # DICOM LINEAR window, output [0, 1]
    np.testing.assert_allclose(img[inside], expected, atol=1e-5)


def test_multiframe_dicom_returns_first_frame(tmp_path: Path) -> None:
    first = _ramp(high=4095)
    frames = np.stack([first, 4095 - first])
    img = read_both(_write_dicom(tmp_path / "multi.dcm", frames, bits_stored=12))
    assert img.shape == first.shape
    np.testing.assert_allclose(img, first / 4095.0, atol=1e-6)


def test_dicom_detected_by_content_not_suffix(tmp_path: Path) -> None:
    pixels = _ramp(high=255).astype(np.uint8)
    path = _write_dicom(tmp_path / "actually_dicom.png", pixels)
    np.testing.assert_allclose(read_both(path), pixels / 255.0, atol=1e-6)


def test_dicom_metadata_synthetic(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "meta.dcm", _ramp(), bits_stored=12, ImageLaterality="L")
    meta = metadata_both(path)
    assert meta["view_position"] == "AP"
    assert meta["laterality"] == "L"
    assert meta["patient_id"] == "SYNTH-1"
    assert meta["photometric_interpretation"] == "MONOCHROME2"
    assert (meta["rows"], meta["columns"], meta["bits_stored"]) == (48, 64, 12)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_are_value_errors_with_path_reason_and_pickle(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(MissingImageError) as info:
        read_both(missing)
    err = info.value
    assert isinstance(err, ImageError) and isinstance(err, ValueError)
    assert err.path == missing
    assert "does not exist" in err.reason
    assert "nope.png" in str(err) and err.reason in str(err)
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is MissingImageError and str(clone) == str(err)


@pytest.mark.parametrize("name", ["empty.png", "empty.jpg", "empty.dcm"])
def test_zero_byte_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(EmptyImageError, match=re.escape(name)):
        read_both(tmp_path / name)


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_synthetic_image(tmp_path: Path, fmt: str, suffix: str) -> None:
    full = _noise_image(tmp_path / f"full.{suffix}", fmt)
    cut = _cut_in_half(full, tmp_path / f"cut.{suffix}")
    with pytest.raises(TruncatedImageError, match=re.escape(f"cut.{suffix}")):
        read_both(cut)
    header_only = tmp_path / f"header.{suffix}"
    header_only.write_bytes(full.read_bytes()[:20])
    with pytest.raises(TruncatedImageError, match=re.escape(f"header.{suffix}")):
        read_both(header_only)


def test_truncation_detected_even_if_pillow_lenient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        full = _noise_image(tmp_path / f"full.{suffix}", fmt)
        cut = _cut_in_half(full, tmp_path / f"cut.{suffix}")
        with pytest.raises(TruncatedImageError, match=re.escape(f"cut.{suffix}")):
            read_both(cut)


def test_truncated_dicom(tmp_path: Path) -> None:
    full = _write_dicom(tmp_path / "full.dcm", _ramp(128, 128), bits_stored=12)
    cut = _cut_in_half(full, tmp_path / "cut.dcm")
    with pytest.raises(TruncatedImageError, match=re.escape("cut.dcm")):
        read_both(cut)


@pytest.mark.parametrize("name", ["notes.png", "notes.jpg", "notes.dcm", "notes.txt"])
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while force-parsing text
def test_text_file_is_not_an_image(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("patient notes, definitely not pixels\n" * 20)
    with pytest.raises(NotAnImageError, match=re.escape(name)):
        read_both(path)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(NotAnImageError, match="directory"):
        read_both(tmp_path)


def test_huge_png_header_refused_before_decoding(tmp_path: Path) -> None:
    # 9000 x 9000 = 81 M pixels: over our 67 M default, under Pillow's own limits. The file
    # holds only 8 x 8 pixels of data, so decoding would fail: getting ImageTooLargeError
    # proves the check comes from the header, before any decoding.
    path = _png_with_claimed_size(tmp_path / "bomb.png", 9000, 9000)
    assert MAX_PIXELS < 9000 * 9000
    with pytest.raises(ImageTooLargeError, match=re.escape("bomb.png")) as info:
        read_both(path)
    assert "9000x9000" in info.value.reason


def test_png_over_pillow_limit_is_also_too_large(tmp_path: Path) -> None:
    path = _png_with_claimed_size(tmp_path / "giant.png", 30000, 30000)
    with pytest.raises(ImageTooLargeError, match=re.escape("giant.png")):
        read_both(path)


def test_max_pixels_argument(tmp_path: Path) -> None:
    path = _noise_image(tmp_path / "small.png", "PNG")  # 256 x 256
    with pytest.raises(ImageTooLargeError, match=re.escape("small.png")):
        read_both(path, max_pixels=256 * 256 - 1)
    assert read_both(path, max_pixels=256 * 256).shape == (256, 256)


def test_huge_dicom_refused_from_rows_columns(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "bomb.dcm", _ramp(), bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 9000, 9000  # pixel data still tiny: decoding would fail
    ds.save_as(path)
    with pytest.raises(ImageTooLargeError, match=re.escape("bomb.dcm")):
        read_both(path)
    with pytest.raises(ImageTooLargeError, match=re.escape("ok.dcm")):
        read_both(_write_dicom(tmp_path / "ok.dcm", _ramp(), bits_stored=12), max_pixels=100)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "header_only.dcm", None, Rows=512, Columns=512)
    with pytest.raises(NoPixelDataError, match=re.escape("header_only.dcm")):
        read_both(path)
    assert metadata_both(path)["patient_id"] == "SYNTH-1"  # metadata still readable


def _encapsulated_dicom(path: Path, transfer_syntax: str) -> Path:
    path = _write_dicom(path, _ramp(8, 8, high=255).astype(np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def test_dicom_transfer_syntax_without_decoder(tmp_path: Path) -> None:
    path = _encapsulated_dicom(tmp_path / "video.dcm", MPEG2MPML)
    with pytest.raises(UnsupportedDicomError, match=re.escape("video.dcm")) as info:
        read_both(path)
    assert "MPEG2" in info.value.reason


def test_dicom_missing_decoder_plugin_names_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Unavailable:
        is_available = False
        missing_dependencies: ClassVar[dict[str, str]] = {
            "pylibjpeg": "requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"
        }

    path = _encapsulated_dicom(tmp_path / "j2k.dcm", JPEG2000)
    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: _Unavailable())
    with pytest.raises(UnsupportedDicomError, match=re.escape("j2k.dcm")) as info:
        read_both(path)
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in info.value.reason


def test_corrupt_encapsulated_dicom(tmp_path: Path) -> None:
    path = _encapsulated_dicom(tmp_path / "garbage_j2k.dcm", JPEG2000)
    with pytest.raises(CorruptImageError, match=re.escape("garbage_j2k.dcm")):
        read_both(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_read_dicom_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingImageError, match=re.escape("absent.dcm")):
        metadata_both(tmp_path / "absent.dcm")
    text = tmp_path / "text.dcm"
    text.write_text("hello\n" * 50)
    with pytest.raises(NotAnImageError, match=re.escape("text.dcm")):
        metadata_both(text)


@pytest.mark.parametrize("vr, bits", [("US", 8), ("OW", 16)])
def test_dicom_voi_lut_sequence_preferred_over_window(tmp_path: Path, vr: str, bits: int) -> None:
    pixels = _ramp(high=4095)
    top = 2**bits - 1
    lut = (top - np.arange(4096) * (top + 1) // 4096).astype(np.uint16)  # an inverting LUT
    item = Dataset()
    item.LUTDescriptor = [4096, 0, bits]  # 4096 entries, first maps stored value 0
    item.add_new("LUTData", vr, lut.tolist() if vr == "US" else lut.astype("<u2").tobytes())
    path = _write_dicom(
        tmp_path / "lut.dcm",
        pixels,
        bits_stored=12,
        VOILUTSequence=[item],
        WindowCenter=2048,
        WindowWidth=100,
    )
    img = read_both(path)
    np.testing.assert_allclose(img, lut[pixels] / top, atol=1e-6)


@pytest.mark.parametrize("implicit", [True, False])
def test_bare_dicom_without_preamble_or_file_meta(tmp_path: Path, implicit: bool) -> None:
    """A raw data set (no 128-byte preamble, no file meta, so no transfer syntax) still
    decodes: it was parsed with some encoding, which is all uncompressed pixels need."""
    pixels = _ramp(high=4095)
    full = _write_dicom(tmp_path / "full.dcm", pixels, bits_stored=12)
    ds = pydicom.dcmread(full)
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert b"DICM" not in bare.read_bytes()[:132]
    np.testing.assert_allclose(read_both(bare), pixels / 4095.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bytes in memory and the one content sniffer
# --------------------------------------------------------------------------------------------


def _fixture_images(fixtures: Path) -> list[Path]:
    paths = sorted(p for p in fixtures.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".dcm"})
    assert paths, f"no images in {fixtures}"
    return paths


def test_every_fixture_reads_the_same_from_bytes(fixtures: Path) -> None:
    for path in _fixture_images(fixtures):
        from_file = read_image(path)
        data = path.read_bytes()
        for given in (data, bytearray(data), memoryview(data)):
            # No name: bytes are recognised by content alone.
            np.testing.assert_array_equal(read_image(given), from_file, err_msg=path.name)
        assert sniff_format(data) == {".png": "png", ".jpg": "jpeg", ".dcm": "dicom"}[path.suffix]
        if path.suffix == ".dcm":
            assert read_dicom_metadata(data) == read_dicom_metadata(path)


def _bare_dicom(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pixels = _ramp(high=4095)
    ds = pydicom.dcmread(_write_dicom(tmp_path / "full.dcm", pixels, bits_stored=12))
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.bin"  # no DICOM suffix: only the content says DICOM
    ds.save_as(bare, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return bare, pixels


def test_sniff_format(tmp_path: Path) -> None:
    png = _noise_image(tmp_path / "a.png", "PNG").read_bytes()
    jpeg = _noise_image(tmp_path / "a.jpg", "JPEG").read_bytes()
    dicom = _write_dicom(tmp_path / "a.dcm", _ramp()).read_bytes()
    bare, _ = _bare_dicom(tmp_path)
    assert sniff_format(png) == "png" and sniff_format(png[:8]) == "png"
    assert sniff_format(jpeg) == "jpeg" and sniff_format(jpeg[:3]) == "jpeg"
    assert sniff_format(dicom) == "dicom" and sniff_format(dicom[:132]) == "dicom"
    assert sniff_format(bare.read_bytes()) == "dicom"
    assert sniff_format(memoryview(png)) == "png"
    for other in (b"", b"\x89PN", b"hello, not an image" * 10, b"BM" + bytes(200)):
        assert sniff_format(other) is None, other[:8]


def test_dicom_without_preamble_is_recognised_by_content(tmp_path: Path) -> None:
    bare, pixels = _bare_dicom(tmp_path)
    expected = pixels / 4095.0
    np.testing.assert_allclose(read_image(bare), expected, atol=1e-6)
    np.testing.assert_allclose(read_image(bare.read_bytes()), expected, atol=1e-6)
    assert read_dicom_metadata(bare.read_bytes())["patient_id"] == "SYNTH-1"


def _truncated_png(tmp_path: Path) -> bytes:
    data = _noise_image(tmp_path / "t.png", "PNG").read_bytes()
    return data[: len(data) // 2]


BYTES_ERRORS = {
    "empty": (lambda tmp: b"", EmptyImageError, "empty"),
    "text": (lambda tmp: b"patient notes\n" * 20, NotAnImageError, "not a recognised image"),
    "truncated png": (_truncated_png, TruncatedImageError, "truncated"),
    "png signature only": (lambda tmp: b"\x89PNG\r\n\x1a\n" + bytes(12), TruncatedImageError, ""),
    "huge png header": (
        lambda tmp: _png_with_claimed_size(tmp / "bomb.png", 9000, 9000).read_bytes(),
        ImageTooLargeError,
        "9000x9000",
    ),
    "dicom without pixels": (
        lambda tmp: _write_dicom(tmp / "h.dcm", None, Rows=8, Columns=8).read_bytes(),
        NoPixelDataError,
        "no pixel data",
    ),
    "dicom without decoder": (
        lambda tmp: _encapsulated_dicom(tmp / "v.dcm", MPEG2MPML).read_bytes(),
        UnsupportedDicomError,
        "MPEG2",
    ),
    "corrupt dicom pixels": (
        lambda tmp: _encapsulated_dicom(tmp / "g.dcm", JPEG2000).read_bytes(),
        CorruptImageError,
        "cannot be decoded",
    ),
}


@pytest.mark.parametrize("case", list(BYTES_ERRORS))
def test_bad_bytes_raise_the_error_a_file_would_naming_the_name(tmp_path: Path, case: str) -> None:
    make, error, reason = BYTES_ERRORS[case]
    data = make(tmp_path)
    with pytest.raises(error, match=re.escape("upload.png")) as info:
        read_image(data, name="upload.png")
    assert info.value.path == Path("upload.png") and reason in info.value.reason
    assert "tmp" not in str(info.value)  # no temporary file behind it
    with pytest.raises(error, match=re.escape("'<bytes>'")):
        read_image(data)  # unnamed bytes are called <bytes>


def test_max_pixels_applies_to_bytes(tmp_path: Path) -> None:
    data = _noise_image(tmp_path / "small.png", "PNG").read_bytes()  # 256 x 256
    with pytest.raises(ImageTooLargeError, match="small-upload"):
        read_image(data, name="small-upload", max_pixels=256 * 256 - 1)
    assert read_image(data, max_pixels=256 * 256).shape == (256, 256)


# --------------------------------------------------------------------------------------------
# Encapsulated DICOM frames that disagree with the header (decompression bombs)
# --------------------------------------------------------------------------------------------


def _constant_jpeg(width: int, height: int) -> bytes:
    """A baseline JPEG of one grey level: tiny on disk however many pixels it declares."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "JPEG", quality=50)
    return buffer.getvalue()


def _constant_j2k(width: int, height: int) -> bytes:
    import openjpeg

    return bytes(openjpeg.encode(np.full((height, width), 128, dtype=np.uint8)))


def _jpeg_ls_header(width: int, height: int) -> bytes:
    """SOI, a JPEG-LS SOF55 segment declaring width x height (8-bit, 1 component), then junk:
    no JPEG-LS encoder is installed, and a header check must refuse it before any decoding."""
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof55 + b"\xff\xda" + bytes(64) + b"\xff\xd9"


def _jp2(codestream: bytes, width: int, height: int) -> bytes:
    """A JP2 file around `codestream` whose ihdr box claims width x height."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", height, width, 1, 7, 7, 0, 0))
    colr = box(b"colr", b"\x01\x00\x00" + struct.pack(">I", 17))
    return (
        box(b"jP  ", b"\r\n\x87\n")
        + box(b"ftyp", b"jp2 " + bytes(4) + b"jp2 ")
        + box(b"jp2h", ihdr + colr)
        + box(b"jp2c", codestream)
    )


def _dicom_with_frame(
    path: Path, frame: bytes, syntax: str, *, rows: int = 64, columns: int = 64
) -> Path:
    """An 8-bit MONOCHROME2 DICOM whose header says rows x columns and whose single
    encapsulated frame is `frame`."""
    path = _write_dicom(path, _ramp(8, 8, high=255).astype(np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


FRAME_BOMBS = {
    "jpeg baseline": (lambda w, h: _constant_jpeg(w, h), JPEGBaseline8Bit),
    "jpeg 2000": (lambda w, h: _constant_j2k(w, h), JPEG2000Lossless),
    "jp2 wrapper lying in ihdr": (lambda w, h: _jp2(_constant_j2k(w, h), 64, 64), JPEG2000),
    "jpeg-ls": (lambda w, h: _jpeg_ls_header(w, h), JPEGLSLossless),
}


@pytest.mark.parametrize("kind", list(FRAME_BOMBS))
def test_oversized_dicom_frame_refused_before_decoding(tmp_path: Path, kind: str) -> None:
    """The header says 64x64 but the frame is 2048x2048 (4 M pixels): refused from the frame's
    own header, before its pixels are decoded (no allocation near the frame's size)."""
    make, syntax = FRAME_BOMBS[kind]
    path = _dicom_with_frame(tmp_path / "bomb.dcm", make(2048, 2048), syntax)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=re.escape("bomb.dcm")) as info:
            read_both(path, max_pixels=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "2048x2048" in info.value.reason
    assert peak < 2048 * 2048 // 2, f"{peak:,} bytes allocated: the frame was decoded"


@pytest.mark.parametrize("kind", list(FRAME_BOMBS))
def test_dicom_frame_disagreeing_with_header_is_corrupt(tmp_path: Path, kind: str) -> None:
    make, syntax = FRAME_BOMBS[kind]
    path = _dicom_with_frame(tmp_path / "liar.dcm", make(96, 80), syntax)
    with pytest.raises(CorruptImageError, match=re.escape("liar.dcm")) as info:
        read_both(path)
    assert "96x80" in info.value.reason and "64x64" in info.value.reason


def test_dicom_frame_agreeing_with_header_still_decodes(tmp_path: Path) -> None:
    for make, syntax in (FRAME_BOMBS["jpeg baseline"], FRAME_BOMBS["jpeg 2000"]):
        path = _dicom_with_frame(tmp_path / "fine.dcm", make(64, 48), syntax, rows=48)
        img = read_both(path, max_pixels=64 * 48)
        assert img.shape == (48, 64)
        np.testing.assert_allclose(img, 128 / 255, atol=2 / 255)


def test_dicom_frame_with_more_samples_than_header_is_corrupt(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "JPEG")
    path = _dicom_with_frame(tmp_path / "colour.dcm", buffer.getvalue(), JPEGBaseline8Bit)
    with pytest.raises(CorruptImageError, match=re.escape("colour.dcm")) as info:
        read_both(path)
    assert "3 samples" in info.value.reason


def test_deflated_dicom_bomb_refused_before_inflating(tmp_path: Path) -> None:
    """A deflated data set that inflates far beyond what max_pixels allows is refused while
    inflating, not after the whole data set is in memory."""
    path = _write_dicom(tmp_path / "deflate.dcm", np.zeros((2048, 2048), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.Rows = ds.Columns = 8  # the header is small; the deflated stream is not
    ds.save_as(path)
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=re.escape("deflate.dcm")):
            read_both(path, max_pixels=100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2048 * 2048 // 2, f"{peak:,} bytes allocated: the data set was inflated"
    small = _write_dicom(tmp_path / "small.dcm", _ramp(), bits_stored=12)
    ds = pydicom.dcmread(small)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(small)
    np.testing.assert_allclose(read_both(small), _ramp() / 4095.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Files that exist but cannot be read
# --------------------------------------------------------------------------------------------


def test_symlink_loop_is_unreadable_naming_the_file(tmp_path: Path) -> None:
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    for read in (read_image, read_dicom_metadata):
        with pytest.raises(UnreadableImageError, match=re.escape("loop.png")) as info:
            read(loop)
        assert "symbolic links" in info.value.reason.lower() or "loop" in info.value.reason


def test_permission_denied_is_unreadable_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests may run as root, for whom chmod 000 changes nothing: refuse the open instead.
    path = _noise_image(tmp_path / "secret.png", "PNG")
    real_open = Path.open

    def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "secret.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(UnreadableImageError, match=re.escape("secret.png")) as info:
        read_image(path)
    assert "Permission denied" in info.value.reason
    assert isinstance(info.value, ImageError)
    assert pickle.loads(pickle.dumps(info.value)).reason == info.value.reason


def test_rle_frame_decoding_far_past_the_header_is_refused(tmp_path: Path) -> None:
    """An RLE frame of 2-byte runs (each decodes to 128 bytes) under a 64x64 header: pydicom
    would decode it all (64 x the file size) and only warn; refused before decoding."""
    path = _write_dicom(tmp_path / "rle.dcm", _ramp(64, 64, high=255).astype(np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    ds.PixelData = encapsulate([header + b"\x81\x00" * 100_000])  # 12.8 MB decoded
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptImageError, match=re.escape("rle.dcm")) as info:
            read_both(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "RLE segment 1" in info.value.reason
    assert peak < 4_000_000, f"{peak:,} bytes allocated: the segment was decoded"
    fine = _write_dicom(tmp_path / "fine_rle.dcm", _ramp(), bits_stored=12)
    ds = pydicom.dcmread(fine)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(fine)
    np.testing.assert_allclose(read_both(fine), _ramp() / 4095.0, atol=1e-6)
