"""Read a chest radiograph from PNG, JPEG or DICOM into one greyscale float array.

Contract of :func:`read_image`
------------------------------
Whatever the file format, the result is a ``numpy.ndarray`` of dtype ``float32``, shape
``(H, W)`` (rows, columns), values in ``[0, 1]``, where ``1`` is white (bone, dense tissue) as
the film is displayed for a MONOCHROME2 image and ``0`` is black (air). Every later stage
(resize, normalisation, the model) relies on this one convention, so the reader is the only
place that knows about bit depths, photometric interpretations and LUTs.

Scaling rules (fixed per format, never per-image min-max, so that the same pixels always give
the same values and a MONOCHROME1 file equals ``1 -`` its MONOCHROME2 twin):

* 8-bit images (PNG/JPEG modes ``L``, ``P``, ``RGB``, ``RGBA``, ``LA``, ``1``...): colour is
  converted to grey by Pillow's ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``), then
  divided by 255.
* 16-bit greyscale PNG (Pillow modes ``I;16*`` and ``I``): divided by 65535, the container's
  full range. A 12-bit image stored in a 16-bit PNG therefore looks dark; guessing the "real"
  bit depth from the pixel maximum would make brightness depend on content, so we do not.
* Alpha is dropped, not composited: radiographs carry no meaning in alpha, and NIH's RGBA PNGs
  have alpha = 255 everywhere. A warning is logged when an alpha channel is not fully opaque.
* EXIF orientation of JPEGs is applied, so the array matches what a viewer displays.
* DICOM: the Modality LUT (or Rescale Slope/Intercept) is applied, then the VOI LUT (a VOI LUT
  Sequence is preferred over Window Center/Width, as in DICOM and pydicom). The output is then
  divided by the *declared* output range of the last stage applied:

  - VOI LUT Sequence: ``[0, 2**bits - 1]`` from the LUT descriptor (widened to the output's
    maximum only when a malformed descriptor understates the LUT's bit depth);
  - windowing: the range pydicom's windowing maps onto, i.e. the stored-value range
    (``BitsStored``, signed or unsigned) passed through the Modality LUT / rescale;
  - no VOI: the same stored-value range, i.e. an unsigned image is divided by
    ``2**BitsStored - 1`` (255 for 8-bit, 32767 for 15-bit...).

  MONOCHROME1 images are then inverted (``1 - x``). Colour DICOM (RGB, YBR) is converted to
  grey by the same ITU-R 601 luma and divided by ``2**BitsStored - 1``. Multi-frame DICOM:
  only the first frame is decoded and returned (a radiograph is one frame; other frames of a
  multi-frame object are ignored, and this is logged at debug level).

Safety: images larger than ``max_pixels`` (default :data:`MAX_PIXELS` = 8192 * 8192) are
refused *before* any pixel is decoded, from the PNG/JPEG header size or the DICOM
Rows x Columns. A decoder sizes its output from the compressed stream, not from the DICOM
header, so an encapsulated DICOM frame is also checked from its own header (JPEG/JPEG-LS SOF,
JPEG 2000 SIZ) against the limit and against Rows, Columns and Samples per Pixel (a mismatch
is a :class:`CorruptImageError`); a deflated data set is refused while inflating once it passes
:func:`max_inflated_bytes`. This check does not rely on, and never changes, Pillow's global
``Image.MAX_IMAGE_PIXELS`` (Pillow's own, larger, limit still applies on top of ours).
Truncated files are detected by fully decoding them; this module never sets
``ImageFile.LOAD_TRUNCATED_IMAGES``. If another module has set it, a structural check (the PNG
``IEND`` chunk / the JPEG EOI marker must be present) is used instead.

Sources: a path, or the file's bytes in memory (``bytes``, ``bytearray`` or ``memoryview``, e.g.
an HTTP upload), decoded by the same code into the same array. :func:`sniff_format` is the one
place that tells PNG, JPEG and DICOM apart by their first bytes, for both.

What the greyscale array cannot show (that the file had real colour, its DICOM Modality and
BodyPartExamined) is reported by :func:`read_image_with_info` as an :class:`ImageInfo`, from the
same single decode; :mod:`cxrlabel.data.sanity` judges it.

Every failure raises a subclass of :class:`ImageError` (itself a ``ValueError``) whose message
names the file (or the ``name`` given with bytes) and the cause; see the class docstrings.

Importing this module changes no global state (no warning filters, no Pillow settings).
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.errors
import pydicom.filereader
import pydicom.pixels
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_PIXELS: int = 8192 * 8192
"""Default largest image (width * height, 67,108,864 pixels) that :func:`read_image` decodes.

Chest radiographs are at most about 4300 x 4300 (CR/DR detectors), so this leaves ample room
while refusing decompression bombs: a 64 M pixel float32 image is already 256 MiB.
"""

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview
"""What :func:`read_image` reads: a path, or a whole file's bytes in memory."""

ImageFormat = Literal["png", "jpeg", "dicom"]
BYTES_NAME = "<bytes>"
"""What errors call bytes given without a `name`."""

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
HEAD_BYTES = _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)
"""How many leading bytes :func:`sniff_format` needs to see (the DICOM preamble and magic)."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# A DICOM data set without the preamble starts with its lowest element, little endian: file
# meta (group 0002) or, for a bare data set, identifying elements (group 0008).
_BARE_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00")
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"  # the only big-endian transfer syntax (retired)
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as little-endian group/element
# Decoder messages (Pillow, pydicom) that mean "the data stops early".
_TRUNCATION_HINTS = ("truncat", "less than expected", "end of file", "unexpected eof")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", *_SIXTEEN_BIT_MODES})
# Colour content is measured on a strided sample of at most about this many pixels: enough to
# see colour anywhere but in a speck, and cheap on a 4000 px film.
CHROMA_SAMPLE = 1 << 20

# Which pip packages provide a decoder, per DICOM transfer syntax, for error messages.
_JPEG_PACKAGES = "pylibjpeg and pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg)"
_J2K_PACKAGES = "pylibjpeg and pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)"
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _JPEG_PACKAGES,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _JPEG_PACKAGES,  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57": _JPEG_PACKAGES,  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": _JPEG_PACKAGES,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _JPEG_PACKAGES,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JPEG_PACKAGES,  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90": _J2K_PACKAGES,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _J2K_PACKAGES,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _J2K_PACKAGES,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _J2K_PACKAGES,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _J2K_PACKAGES,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (pip install pylibjpeg pylibjpeg-rle)",  # RLE
}


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class ImageError(ValueError):
    """An image file could not be read. Base class of every error raised by this module.

    Attributes:
        path: the file that failed (for bytes, the `name` given to the reader, as a Path).
        reason: the cause, in words (also in ``str(error)``, which always names the file).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {str(self.path)!r}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep exceptions picklable (DataLoader workers send them to the main process).
        return (type(self), (self.path, self.reason))


class MissingImageError(ImageError):
    """The path does not exist."""


class UnreadableImageError(ImageError):
    """The path exists but cannot be opened or read: permission denied, a symbolic-link loop,
    an I/O error. Retrying may succeed once the file system is fixed, unlike a corrupt file."""


class EmptyImageError(ImageError):
    """The file exists but is zero bytes long."""


class NotAnImageError(ImageError):
    """The file is not in a format we can read (e.g. a text file named ``.png``)."""


class CorruptImageError(ImageError):
    """The file is recognised but its content cannot be decoded."""


class TruncatedImageError(CorruptImageError):
    """The file was cut short (an incomplete download or copy)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (a possible decompression bomb)."""


class NoPixelDataError(ImageError):
    """A DICOM file with no pixel data (e.g. a structured report or a header-only file)."""


class UnsupportedImageError(ImageError):
    """A readable file whose pixel format or encoding is not supported."""


class UnsupportedDicomError(UnsupportedImageError):
    """A DICOM transfer syntax with no decoder, or with its decoder package not installed."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What the reader saw of a file besides the grey pixels it returns.

    Attributes:
        format: ``"png"``, ``"jpeg"`` or ``"dicom"`` (from the content, as :func:`sniff_format`
            says; a DICOM recognised by its suffix is ``"dicom"``); for another format Pillow
            reads, Pillow's name in lower case.
        width, height: of the returned array (after EXIF orientation).
        mode: the Pillow mode (``"L"``, ``"RGB"``, ``"I;16"``...) or the DICOM Photometric
            Interpretation (``"MONOCHROME2"``, ``"RGB"``...).
        chroma: how coloured the pixels are: the mean over pixels of (largest - smallest
            colour channel) / full scale, in [0, 1]; 0.0 for a greyscale file, and about 0 for
            grey content stored as RGB (NIH's RGBA PNGs).
        modality: DICOM Modality (``"CR"``, ``"DX"``, ``"MR"``...); None when absent or not DICOM.
        body_part: DICOM BodyPartExamined; None when absent or not DICOM.
    """

    format: str
    width: int
    height: int
    mode: str
    chroma: float = 0.0
    modality: str | None = None
    body_part: str | None = None


def read_image(
    source: ImageSource, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Read a PNG, JPEG or DICOM image into a float32 ``(H, W)`` array in ``[0, 1]``, 1 = white.

    DICOM is recognised by content (see :func:`sniff_format`: ``DICM`` at offset 128, or a
    data set starting without the preamble) or by a ``.dcm``/``.dicom`` suffix of the name;
    everything else goes to Pillow, which recognises formats by content, not by suffix.
    See the module docstring for the scaling rules.

    Args:
        source: the image file, or its whole content as bytes (decoded exactly as the file).
        name: what error messages call the source (and whose suffix counts as a path's
            would); default: the path, or ``"<bytes>"`` for bytes.
        max_pixels: refuse images with more than this many pixels (width * height), checked
            from the header before decoding.

    Raises:
        ImageError: one of its subclasses, naming the file (or `name`) and the cause.
    """
    return read_image_with_info(source, name=name, max_pixels=max_pixels)[0]


def read_image_with_info(
    source: ImageSource, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, ImageInfo]:
    """:func:`read_image`'s array and an :class:`ImageInfo` about the file, from one decode.

    Arguments and errors are those of :func:`read_image`; the array is identical.
    """
    src = _Source.of(source, name)
    head = src.head()
    if _is_dicom(src, head):
        return _read_dicom(src, head, max_pixels)
    return _read_pillow(src, head, max_pixels)


def sniff_format(head: bytes) -> ImageFormat | None:
    """``"png"``, ``"jpeg"`` or ``"dicom"`` from a file's first bytes (:data:`HEAD_BYTES` of
    them suffice); None for anything else.

    DICOM is recognised by ``DICM`` at offset 128 or, for data without the preamble, by a first
    element in group 0002 or 0008 (little endian), as such data sets start; the DICOM reader
    then checks that DICOM elements really follow.
    """
    head = bytes(head[:HEAD_BYTES])
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    if _has_dicom_preamble(head):
        return "dicom"
    if len(head) >= 8 and head[:2] in _BARE_DICOM_GROUPS and head[3] == 0:
        return "dicom"
    return None


# Uncompressed and deflated little-endian syntaxes: pydicom reads them with no plugin.
_NATIVE_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)


def decodable_transfer_syntaxes() -> tuple[str, ...]:
    """The DICOM transfer syntaxes this reader decodes here: the little-endian native ones and
    each compressed syntax whose pydicom decoder plugin is installed (what a DICOM node may
    accept without storing films it cannot read)."""
    found = list(_NATIVE_SYNTAXES)
    for syntax in _DECODER_PACKAGES:
        try:
            if pydicom.pixels.get_decoder(syntax).is_available:
                found.append(syntax)
        except NotImplementedError:  # a pydicom without a decoder for it at all
            continue
    return tuple(found)


def read_dicom_metadata(source: ImageSource, *, name: str | None = None) -> dict[str, Any]:
    """Return the few DICOM header fields labelling needs, without decoding any pixels.

    `source` and `name` are as for :func:`read_image`.

    Keys (value ``None`` when the tag is absent or empty): ``view_position`` (ViewPosition, e.g.
    ``"PA"``/``"AP"``/``"LL"``), ``laterality`` (ImageLaterality, else Laterality),
    ``patient_id``, ``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``,
    ``modality``, ``body_part_examined``, ``photometric_interpretation``, ``rows``,
    ``columns``, ``bits_stored``, ``number_of_frames`` (int, 1 when absent) and
    ``transfer_syntax_uid``.

    Raises:
        ImageError: missing, empty or non-DICOM file.
    """
    src = _Source.of(source, name)
    ds = _dcmread(src, src.head(), stop_before_pixels=True)

    def text(*keywords: str) -> str | None:
        for keyword in keywords:
            value = ds.get(keyword)
            if value is not None and str(value).strip():
                return str(value).strip()
        return None

    def integer(keyword: str) -> int | None:
        value = ds.get(keyword)
        try:
            return int(value) if value is not None and str(value).strip() else None
        except (TypeError, ValueError):
            return None

    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return {
        "view_position": text("ViewPosition"),
        "laterality": text("ImageLaterality", "Laterality"),
        "patient_id": text("PatientID"),
        "study_instance_uid": text("StudyInstanceUID"),
        "series_instance_uid": text("SeriesInstanceUID"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "modality": text("Modality"),
        "body_part_examined": text("BodyPartExamined"),
        "photometric_interpretation": text("PhotometricInterpretation"),
        "rows": integer("Rows"),
        "columns": integer("Columns"),
        "bits_stored": integer("BitsStored"),
        "number_of_frames": integer("NumberOfFrames") or 1,
        "transfer_syntax_uid": str(transfer_syntax) if transfer_syntax else None,
    }


# --------------------------------------------------------------------------------------------
# Sources: a file or bytes in memory, read the same way
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A path or a file's bytes; `name` is what errors call it (a Path, as ImageError keeps)."""

    name: Path
    path: Path | None = None
    data: bytes | None = None

    @classmethod
    def of(cls, source: ImageSource, name: str | None) -> _Source:
        if isinstance(source, bytes | bytearray | memoryview):
            # A private copy: the caller's buffer may change while it is being decoded.
            return cls(Path(name or BYTES_NAME), data=bytes(source))
        path = Path(source)
        return cls(Path(name) if name else path, path=path)

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return self.path.open("rb")

    def head(self) -> bytes:
        """Fail early on missing/empty/unreadable sources; return the first HEAD_BYTES."""
        try:
            with self.open() as handle:
                head = handle.read(HEAD_BYTES)
        except FileNotFoundError:
            raise MissingImageError(self.name, "file does not exist") from None
        except IsADirectoryError:
            raise NotAnImageError(self.name, "is a directory, not a file") from None
        except OSError as exc:  # permission denied, a symbolic-link loop, an I/O error...
            reason = f"cannot open or read file ({exc.strerror or exc})"
            raise UnreadableImageError(self.name, reason) from exc
        if not head:
            raise EmptyImageError(self.name, "file is empty (0 bytes)")
        return head

    def tail(self, size: int) -> bytes:
        with self.open() as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read()

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


def _is_dicom(src: _Source, head: bytes) -> bool:
    return sniff_format(head) == "dicom" or src.name.suffix.lower() in DICOM_SUFFIXES


def _has_dicom_preamble(head: bytes) -> bool:
    return head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def _check_size(
    path: Path, width: int, height: int, max_pixels: int, *, what: str = "image"
) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(path, f"header gives an invalid {what} size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            path,
            f"{what} is {width}x{height} = {width * height:,} pixels, more than the allowed "
            f"{max_pixels:,} (possible decompression bomb; raise max_pixels if intended)",
        )


# --------------------------------------------------------------------------------------------
# PNG / JPEG (and anything else Pillow opens)
# --------------------------------------------------------------------------------------------


def _read_pillow(src: _Source, head: bytes, max_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    path = src.name
    try:
        with src.open() as handle, Image.open(handle) as im:
            # Image.open only parses the header: check the size before decoding anything.
            _check_size(path, im.width, im.height, max_pixels)
            _load_fully(src, im)
            image = _pillow_to_float(path, im)
            fmt = sniff_format(head) or (im.format or "unknown").lower()
            height, width = image.shape
            return image, ImageInfo(fmt, width, height, im.mode, _pillow_chroma(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own global limit, stricter than ours
        raise ImageTooLargeError(
            path, f"Pillow refused it as a decompression bomb ({exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        if sniff_format(head) in ("png", "jpeg"):
            raise TruncatedImageError(
                path, "file starts like a PNG/JPEG but its header is incomplete or corrupt"
            ) from exc
        raise NotAnImageError(
            path, "not a recognised image format (expected PNG, JPEG or DICOM)"
        ) from exc
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        raise _decode_error(path, exc) from exc


def _load_fully(src: _Source, im: Image.Image) -> None:
    """Decode every pixel now, so that truncation raises here rather than going unnoticed."""
    im.load()
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _has_end_marker(src, im.format):
        # Someone enabled Pillow's lenient mode process-wide; it silently fills missing data
        # with grey, so fall back to checking the file's end marker ourselves.
        raise TruncatedImageError(src.name, f"{im.format} end marker missing: file is truncated")


def _has_end_marker(src: _Source, fmt: str | None) -> bool:
    markers = {"PNG": b"IEND", "JPEG": b"\xff\xd9"}
    if fmt not in markers:
        return True
    return markers[fmt] in src.tail(4096)


def _decode_error(path: Path, exc: BaseException) -> ImageError:
    message = str(exc) or type(exc).__name__
    lowered = message.lower()
    if isinstance(exc, EOFError) or any(hint in lowered for hint in _TRUNCATION_HINTS):
        return TruncatedImageError(path, f"file is truncated ({message})")
    return CorruptImageError(path, f"pixel data cannot be decoded ({message})")


def _pillow_to_float(path: Path, im: Image.Image) -> np.ndarray:
    if im.format == "JPEG":
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.float32)
        return _unit_range(values / np.float32(65535.0))
    if mode == "F":
        raise UnsupportedImageError(
            path, "floating-point images (Pillow mode 'F') have no defined intensity range"
        )
    if "A" in mode:
        _warn_if_translucent(path, im)
    grey = _to_luminance(im)
    return np.asarray(grey, dtype=np.float32) / np.float32(255.0)


def _pillow_chroma(im: Image.Image) -> float:
    """ImageInfo.chroma of a decoded Pillow image (its colour before conversion to grey)."""
    if im.mode in _GREY_MODES:
        return 0.0
    rgb = im if im.mode in ("RGB", "RGBA", "RGBX") else im.convert("RGB")  # P, CMYK, YCbCr...
    return _chroma(np.asarray(rgb), 255.0)


def sample_step(height: int, width: int, budget: int) -> int:
    """The stride (rows and columns alike) that samples an image's pixels down to at most
    about `budget` pixels: what ImageInfo.chroma and the input checks measure on."""
    return max(1, math.ceil(math.sqrt(height * width / budget)))


def _chroma(pixels: np.ndarray, full_scale: float) -> float:
    """Mean (largest - smallest of the first three channels) / full_scale over a strided
    sample of an (H, W, C) array."""
    height, width = pixels.shape[:2]
    step = sample_step(height, width, CHROMA_SAMPLE)
    sample = pixels[::step, ::step, :3]
    spread = sample.max(axis=-1).astype(np.float64) - sample.min(axis=-1)
    return float(spread.mean() / full_scale) if spread.size else 0.0


def _to_luminance(im: Image.Image) -> Image.Image:
    """8-bit grey by Pillow's ITU-R 601-2 luma; alpha is ignored (not composited)."""
    if im.mode == "L":
        return im
    if im.mode in ("LA", "La"):
        return im.getchannel("L")
    if im.mode in ("RGB", "RGBA", "RGBa", "RGBX", "1", "P"):
        return im.convert("L")
    return im.convert("RGB").convert("L")  # CMYK, YCbCr, LAB, PA, ...


def _warn_if_translucent(path: Path, im: Image.Image) -> None:
    try:
        low, _ = im.getchannel("A").getextrema()
    except ValueError:
        return
    if low < 255:
        logger.warning("%s: alpha channel is not fully opaque; alpha is ignored", path)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def _dcmread(
    src: _Source,
    head: bytes,
    *,
    stop_before_pixels: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> pydicom.Dataset:
    """Parse a DICOM file. Files without the preamble (allowed by content or suffix) are read
    with force. A deflated data set is first checked to inflate to at most
    :func:`max_inflated_bytes` of `max_pixels`."""
    path = src.name
    has_preamble = _has_dicom_preamble(head)
    with src.open() as handle:
        _check_deflated_size(path, handle, max_inflated_bytes(max_pixels))
    try:
        with src.open() as handle:
            # Nothing is deferred (pydicom's default), so the data set outlives the handle.
            ds = pydicom.dcmread(
                handle, force=not has_preamble, stop_before_pixels=stop_before_pixels
            )
        _convert_elements(ds)
    except pydicom.errors.InvalidDicomError as exc:
        raise NotAnImageError(path, f"not a valid DICOM file ({exc})") from exc
    except _DICOM_PARSE_ERRORS as exc:
        if has_preamble:
            raise _decode_error(path, exc) from exc
        raise NotAnImageError(path, f"not a DICOM file (no 'DICM' preamble; {exc})") from exc
    if not has_preamble and not any(
        keyword in ds for keyword in ("SOPClassUID", "Modality", "Rows", "PixelData")
    ):
        raise NotAnImageError(path, "not a DICOM file (no 'DICM' preamble, no DICOM elements)")
    return ds


# What pydicom raises on malformed input besides InvalidDicomError, as found by fuzzing: an
# unknown VR (NotImplementedError), a value of the wrong length (BytesLengthException, a
# plain Exception), a short element header (struct.error), a cut deflate stream (zlib.error).
_DICOM_PARSE_ERRORS = (
    EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
    NotImplementedError, RuntimeError, struct.error, zlib.error,
    pydicom.errors.BytesLengthException,
)  # fmt: skip


def _convert_elements(ds: pydicom.Dataset) -> None:
    """Convert every raw element now: pydicom converts values on first access, so a malformed
    value would otherwise fail later, wherever some code first reads it, with a bare error."""
    meta = getattr(ds, "file_meta", None)
    for dataset in (meta, ds) if meta is not None else (ds,):
        for _ in dataset.iterall():
            pass


def _assume_transfer_syntax(ds: pydicom.Dataset) -> None:
    """A bare data set (no preamble, no file meta) has no transfer syntax, but it was parsed
    with one: record that so pixel decoding knows the (uncompressed) encoding."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    explicit = ds.original_encoding[0] is False
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian


def _read_dicom(src: _Source, head: bytes, max_pixels: int) -> tuple[np.ndarray, ImageInfo]:
    path = src.name
    ds = _dcmread(src, head, max_pixels=max_pixels)
    _check_dicom_pixels_present(src, ds)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    _check_size(path, columns, rows, max_pixels)
    _check_decoder(path, ds)
    _check_encapsulated_frame(path, ds, max_pixels)
    _assume_transfer_syntax(ds)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        logger.debug("%s: %d frames, using the first only", path, frames)
    try:
        arr = pydicom.pixels.pixel_array(ds, index=0)
    except (
        ValueError, RuntimeError, OSError, EOFError, KeyError, IndexError, AttributeError,
        TypeError,
    ) as exc:  # fmt: skip
        raise _decode_error(path, exc) from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    info = ImageInfo(
        "dicom",
        int(arr.shape[1]),
        int(arr.shape[0]),
        photometric,
        modality=_dicom_text(ds, "Modality"),
        body_part=_dicom_text(ds, "BodyPartExamined"),
    )
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        out = _dicom_monochrome_to_unit(path, arr, ds)
        return ((1.0 - out) if photometric == "MONOCHROME1" else out), info
    if arr.ndim == 3 and arr.shape[-1] == 3 and photometric != "PALETTE COLOR":
        # pydicom has already converted YBR_* to RGB.
        luma = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        _, high = _stored_range(ds)
        info = replace(info, chroma=_chroma(arr, high))
        return _unit_range((luma / high).astype(np.float32)), info
    raise UnsupportedDicomError(
        path, f"photometric interpretation {photometric or '(missing)'!r} is not supported"
    )


def _dicom_text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return (str(value).strip() or None) if value is not None else None


# Deflated data sets and encapsulated frames: sizes checked before anything is expanded.
# The header's Rows x Columns bound nothing by themselves: a decoder sizes its output from the
# compressed stream's own header (JPEG SOF, JPEG 2000 SIZ), and pydicom inflates a deflated
# data set in full, so each is checked against the pixel limit before it is expanded.

_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_INFLATE_CHUNK = 1 << 18
_BYTES_PER_ALLOWED_PIXEL = 8
"""Inflated bytes allowed per pixel of `max_pixels`: 3 samples of 16 bits (6) plus room."""
_INFLATED_HEADER_ALLOWANCE = 1 << 20

_JPEG_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near Lossless
    }
)
_J2K_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 multi-component lossless
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
# JPEG markers whose segment gives the frame size: SOF0-SOF15 (not DHT C4, JPG C8, DAC CC),
# DHP (DE, a hierarchical image's full size) and JPEG-LS SOF55 (F7). Same layout for all.
_JPEG_SIZE_MARKERS = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_RLE = "1.2.840.10008.1.2.5"
_RLE_HEADER_BYTES = 64  # 16 little-endian uint32: segment count, then 15 segment offsets
_RLE_SLACK_BYTES = 1024
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


def max_inflated_bytes(max_pixels: int = MAX_PIXELS) -> int:
    """The most bytes a deflated DICOM data set may inflate to under `max_pixels`."""
    return max_pixels * _BYTES_PER_ALLOWED_PIXEL + _INFLATED_HEADER_ALLOWANCE


def _check_deflated_size(path: Path, handle: BinaryIO, limit: int) -> None:
    """For a Deflated Explicit VR Little Endian file, inflate the data set chunk by chunk,
    keeping nothing, and refuse it once it passes `limit` bytes (pydicom inflates it whole)."""
    if not _is_deflated(handle):
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof and (data := handle.read(_INFLATE_CHUNK)):
        while data and not inflater.eof:
            try:
                total += len(inflater.decompress(data, _INFLATE_CHUNK))
            except zlib.error as exc:
                raise CorruptImageError(path, f"deflated data set is corrupt ({exc})") from exc
            if total > limit:
                raise ImageTooLargeError(
                    path,
                    f"deflated data set inflates to more than {limit:,} bytes, more than "
                    "max_pixels allows (possible decompression bomb; raise max_pixels if "
                    "intended)",
                )
            data = inflater.unconsumed_tail
    if not inflater.eof:
        raise TruncatedImageError(path, "deflated data set ends early (file is truncated)")


def _is_deflated(handle: BinaryIO) -> bool:
    """Whether the file meta names the deflated syntax; leaves `handle` at the data set."""
    try:
        pydicom.filereader.read_preamble(handle, force=True)
        meta = pydicom.filereader.read_dataset(
            handle, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta
        )
        return str(meta.get("TransferSyntaxUID", "")).strip() == _DEFLATED
    except Exception:  # a probe only: an unparsable meta is for dcmread to report, named
        return False


def _past_file_meta(tag: Any, vr: Any, length: int) -> bool:
    return bool(tag.group != 0x0002)


def _check_encapsulated_frame(path: Path, ds: pydicom.Dataset, max_pixels: int) -> None:
    """Refuse an encapsulated first frame whose own header is over `max_pixels` or disagrees
    with Rows, Columns or Samples per Pixel, before its decoder allocates anything."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if syntax in _JPEG_FAMILY:
        kind, parse = "JPEG", _jpeg_frame_size
    elif syntax in _J2K_FAMILY:
        kind, parse = "JPEG 2000", _j2k_frame_size
    elif syntax == _RLE:
        _check_rle_frame(path, _first_frame(path, ds), int(ds.Rows) * int(ds.Columns))
        return
    else:
        return  # native and deflated pixels are sized by the header
    size = parse(_first_frame(path, ds))
    if size is None:
        raise CorruptImageError(
            path, f"pixel data cannot be decoded (first frame has no valid {kind} header)"
        )
    width, height, samples = size
    _check_size(path, width, height, max_pixels, what=f"{kind} frame")
    rows, columns = int(ds.Rows), int(ds.Columns)
    if (width, height) != (columns, rows):
        raise CorruptImageError(
            path,
            f"{kind} frame is {width}x{height} but the header says {columns}x{rows} "
            "(Columns x Rows)",
        )
    declared = int(ds.get("SamplesPerPixel") or 1)
    if samples != declared:
        raise CorruptImageError(
            path,
            f"{kind} frame has {samples} samples per pixel but the header says {declared}",
        )


def _first_frame(path: Path, ds: pydicom.Dataset) -> bytes:
    """The first frame's compressed bytes, found as pydicom's decoders find them."""
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        return pydicom.encaps.get_frame(
            ds.PixelData,
            0,
            number_of_frames=int(ds.get("NumberOfFrames") or 1),
            extended_offsets=offsets,
        )
    except (ValueError, KeyError, IndexError, EOFError, OSError, TypeError, struct.error) as exc:
        raise CorruptImageError(
            path, f"pixel data cannot be decoded (encapsulated frames are malformed: {exc})"
        ) from exc


def _check_rle_frame(path: Path, frame: bytes, pixels: int) -> None:
    """Refuse an RLE frame any of whose segments decodes to far more than Rows x Columns bytes.

    pydicom's RLE decoder sizes nothing from the header: it decodes each segment in full (one
    2-byte run gives 128 bytes) and then only warns about the excess, so a 3 MB frame could
    take 190 MB. Each segment's decoded length is counted here, stopping once over the limit.
    """
    if len(frame) < _RLE_HEADER_BYTES:
        raise CorruptImageError(path, "pixel data cannot be decoded (RLE header is incomplete)")
    count, *offsets = struct.unpack("<16I", frame[:_RLE_HEADER_BYTES])
    if not 1 <= count <= 15:
        raise CorruptImageError(
            path, f"pixel data cannot be decoded (RLE header gives {count} segments)"
        )
    limit = 2 * pixels + _RLE_SLACK_BYTES  # a segment holds one byte per pixel, plus padding
    ends = [*offsets[:count], len(frame)]
    for index in range(count):
        start, end = ends[index], min(ends[index + 1], len(frame))
        if _rle_decoded_length(frame, start, end, limit) > limit:
            raise CorruptImageError(
                path,
                f"RLE segment {index + 1} decodes to more than {limit:,} bytes but the header "
                f"says {pixels:,} pixels (possible decompression bomb)",
            )


def _rle_decoded_length(data: bytes, start: int, end: int, limit: int) -> int:
    """Bytes the PackBits runs in data[start:end] decode to, counted up to just past `limit`."""
    total, pos = 0, start
    while pos < end and total <= limit:
        n = data[pos]
        if n < 128:  # a literal run of n + 1 bytes
            total += n + 1
            pos += n + 2
        elif n > 128:  # the next byte repeated 257 - n times
            total += 257 - n
            pos += 2
        else:  # 128: no operation
            pos += 1
    return total


@dataclass(frozen=True)
class JpegFrame:
    """A JPEG (or JPEG-LS) stream's first frame header: its SOF marker (0xC0 baseline, 0xC1
    extended Huffman, 0xC2 progressive, 0xF7 JPEG-LS...), sample precision in bits, size and
    number of components."""

    marker: int
    precision: int
    width: int
    height: int
    components: int


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The first frame header of a JPEG or JPEG-LS stream; None when there is none before the
    scan data (or the bytes are not a JPEG).

    Parsed here rather than with Pillow: Pillow does not know JPEG-LS (SOF55) and would give
    no size for it, and a decoder sizes its output from this header.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            return None  # scan data before any frame header
        if marker in _JPEG_SIZE_MARKERS:
            if pos + 10 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return JpegFrame(marker, data[pos + 4], width, height, data[pos + 9])
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def check_jpeg_frame(
    data: bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> JpegFrame:
    """A JPEG's first frame header, refused as :func:`read_image` refuses an image before any
    pixel is decoded: for a decoder that is not Pillow (the device JPEG path,
    :mod:`cxrlabel.data.jpegdevice`), which sizes its output from this header.

    Raises:
        CorruptImageError: no frame header before the scan data.
        ImageTooLargeError: width x height over `max_pixels` (a possible decompression bomb).
    """
    path = Path(name or BYTES_NAME)
    frame = jpeg_frame(data)
    if frame is None:
        raise CorruptImageError(path, "pixel data cannot be decoded (no valid JPEG frame header)")
    _check_size(path, frame.width, frame.height, max_pixels, what="JPEG frame")
    return frame


def _jpeg_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG or JPEG-LS stream's first frame header."""
    frame = jpeg_frame(data)
    return None if frame is None else (frame.width, frame.height, frame.components)


def _j2k_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG 2000 codestream's SIZ marker segment.

    For a JP2 file this reads the codestream in its ``jp2c`` box, which is what decoders
    decode, not the ``ihdr`` box (which Pillow reports and which can say anything).
    """
    codestream = _jp2_codestream(data) if data.startswith(_JP2_SIGNATURE) else data
    if codestream is None or len(codestream) < 42 or not codestream.startswith(_J2K_SOC_SIZ):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", codestream[8:24])
    (components,) = struct.unpack(">H", codestream[40:42])
    return xsiz - xosiz, ysiz - yosiz, components


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contents of a JP2 file's first ``jp2c`` (contiguous codestream) box."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if length == 1:  # a 64-bit length follows the type
            if pos + 16 > len(data):
                return None
            (length,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
            header = 16
        elif length == 0:  # the box runs to the end of the file
            length = len(data) - pos
        if length < header:
            return None
        if kind == b"jp2c":
            return data[pos + header : pos + length]
        pos += length
    return None


def _check_dicom_pixels_present(src: _Source, ds: pydicom.Dataset) -> None:
    path = src.name
    if "PixelData" in ds:
        if "Rows" not in ds or "Columns" not in ds:
            raise CorruptImageError(path, "DICOM has pixel data but no Rows/Columns")
        return
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedDicomError(path, "float pixel data has no defined display range")
    if _PIXEL_DATA_TAG_LE in src.read():
        # The Pixel Data tag is in the file but pydicom could not read the element (it drops
        # an element, sometimes the whole dataset, when the file ends inside it).
        raise TruncatedImageError(path, "DICOM pixel data element is incomplete (file cut short)")
    raise NoPixelDataError(path, "DICOM file has no pixel data (7FE0,0010)")


def _check_decoder(path: Path, ds: pydicom.Dataset) -> None:
    """Fail with an actionable message when the transfer syntax cannot be decoded here."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        return  # pydicom guesses (implicit VR little endian); uncompressed needs no plugin
    name = getattr(syntax, "name", str(syntax))
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as exc:
        raise UnsupportedDicomError(
            path,
            f"no pydicom decoder exists for transfer syntax {name} ({syntax}); convert the "
            "file to an uncompressed or JPEG/JPEG 2000 syntax (e.g. with dcmtk or gdcm)",
        ) from exc
    if decoder.is_available:
        return
    package = _DECODER_PACKAGES.get(str(syntax), "a pydicom pixel-data plugin")
    missing = "; ".join(f"{k}: {v}" for k, v in decoder.missing_dependencies.items())
    raise UnsupportedDicomError(
        path,
        f"decoding transfer syntax {name} ({syntax}) needs {package}"
        + (f" [pydicom plugins report: {missing}]" if missing else ""),
    )


def _dicom_monochrome_to_unit(path: Path, arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT, then VOI, then scale by the declared output range of the last stage."""
    values = pydicom.pixels.apply_modality_lut(arr, ds)
    low, high = _modality_output_range(ds)
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut:
        values = _apply_lut_item(values, voi_lut[0], ds)
        low, high = 0.0, float(2 ** _lut_bits(voi_lut[0]) - 1)
        high = max(high, float(np.max(values)))  # descriptor understating the LUT's bits
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            values = pydicom.pixels.apply_windowing(values, ds, index=0)
        except (ValueError, TypeError) as exc:
            logger.warning("%s: ignoring invalid VOI window (%s)", path, exc)
    if high <= low:
        raise CorruptImageError(path, f"DICOM gives an empty value range [{low}, {high}]")
    scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    return _unit_range(scaled.astype(np.float32))


def _apply_lut_item(values: np.ndarray, item: pydicom.Dataset, ds: pydicom.Dataset) -> np.ndarray:
    """Apply one LUT item (LUTDescriptor + LUTData) to ``values``.

    Our own lookup rather than ``pydicom.pixels.apply_voi``: pydicom 3.0 indexes an 8-bit LUT
    with uint8 indices, so every input value above 255 wraps around (a 4096-entry LUT with
    8-bit output maps 256 to entry 0).
    """
    entries, first_mapped = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):  # VR OW: 16-bit words (8-bit entries if one byte each)
        little = str(ds.file_meta.get("TransferSyntaxUID", "")) != _EXPLICIT_VR_BIG_ENDIAN
        width = 1 if len(raw) == entries else 2
        dtype = np.dtype("u1") if width == 1 else np.dtype("<u2" if little else ">u2")
        lut = np.frombuffer(raw, dtype=dtype, count=entries)
    else:
        lut = np.asarray(raw if isinstance(raw, list | tuple) else [raw])
    lut = lut.astype(np.float64)
    index = np.rint(np.asarray(values, dtype=np.float64)) - first_mapped
    return lut[np.clip(index, 0, len(lut) - 1).astype(np.intp)]


def _stored_range(ds: pydicom.Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation") or 0) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _modality_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The value range after the Modality LUT stage (the same rule pydicom's windowing uses)."""
    modality_lut = ds.get("ModalityLUTSequence")
    if modality_lut:
        return 0.0, float(2 ** _lut_bits(modality_lut[0]) - 1)
    low, high = _stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        ends = sorted(
            (low * float(slope) + float(intercept), high * float(slope) + float(intercept))
        )
        low, high = ends[0], ends[1]
    return low, high


def _lut_bits(item: pydicom.Dataset) -> int:
    descriptor = item.LUTDescriptor
    bits = int(descriptor[2])
    return bits if 1 <= bits <= 16 else 16


def _unit_range(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place and return a C-contiguous float32 array."""
    out = np.ascontiguousarray(values, dtype=np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out
