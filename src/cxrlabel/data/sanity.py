"""Input sanity checks: cheap signs that a film is not one a chest model should be trusted on.

A model labels whatever it is given: a 1x1 image, a photograph, a tibia. These checks never
refuse or drop an input; they return *flags*, stable codes that the batch labeller writes to
``images.csv`` (and, with ``--skip-flagged``, reports in ``errors.csv`` instead of labelling),
and that the service returns in its JSON and shows on its page.

Flag codes, in this order (thresholds are the :class:`SanityLimits` defaults):

* ``small``: the smallest side is under ``min_side`` = 128 px. Chest findings (a pneumothorax
  line, a nodule, a tube tip) are a few mm; below 128 px a 35-43 cm film has pixels of about
  3 mm. Downscaled copies that people do train on stay above it (CheXpert-small: 320 px and
  more; the shared Kermany copy, 320 px on its long side: 10 of 5,216 films under 128).
* ``aspect``: the long side is more than ``max_aspect`` = 2.0 times the short one. Chest
  cassettes and detectors are 1:1 to 1.25:1 (14x17 in); long-bone and full-leg films, dental
  panoramas and crops to a strip of lung are wider (0.7% of the shared Kermany copy, all
  tightly cropped).
* ``colour``: the file holds real colour, a mean channel spread (:attr:`ImageInfo.chroma`)
  over ``max_chroma`` = 0.02 of full scale (about 5 of 255 levels). Radiographs are grey; grey
  content stored as RGB/RGBA (NIH's PNGs) measures about 0, while a photograph, a screenshot or
  a heavily coloured overlay does not. The reader converts colour to grey, so without this flag
  nobody would know colour was there.
* ``constant``: nearly constant pixels: standard deviation under ``min_std`` = 0.01 (on the
  [0, 1] scale), or fewer than ``min_levels`` = 8 distinct grey levels of 256 (blank, binary or
  posterised images; a real film has hundreds of levels and a standard deviation near 0.2).
* ``modality:<M>``: a DICOM Modality other than ``modalities`` = CR, DX, RG (computed,
  digital and conventional radiography), e.g. ``modality:MR`` or ``modality:OT``.
* ``body_part:<B>``: a DICOM BodyPartExamined that names no chest: none of ``chest_parts`` =
  CHEST, THORA(X/CIC), TORAX, TORACE, LUNG appears in it (case and accents ignored), e.g.
  ``body_part:EXTREMITY``.

DICOM tags that are absent or empty raise no flag ("where present"). Values in a flag are
upper-cased and reduced to ``A-Z``, ``0-9`` and ``_`` (at most 32 characters), so a flag never
holds the ``;`` that joins them. What the checks cannot see: a non-chest film with no DICOM tags
that is of normal size, shape and contrast (a square tibia PNG) is not flagged.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cxrlabel.data.images import ImageInfo, sample_step

SMALL = "small"
ASPECT = "aspect"
COLOUR = "colour"
CONSTANT = "constant"
MODALITY = "modality"
BODY_PART = "body_part"
FLAG_SEPARATOR = ";"
_MAX_VALUE_CHARS = 32
# std and levels are measured on a strided sample of at most about this many pixels.
SAMPLE_PIXELS = 1 << 20


@dataclass(frozen=True)
class SanityLimits:
    """The checks' thresholds (see the module docstring for why each default)."""

    min_side: int = 128
    max_aspect: float = 2.0
    max_chroma: float = 0.02
    min_std: float = 0.01
    min_levels: int = 8
    modalities: frozenset[str] = frozenset({"CR", "DX", "RG"})
    chest_parts: tuple[str, ...] = ("CHEST", "THORA", "TORAX", "TORACE", "LUNG")


DEFAULT_LIMITS = SanityLimits()


@dataclass(frozen=True)
class PixelStats:
    """What the ``constant`` check measures on a film's strided sample (:func:`pixel_stats`):
    the standard deviation on the [0, 1] scale and how many of 256 grey levels occur."""

    std: float
    levels: int


def sanity_flags(
    image: np.ndarray, info: ImageInfo, limits: SanityLimits = DEFAULT_LIMITS
) -> tuple[str, ...]:
    """The flags for one film: `image` as :func:`~cxrlabel.data.images.read_image` returns it
    (float32 (H, W) in [0, 1]) and the `info` read with it; empty when nothing is wrong."""
    height, width = image.shape[:2]
    return flags_from_stats(height, width, info, pixel_stats(image), limits)


def flags_from_stats(
    height: int,
    width: int,
    info: ImageInfo,
    stats: PixelStats,
    limits: SanityLimits = DEFAULT_LIMITS,
) -> tuple[str, ...]:
    """:func:`sanity_flags` from the film's size and its :class:`PixelStats` rather than its
    pixels (the device JPEG path measures them where the film was decoded)."""
    flags: list[str] = []
    short, long = min(height, width), max(height, width)
    if short < limits.min_side:
        flags.append(SMALL)
    if short > 0 and long / short > limits.max_aspect:
        flags.append(ASPECT)
    if info.chroma > limits.max_chroma:
        flags.append(COLOUR)
    if stats.std < limits.min_std or stats.levels < limits.min_levels:
        flags.append(CONSTANT)
    modality = _tag_value(info.modality)
    if modality and modality not in limits.modalities:
        flags.append(f"{MODALITY}:{modality}")
    body_part = _tag_value(info.body_part)
    if body_part and not any(part in body_part for part in limits.chest_parts):
        flags.append(f"{BODY_PART}:{body_part}")
    return tuple(flags)


def join_flags(flags: Iterable[str]) -> str:
    """Flags as one CSV cell: ``small;constant`` (empty for none)."""
    return FLAG_SEPARATOR.join(flags)


def describe_flags(flags: Iterable[str], limits: SanityLimits = DEFAULT_LIMITS) -> str:
    """The flags in words, e.g. for errors.csv: ``small (smallest side under 128 px); ...``."""
    words = {
        SMALL: f"smallest side under {limits.min_side} px",
        ASPECT: f"sides more than {limits.max_aspect:g}:1",
        COLOUR: "real colour content, not a grey radiograph",
        CONSTANT: "nearly constant pixels",
        MODALITY: f"DICOM Modality not {'/'.join(sorted(limits.modalities))}",
        BODY_PART: "DICOM BodyPartExamined is not the chest",
    }
    return "; ".join(f"{flag} ({words[flag.split(':', 1)[0]]})" for flag in flags)


def pixel_stats(image: np.ndarray) -> PixelStats:
    """The ``constant`` check's measures on a strided sample of at most about
    :data:`SAMPLE_PIXELS` pixels of a float (H, W) film in [0, 1] (an empty film: 0 and 0)."""
    height, width = image.shape[:2]
    step = sample_step(height, width, SAMPLE_PIXELS)
    sample = np.asarray(image[::step, ::step], dtype=np.float32)
    if sample.size == 0:
        return PixelStats(0.0, 0)
    levels = np.bincount(np.clip(np.rint(sample * 255), 0, 255).astype(np.uint8).ravel())
    return PixelStats(float(sample.std()), int(np.count_nonzero(levels)))


def _tag_value(value: str | None) -> str:
    """A DICOM tag's text as it appears in a flag: upper case, ASCII letters/digits/_ only."""
    if not value:
        return ""
    ascii_text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Z0-9]+", "_", ascii_text.upper()).strip("_")
    return cleaned[:_MAX_VALUE_CHARS]
