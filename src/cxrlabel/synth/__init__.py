"""Built-in synthetic chest radiographs in CheXpert layout.

The generator has two separate halves so that each can be tested on its own:

* **Labels** (no pixels): :func:`sample_labels` draws the *true* findings of a study as
  ``{observation: severity}`` from a small latent-factor model (an "acuity" factor for ICU-type
  patients, a "cardiac" factor and an "infection" factor), so findings co-occur the way they do in
  CheXpert (devices with effusion and oedema, pneumonia with consolidation, ...).
  :func:`report_labels` turns the truth into what a report-mining labeller would write:
  uncertain (-1) for subtle findings, a little label noise and blank cells in train; the exact
  truth with 0/1 only in valid (CheXpert's radiologist-labelled validation set).
* **Pixels**: :func:`generate_image` draws a film for given findings. Every finding has a
  visible mechanism with a severity (bigger heart, fluid level with meniscus, pleural line without
  vessels beyond it, ...), so a CNN can learn it and tests can measure it.

:func:`write_dataset` ties both together and writes ``train.csv``/``valid.csv`` plus JPEGs;
:func:`contact_sheet` shows a grid of captioned examples for people.

All randomness comes from ``numpy.random.SeedSequence`` keyed by ``(seed, kind, patient, study,
view)``, so every image and label is a pure function of those numbers: the output does not depend on
the order in which patients are rendered or on parallelism.

Drawing is vectorised numpy: anatomy is written as 1-D profiles of the patient coordinates X and
Y that broadcast into 2-D row strips; attenuation is accumulated in "thickness" units and mapped
to grey levels with an exponential film curve. Thin structures (vessels, tubes, wires) are drawn
with Pillow's ImageDraw; Pillow also tilts, blurs and JPEG-encodes the film.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cxrlabel.data.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN
from cxrlabel.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONFIG",
    "FINDINGS",
    "META_COLUMNS",
    "PARENCHYMAL",
    "Anatomy",
    "FindingSpec",
    "StudyPlan",
    "SynthConfig",
    "SynthSummary",
    "caption_height",
    "caption_text",
    "contact_sheet",
    "csv_columns",
    "generate_image",
    "image_rng",
    "plan_dataset",
    "render_study",
    "report_labels",
    "sample_anatomy",
    "sample_labels",
    "write_dataset",
]

NO_FINDING = "No Finding"
LUNG_OPACITY = "Lung Opacity"
# Observations that are drawn (everything except the derived "No Finding").
FINDINGS: tuple[str, ...] = tuple(o for o in OBSERVATIONS if o != NO_FINDING)
# Parenchymal opacities that make "Lung Opacity" positive (CheXpert's label hierarchy).
PARENCHYMAL: tuple[str, ...] = (
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Lung Lesion",
)
META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
VIEWS: tuple[str, ...] = ("frontal", "lateral")


def csv_columns() -> tuple[str, ...]:
    """Columns of train.csv/valid.csv, exactly as in CheXpert."""
    return META_COLUMNS + OBSERVATIONS


# --------------------------------------------------------------------------------------------
# Configuration: every knob of the generator lives here.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FindingSpec:
    """How one finding is sampled.

    prevalence: marginal probability that a study truly has the finding.
    loadings: weights on the shared latent factors (acuity, cardiac, infection). A Gaussian
        liability model keeps the marginal exactly at ``prevalence`` while the loadings create
        CheXpert-like co-occurrence (the sum of squares must stay below 1).
    uncertain_when_absent: train-only chance that an absent finding is reported uncertain
        ("cannot exclude pneumonia").
    """

    prevalence: float
    loadings: tuple[float, float, float] = (0.0, 0.0, 0.0)
    uncertain_when_absent: float = 0.0


# Prevalences are set near CheXpert train (positives; uncertain ones come on top from subtle cases).
# "Lung Opacity" here is only the *nonspecific* opacity; the label is also positive whenever one of
# PARENCHYMAL is, which brings it to roughly 45 %.
_FINDING_SPECS: dict[str, FindingSpec] = {
    # name: FindingSpec(prevalence, (acuity, cardiac, infection) loadings, uncertain if absent)
    "Enlarged Cardiomediastinum": FindingSpec(0.07, (0.15, 0.5, 0.0), 0.03),
    "Cardiomegaly": FindingSpec(0.14, (0.15, 0.6, 0.0), 0.02),
    "Lung Opacity": FindingSpec(0.08, (0.3, 0.0, 0.3), 0.0),
    "Lung Lesion": FindingSpec(0.04, (0.0, 0.0, 0.0), 0.01),
    "Edema": FindingSpec(0.25, (0.35, 0.5, 0.0), 0.02),
    "Consolidation": FindingSpec(0.08, (0.3, 0.0, 0.7), 0.03),
    "Pneumonia": FindingSpec(0.05, (0.2, 0.0, 0.8), 0.06),
    "Atelectasis": FindingSpec(0.16, (0.35, 0.0, 0.2), 0.05),
    "Pneumothorax": FindingSpec(0.09, (0.35, 0.0, 0.0), 0.01),
    "Pleural Effusion": FindingSpec(0.40, (0.45, 0.35, 0.1), 0.02),
    "Pleural Other": FindingSpec(0.02, (0.0, 0.0, 0.0), 0.01),
    "Fracture": FindingSpec(0.04, (0.2, 0.0, 0.0), 0.01),
    "Support Devices": FindingSpec(0.52, (0.6, 0.0, 0.0), 0.0),
}


@dataclass(frozen=True)
class SynthConfig:
    """All knobs of the synthetic generator (label model, reporting noise, dataset layout).

    Attributes:
        findings: per-finding sampling spec (see :class:`FindingSpec`), keyed by observation.
        severity_beta: Beta(a, b) distribution of a present finding's severity in (0, 1].
        subtle_below: severities below this count as subtle ...
        uncertain_if_subtle: ... and are reported uncertain (-1) in train with this probability.
        miss_rate: train-only chance that a present finding is not reported (label noise).
        false_positive_rate: train-only chance that an absent finding is reported positive.
        blank_negative_rate: train-only chance that a negative is left blank (not mentioned),
            as most negatives are in CheXpert train.
        valid_fraction: share of patients in the validation split (at least 1 when patients >= 2).
        lateral_rate: chance that a study also has a lateral view.
        extra_study_rate: chance of one more study for a train patient (geometric count) ...
        max_studies: ... capped here.
        persistence: chance that a finding's state carries over to the patient's next study.
        ap_rate_devices / ap_rate_no_devices: chance of an AP (portable) frontal film; ICU
            patients with devices are nearly always AP, as in CheXpert.
        male_rate, age_mean, age_sd, age_range: demographics.
        jpeg_quality: quality of the written JPEGs.
    """

    findings: Mapping[str, FindingSpec] = field(default_factory=lambda: dict(_FINDING_SPECS))
    severity_beta: tuple[float, float] = (1.3, 1.5)
    subtle_below: float = 0.3
    uncertain_if_subtle: float = 0.6
    miss_rate: float = 0.03
    false_positive_rate: float = 0.004
    blank_negative_rate: float = 0.75
    valid_fraction: float = 0.12
    lateral_rate: float = 0.2
    extra_study_rate: float = 0.45
    max_studies: int = 5
    persistence: float = 0.6
    ap_rate_devices: float = 0.95
    ap_rate_no_devices: float = 0.6
    male_rate: float = 0.58
    age_mean: float = 61.0
    age_sd: float = 17.0
    age_range: tuple[int, int] = (18, 90)
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        unknown = set(self.findings) - set(FINDINGS)
        if unknown:
            raise ValueError(f"unknown findings in config: {sorted(unknown)}")
        for name, spec in self.findings.items():
            if not 0.0 < spec.prevalence < 1.0:
                raise ValueError(f"prevalence of {name!r} must be in (0, 1)")
            if sum(w * w for w in spec.loadings) >= 1.0:
                raise ValueError(f"loadings of {name!r} must have a sum of squares below 1")
        rates = (self.miss_rate, self.false_positive_rate, self.blank_negative_rate,
                 self.uncertain_if_subtle, self.valid_fraction, self.lateral_rate,
                 self.extra_study_rate, self.persistence)  # fmt: skip
        if not all(0.0 <= r <= 1.0 for r in rates):
            raise ValueError("rates and fractions in SynthConfig must be in [0, 1]")


DEFAULT_CONFIG = SynthConfig()

# Keys of the seed tree: SeedSequence(seed, spawn_key=(kind, patient[, study, view])).
_KIND_PATIENT, _KIND_ANATOMY, _KIND_IMAGE = 0, 1, 2


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def image_rng(seed: int, patient: int, study: int, view: str) -> np.random.Generator:
    """The generator for one image; a pure function of its identity, not of rendering order."""
    return _rng(seed, _KIND_IMAGE, patient, study, VIEWS.index(view))


# --------------------------------------------------------------------------------------------
# Labels (no pixels)
# --------------------------------------------------------------------------------------------

_N_LATENT = 3


@lru_cache(maxsize=16)
def _thresholds(prevalences: tuple[float, ...]) -> np.ndarray:
    # Liability threshold so that P(liability > t) == prevalence for a standard normal liability.
    return np.array([NormalDist().inv_cdf(1.0 - p) for p in prevalences])


def sample_labels(
    rng: np.random.Generator, config: SynthConfig = DEFAULT_CONFIG
) -> dict[str, float]:
    """Sample the true findings of one study: ``{observation: severity in (0, 1]}``.

    Only present findings are keys. "Lung Opacity" is added with the largest severity of the
    parenchymal findings when one is present, so the dict always satisfies CheXpert's hierarchy;
    "No Finding" is never a key (it is derived when labels are reported).
    """
    names = tuple(config.findings)
    specs = [config.findings[n] for n in names]
    loadings = np.array([s.loadings for s in specs], dtype=np.float64)
    resid = np.sqrt(np.clip(1.0 - (loadings**2).sum(axis=1), 0.0, None))
    latent = rng.standard_normal(_N_LATENT)
    own = rng.standard_normal(len(names))
    liability = loadings @ latent + resid * own
    present = liability > _thresholds(tuple(s.prevalence for s in specs))
    a, b = config.severity_beta
    severity = np.maximum(rng.beta(a, b, size=len(names)), 0.05)
    findings = {
        n: float(round(s, 4)) for n, p, s in zip(names, present, severity, strict=True) if p
    }
    return _complete_hierarchy(findings)


def _complete_hierarchy(findings: dict[str, float]) -> dict[str, float]:
    parenchymal = [findings[n] for n in PARENCHYMAL if n in findings]
    if parenchymal:
        findings[LUNG_OPACITY] = max([*parenchymal, findings.get(LUNG_OPACITY, 0.0)])
    return {n: findings[n] for n in FINDINGS if n in findings}


def _sample_study_sequence(
    rng: np.random.Generator, n_studies: int, config: SynthConfig
) -> list[dict[str, float]]:
    """Findings for a patient's consecutive studies; states persist between studies."""
    studies = [sample_labels(rng, config)]
    for _ in range(n_studies - 1):
        fresh = sample_labels(rng, config)
        keep = rng.random(len(FINDINGS)) < config.persistence
        prev = studies[-1]
        nxt: dict[str, float] = {}
        for name, k in zip(FINDINGS, keep, strict=True):
            source = prev if k else fresh
            if name in source and name != LUNG_OPACITY:
                nxt[name] = source[name]
        own = prev if keep[FINDINGS.index(LUNG_OPACITY)] else fresh
        if LUNG_OPACITY in own and not any(n in own for n in PARENCHYMAL):
            nxt[LUNG_OPACITY] = own[LUNG_OPACITY]
        studies.append(_complete_hierarchy(nxt))
    return studies


def report_labels(
    findings: Mapping[str, float],
    rng: np.random.Generator,
    split: str = "train",
    config: SynthConfig = DEFAULT_CONFIG,
) -> dict[str, float]:
    """CSV label values for a study's true findings: 1.0, 0.0, -1.0 or NaN (blank).

    ``valid`` reports the truth with 0/1 only. ``train`` mimics report mining: subtle findings
    become uncertain, a few labels are missed or invented, most negatives are blank. "Lung Opacity"
    and "No Finding" are derived from the *reported* labels so the CSV is always self-consistent
    (No Finding is 1.0 iff no observation but Support Devices is 1.0 or -1.0, as CheXpert's
    labeller does; blank/0.0 otherwise).
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    # Nonspecific opacity only counts on its own when no parenchymal finding explains it.
    own_opacity = LUNG_OPACITY in findings and not any(n in findings for n in PARENCHYMAL)
    u = rng.random((len(FINDINGS), 3))  # fixed consumption per finding keeps streams aligned
    raw: dict[str, float] = {}
    for i, name in enumerate(FINDINGS):
        present = own_opacity if name == LUNG_OPACITY else name in findings
        if split == "valid":
            raw[name] = POSITIVE if present else NEGATIVE
            continue
        raw[name] = _report_one(name, present, findings.get(name, 0.0), u[i], config)
    labels = dict(raw)
    # Hierarchy: any reported parenchymal opacity makes "Lung Opacity" positive. Uncertainty does
    # not propagate upward ("cannot exclude pneumonia" is not an uncertain opacity).
    if any(raw[n] == POSITIVE for n in PARENCHYMAL):
        labels[LUNG_OPACITY] = POSITIVE
    # CheXpert's labeller: No Finding only when no pathology is positive or uncertain; support
    # devices are not a pathology.
    abnormal = any(labels[n] in (POSITIVE, UNCERTAIN) for n in FINDINGS if n != "Support Devices")
    blank_or_zero = NEGATIVE if split == "valid" else math.nan
    labels[NO_FINDING] = blank_or_zero if abnormal else POSITIVE
    return {n: labels[n] for n in OBSERVATIONS}


def _report_one(
    name: str, present: bool, severity: float, u: np.ndarray, config: SynthConfig
) -> float:
    if present:
        if u[0] < config.miss_rate:
            value = NEGATIVE
        elif severity < config.subtle_below and u[1] < config.uncertain_if_subtle:
            value = UNCERTAIN
        else:
            value = POSITIVE
    else:
        spec = config.findings.get(name)
        unc = spec.uncertain_when_absent if spec is not None else 0.0
        if u[0] < config.false_positive_rate:
            value = POSITIVE
        elif u[1] < unc:
            value = UNCERTAIN
        else:
            value = NEGATIVE
    if value == NEGATIVE and u[2] < config.blank_negative_rate:
        return math.nan
    return value


# --------------------------------------------------------------------------------------------
# Patient anatomy and acquisition
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Patient-level body habitus; shared by all films of a patient.

    Lengths are in "thorax units": 1.0 is the half-width of the rib cage.
    """

    sex: str
    age: int
    thorax: float  # rib-cage half-width as a fraction of the image width
    aspect: float  # vertical / horizontal scale of the chest
    ctr: float  # normal cardiothoracic ratio (always < 0.5)
    dome: float  # right hemidiaphragm dome height (larger = lower)
    dome_left: float  # extra drop of the left dome
    mediastinum: float  # half-width of the upper mediastinum
    rib_spacing: float
    soft_tissue: float  # body wall beyond the ribs
    breast: float  # breast shadow strength (0 for men)
    lung_air: float  # how much darker aerated lung is than soft tissue


def sample_anatomy(
    rng: np.random.Generator,
    sex: str | None = None,
    age: int | None = None,
    config: SynthConfig = DEFAULT_CONFIG,
) -> Anatomy:
    """Draw a patient's habitus (sex and age are drawn too unless given)."""
    male_u, age_z = rng.random(), rng.normal()  # always drawn, so the stream does not shift
    if sex is None:
        sex = "Male" if male_u < config.male_rate else "Female"
    if age is None:
        lo, hi = config.age_range
        age = int(np.clip(round(config.age_mean + config.age_sd * age_z), lo, hi))
    male = sex == "Male"
    return Anatomy(
        sex=sex,
        age=age,
        thorax=float(rng.uniform(0.36, 0.41) if male else rng.uniform(0.34, 0.39)),
        aspect=float(rng.uniform(0.98, 1.12)),
        ctr=float(rng.uniform(0.38, 0.46)),
        dome=float(rng.uniform(0.50, 0.62)),
        dome_left=float(rng.uniform(0.02, 0.08)),
        mediastinum=float(rng.uniform(0.13, 0.16)),
        rib_spacing=float(rng.uniform(0.17, 0.2)),
        soft_tissue=float(rng.uniform(0.06, 0.16)),
        breast=0.0 if male else float(rng.uniform(0.4, 1.0)),
        lung_air=float(rng.uniform(0.42, 0.48)),
    )


_MAX_TILT_DEG = 3.5  # patient tilt on the detector, either way


@dataclass(frozen=True)
class _Acquisition:
    """Per-film technique: position, tilt, exposure, noise."""

    ap: bool
    dx: float  # chest centre offset, fraction of the image
    dy: float
    tilt: float  # radians
    zoom: float
    exposure: float  # film-curve gain: larger = whiter (less penetrated)
    contrast: float
    brightness: float
    noise: float
    blur: float  # unsharpness radius in pixels at 320 px
    arms: bool  # arms by the sides, in the field (mostly portable AP films)
    arm_gap: float


def _sample_acquisition(rng: np.random.Generator, ap: bool) -> _Acquisition:
    return _Acquisition(
        ap=ap,
        dx=float(rng.uniform(-0.035, 0.035)),
        dy=float(rng.uniform(-0.03, 0.03)),
        tilt=float(np.deg2rad(rng.uniform(-_MAX_TILT_DEG, _MAX_TILT_DEG))),
        zoom=float(rng.uniform(0.94, 1.06)),
        exposure=float(rng.uniform(2.2, 2.9)),
        contrast=float(rng.uniform(0.95, 1.15)),
        brightness=float(rng.uniform(-0.05, 0.03)),
        noise=float(rng.uniform(0.008, 0.022)),
        blur=float(rng.uniform(0.5, 0.9)),
        arms=bool(rng.random() < (0.6 if ap else 0.15)),
        arm_gap=float(rng.uniform(0.04, 0.14)),
    )


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------

# Films are drawn upright on a canvas a little larger than the output, with X along columns and Y
# along rows, so most anatomy is a 1-D profile of X or Y and only their combinations are 2-D
# (numpy broadcasting); the patient's tilt is applied once at the end by rotating the 8-bit film.
# The 2-D maths runs on row strips of at most this many pixels: full-frame float32 temporaries
# (~0.5 MB) sit above glibc's mmap threshold, so each one is fresh pages and page faults took a
# large share of the run time; strip-sized temporaries are recycled and stay in cache.
_STRIP_PIXELS = 24_000
F32 = np.float32

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 in canvas pixels
Slices = tuple[slice, slice]
Painter = Callable[["_Strip", "_Layers"], None]


@dataclass(frozen=True)
class _Frame:
    """Patient coordinates on the upright canvas: X right, Y down, 1.0 = rib-cage half-width.

    t and ty are canvas pixels per unit horizontally and vertically; (cx, cy) is the chest
    centre in canvas pixels. ``size`` is the output size and ``canvas`` the (larger) drawing size.
    """

    size: int
    canvas: int
    t: float
    ty: float
    cx: float
    cy: float
    tilt: float  # radians, applied when the film is developed

    @property
    def vs(self) -> float:
        """Vertical units -> horizontal units, for distances."""
        return self.ty / self.t

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.t * x, self.cy + self.ty * y

    def box(self, x: float, y: float, rx: float, ry: float) -> Box | None:
        """Canvas pixel box covering (x +- rx, y +- ry); None when it is off the canvas."""
        px, py = self.to_px(x, y)
        hx, hy = self.t * rx + 2, self.ty * ry + 2
        x0, x1 = max(int(px - hx), 0), min(int(px + hx) + 1, self.canvas)
        y0, y1 = max(int(py - hy), 0), min(int(py + hy) + 1, self.canvas)
        if x0 >= x1 or y0 >= y1:
            return None
        return y0, y1, x0, x1

    def strips(self) -> Iterator[_Strip]:
        pix = np.arange(self.canvas, dtype=F32) + F32(0.5)
        x = ((pix - F32(self.cx)) * F32(1.0 / self.t))[None, :]
        y_all = (pix - F32(self.cy)) * F32(1.0 / self.ty)
        step = max(4, _STRIP_PIXELS // self.canvas)
        for r0 in range(0, self.canvas, step):
            r1 = min(r0 + step, self.canvas)
            yield _Strip(self, r0, r1, x, y_all[r0:r1, None])


@dataclass
class _Strip:
    """Canvas rows r0:r1: X is a (1, W) row vector, Y an (h, 1) column vector."""

    fr: _Frame
    r0: int
    r1: int
    X: np.ndarray
    Y: np.ndarray

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r1)

    def edge(self, dist: np.ndarray, soft_px: float = 1.2) -> np.ndarray:
        """Anti-aliased mask from a signed distance in horizontal units (>0 inside)."""
        return _unit(dist * (self.fr.t / soft_px) + 0.5)

    def window(self, box: Box | None) -> tuple[Slices, Slices] | None:
        """The part of a canvas box inside this strip: (strip slices, box-local slices)."""
        if box is None:
            return None
        y0, y1, x0, x1 = box
        a, b = max(y0, self.r0), min(y1, self.r1)
        if a >= b:
            return None
        return (
            (slice(a - self.r0, b - self.r0), slice(x0, x1)),
            (slice(a - y0, b - y0), slice(0, x1 - x0)),
        )

    def xy(self, sl: Slices) -> tuple[np.ndarray, np.ndarray]:
        """Broadcastable X (1, w) and Y (h, 1) of a window."""
        return self.X[:, sl[1]], self.Y[sl[0]]


@dataclass
class _Layers:
    """Per-strip arrays that finding painters read and accumulate into."""

    lung: np.ndarray  # inside the pleura and above the diaphragm (0..1)
    wall: np.ndarray  # approximate distance to the parietal pleura (units, >0 inside)
    vessels: np.ndarray  # drawn vessel layer (0..1)
    opac: np.ndarray  # fraction of lung air replaced by fluid or tissue (<0: extra air)
    no_marks: np.ndarray  # 1 where no lung is left to show markings (pneumothorax)
    extra: np.ndarray  # attenuation added on top (pleural line, thickening)


# Constant buffers for _unit: numpy's maximum/minimum against a *scalar* take a slow path
# (about 4x slower than against an array of the same shape), so strip-sized clips compare with
# read-only views of these instead.
_ZEROS = np.zeros(2 * _STRIP_PIXELS, dtype=F32)
_ONES = np.ones(2 * _STRIP_PIXELS, dtype=F32)
_ZEROS.flags.writeable = False
_ONES.flags.writeable = False


def _unit(a: np.ndarray) -> np.ndarray:
    """Clip a *fresh temporary* to [0, 1] in place.

    np.clip's Python wrapper costs more than the work on 1-D profiles, and working in place
    saves a strip-sized allocation.
    """
    n = a.size
    if 1024 <= n <= _ZEROS.size and a.dtype == F32 and a.flags.c_contiguous:
        np.maximum(a, _ZEROS[:n].reshape(a.shape), out=a)
        return np.minimum(a, _ONES[:n].reshape(a.shape), out=a)
    np.maximum(a, 0.0, out=a)
    return np.minimum(a, 1.0, out=a)


def _clamp(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip a fresh temporary to [lo, hi] in place."""
    if a.size >= 1024:
        return np.clip(a, lo, hi, out=a)
    np.maximum(a, lo, out=a)
    return np.minimum(a, hi, out=a)


def _ellipse_dist(dx: np.ndarray, dy: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse boundary (>0 inside)."""
    f = np.sqrt((dx * (1.0 / a)) ** 2 + (dy * (1.0 / b)) ** 2)
    return (1.0 - f) * min(a, b)


def _disc(
    st: _Strip, x: float, y: float, r: float, soft_px: float = 1.5
) -> tuple[Slices, np.ndarray] | None:
    """Anti-aliased disc (round in pixels), computed only where it meets the strip."""
    pad = r + soft_px / st.fr.t
    win = st.window(st.fr.box(x, y, pad, pad / st.fr.vs))
    if win is None:
        return None
    sl = win[0]
    wx, wy = st.xy(sl)
    d = r - np.sqrt((wx - x) ** 2 + ((wy - y) * st.fr.vs) ** 2)
    return sl, st.edge(d, soft_px)


def _lowfreq(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field (unit-ish variance) by bicubic upsampling of a coarse normal grid."""
    h, w = shape
    coarse = rng.standard_normal((cells, cells)).astype(F32)
    img = Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=F32)


def _polyline(
    draw: ImageDraw.ImageDraw,
    fr: _Frame,
    pts: Sequence[tuple[float, float]],
    width_units: float,
    fill: int,
) -> None:
    width = max(1, round(width_units * fr.t))
    draw.line([fr.to_px(x, y) for x, y in pts], fill=fill, width=width, joint="curve")


def _bezier(
    p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 12
) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)
    xs = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t**2 * p2[0]
    ys = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t**2 * p2[1]
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _vessel_tree(
    draw: ImageDraw.ImageDraw,
    fr: _Frame,
    rng: np.random.Generator,
    hilum: tuple[float, float],
    side: int,
    angles_deg: Sequence[float],
    levels: int = 4,
) -> None:
    """Branching pulmonary vessels from a hilum, tapering and fading toward the periphery.

    Trunk i leaves the hilum at angles_deg[i] (0 = lateral, 90 = down); each level forks in two.
    This layer is what a pneumothorax removes and what consolidation hides.
    """
    angles = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    angles = angles + rng.normal(0.0, 0.1, angles.size)
    start = rng.uniform(0.0, 0.08, angles.size)  # trunks leave along the hilum, not one point
    x = hilum[0] + np.cos(angles) * start * side
    y = hilum[1] + np.sin(angles) * start + rng.uniform(-0.06, 0.06, angles.size)
    # Gravity: lower-zone vessels are larger in an upright patient.
    length = rng.uniform(0.2, 0.28, angles.size) * (1.0 + 0.25 * np.sin(angles))
    width = 0.034 * (1.0 + 0.3 * np.sin(angles))
    fill = np.full(angles.size, 245.0)
    t, ty = fr.t, fr.ty
    for _level in range(levels):
        ex = x + np.cos(angles) * length * side
        ey = y + np.sin(angles) * length
        px0, py0 = fr.cx + t * x, fr.cy + ty * y
        px1, py1 = fr.cx + t * ex, fr.cy + ty * ey
        widths = np.maximum(1, np.round(width * t)).astype(int).tolist()
        segs = zip(px0.tolist(), py0.tolist(), px1.tolist(), py1.tolist(), strict=True)
        for (a, b, c, d), f, w in zip(segs, fill.astype(int).tolist(), widths, strict=True):
            draw.line([(a, b), (c, d)], fill=f, width=w)
        n = angles.size
        spread = rng.uniform(0.3, 0.6, n)
        x, y = np.repeat(ex, 2), np.repeat(ey, 2)
        angles = np.repeat(angles, 2) + np.stack([-spread, spread], axis=1).ravel()
        angles = angles + rng.normal(0.0, 0.1, 2 * n)
        length = np.repeat(length, 2) * rng.uniform(0.62, 0.82, 2 * n)
        width = np.repeat(width, 2) * 0.68
        fill = np.repeat(fill, 2) * 0.86


def _sub_rngs(
    rng: np.random.Generator, findings: Mapping[str, float]
) -> tuple[np.random.Generator, dict[str, np.random.Generator]]:
    """Texture stream plus one stream per present finding, keyed by the finding's index.

    Adding or removing a finding therefore moves nothing else in the film, which is what lets
    tests (and counterfactual examples) compare a film with and without one finding.
    """
    keys = rng.integers(0, 2**63, size=2)
    tex_rng = np.random.default_rng(int(keys[0]))
    rngs = {
        name: np.random.default_rng(np.random.SeedSequence(int(keys[1]), spawn_key=(i,)))
        for i, name in enumerate(FINDINGS)
        if name in findings
    }
    return tex_rng, rngs


def _pick_side(rng: np.random.Generator, p_right: float = 0.5) -> int:
    """-1 = patient's right (image left), +1 = patient's left (image right)."""
    return -1 if rng.random() < p_right else 1


def _layer_image(fr: _Frame) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (fr.canvas, fr.canvas), 0)
    return img, ImageDraw.Draw(img)


def _marks_layer(fr: _Frame, rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """8-bit "lung markings" layer: faint parenchymal mottle to draw the vessels on.

    Kept as uint8 and converted strip by strip: no full-frame float temporaries.
    """
    coarse = _clamp(rng.normal(40.0, 22.0, (24, 24)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse, mode="L").resize((fr.canvas, fr.canvas), Image.Resampling.BICUBIC)
    return img, ImageDraw.Draw(img)


def _u8(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


def _develop(img8: np.ndarray, fr: _Frame, acq: _Acquisition) -> np.ndarray:
    """Tilt the film about its centre, crop to the output size, add geometric unsharpness.

    Nearest-neighbour resampling is 10x cheaper than bilinear in Pillow; the unsharpness blur
    that follows (always at least half a pixel) hides its staircase on straight edges.
    """
    pil = Image.fromarray(img8, mode="L")
    size, pad = fr.size, (fr.canvas - fr.size) / 2
    c, s = math.cos(fr.tilt), math.sin(fr.tilt)
    h = size / 2
    # Output pixel (u, v) samples the canvas at R(u - h, v - h) + h + pad.
    data = (c, s, h + pad - c * h - s * h, -s, c, h + pad + s * h - c * h)
    pil = pil.transform((size, size), Image.Transform.AFFINE, data, Image.Resampling.NEAREST)
    pil = pil.filter(ImageFilter.BoxBlur(max(acq.blur * size / 320.0, 0.5)))
    return np.asarray(pil, dtype=np.uint8)


def _render(
    fr: _Frame,
    acq: _Acquisition,
    tex_rng: np.random.Generator,
    strip_att: Callable[[_Strip], np.ndarray],
) -> np.ndarray:
    """Run the per-strip attenuation function, apply the film curve and noise, develop."""
    out = np.empty((fr.canvas, fr.canvas), dtype=np.uint8)
    gain = F32(255.0 * acq.contrast)
    # Quantum noise: uniform bytes are the cheapest random numbers; blur makes them Gaussian-ish.
    noise8 = np.frombuffer(tex_rng.bytes(fr.canvas * fr.canvas), dtype=np.uint8)
    noise8 = noise8.reshape(fr.canvas, fr.canvas)
    noise = F32(255.0 * acq.noise * 3.5 / 255.0)
    offset = F32(255.0 * (0.5 + acq.brightness + 0.5 * acq.contrast) + 0.5) - 127.5 * noise
    for st in fr.strips():
        att = strip_att(st)
        # Film curve: transmitted fraction exp(-k * attenuation); white = attenuating.
        grey = np.exp(att * F32(-acq.exposure))
        grey *= -gain
        grey += noise8[st.rows] * noise + offset
        np.clip(grey, 0.0, 255.0, out=grey)
        out[st.rows] = grey
    return _develop(out, fr, acq)


def _make_frame(size: int, anat: Anatomy, acq: _Acquisition) -> _Frame:
    # The canvas is large enough that the tilted output square never samples outside it.
    rad = math.radians(_MAX_TILT_DEG)
    pad = math.ceil(size * 0.5 * (math.cos(rad) + math.sin(rad) - 1.0)) + 1
    canvas = size + 2 * pad
    t = anat.thorax * size * acq.zoom
    return _Frame(
        size=size,
        canvas=canvas,
        t=t,
        ty=t * anat.aspect,
        cx=canvas / 2 + size * acq.dx,
        cy=canvas / 2 + size * (acq.dy - 0.03),
        tilt=acq.tilt,
    )


# --------------------------------------------------------------------------------------------
# Frontal film
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrontalGeometry:
    """Anatomy after findings that move structures (heart size, diaphragm, mediastinum).

    The heart is the union of a right-atrial circle (the right heart border) and a tilted
    left-ventricular ellipse whose lowest-left point is the apex; together they span exactly
    ctr * thoracic width (the rib cage is 2 units wide).
    """

    mid: float  # mediastinal midline
    med_half: float  # upper mediastinal half-width (normal)
    med_widen: float  # extra upper-mediastinal half-width (enlarged cardiomediastinum)
    ctr: float
    dome_r: float
    dome_l: float
    apex: float
    ra: tuple[float, float, float]  # right atrium: centre x, y and radius
    # Left ventricle: centre, quadratic form q = A dx^2 + B dx dy + C dy^2 (< 1 inside), half-box.
    lv: tuple[float, float, float, float, float, float, float, float]

    @property
    def heart_top(self) -> float:
        _, ly, *_, hh = self.lv
        return min(ly - hh, self.ra[1] - self.ra[2])


def _frontal_geometry(
    anat: Anatomy,
    acq: _Acquisition,
    findings: Mapping[str, float],
    atel_side: int,
) -> _FrontalGeometry:
    mid = 0.0
    ctr = anat.ctr
    if "Cardiomegaly" in findings:
        ctr = 0.52 + 0.16 * findings["Cardiomegaly"]
    elif acq.ap:
        ctr *= 1.04  # AP magnification; normal hearts stay below 0.5 (anat.ctr <= 0.46)
    widen = 0.0
    if "Enlarged Cardiomediastinum" in findings:
        widen = anat.mediastinum * (0.45 + 0.9 * findings["Enlarged Cardiomediastinum"])
    dome_r = anat.dome - (0.05 if acq.ap else 0.0)  # AP films: supine, poorer inspiration
    dome_l = dome_r + anat.dome_left
    if atel_side:
        # Volume loss: the hemidiaphragm rises and the mediastinum shifts toward the collapse.
        sev = findings["Atelectasis"]
        lift = 0.05 + 0.15 * sev
        if atel_side < 0:
            dome_r -= lift
        else:
            dome_l -= lift
        mid += atel_side * 0.05 * sev
    vs = anat.aspect
    # Right border ~31 % of the cardiac width right of the midline, the rest to the left.
    x_right, x_left = mid - 0.62 * ctr, mid + 1.38 * ctr
    r_ra = 0.17 + 0.35 * (ctr - 0.43)
    ra = (x_right + r_ra, dome_r + 0.02 - 0.55 * r_ra / vs, r_ra)
    tilt = math.radians(44.0)
    c, s = math.cos(tilt), math.sin(tilt)
    hb = 0.29 + 0.5 * (ctr - 0.43)
    ha = 1.8 * hb
    x_ext = math.sqrt((ha * c) ** 2 + (hb * s) ** 2)
    y_off = (ha * ha - hb * hb) * s * c / x_ext  # the widest point is below the centre
    y_ext = math.sqrt((ha * s) ** 2 + (hb * c) ** 2)
    lv_y = dome_l - 0.04 - y_off / vs
    # u = dx c + dy s, v = dy c - dx s; q = (u/ha)^2 + (v/hb)^2 expanded in dx, dy.
    ia, ib = 1.0 / ha**2, 1.0 / hb**2
    lv = (
        x_left - x_ext,
        lv_y,
        c * c * ia + s * s * ib,
        2 * c * s * (ia - ib),
        s * s * ia + c * c * ib,
        hb,
        x_ext,
        y_ext / vs,
    )
    return _FrontalGeometry(
        mid=mid,
        med_half=anat.mediastinum,
        med_widen=widen,
        ctr=ctr,
        dome_r=dome_r,
        dome_l=dome_l,
        apex=-0.95,
        ra=ra,
        lv=lv,
    )


def _draw_frontal(
    findings: Mapping[str, float],
    anat: Anatomy,
    acq: _Acquisition,
    rng: np.random.Generator,
    size: int,
) -> np.ndarray:
    tex_rng, rngs = _sub_rngs(rng, findings)
    fr = _make_frame(size, anat, acq)
    atel_side = _pick_side(rngs["Atelectasis"], 0.55) if "Atelectasis" in findings else 0
    geo = _frontal_geometry(anat, acq, findings, atel_side)
    painters = _frontal_painters(fr, findings, rngs, geo, atel_side)
    fracture = None
    if "Fracture" in findings:
        fracture = _plan_fracture(rngs["Fracture"], findings["Fracture"])

    mimg, mdraw = _marks_layer(fr, tex_rng)
    for side, hy in ((-1, -0.1), (1, -0.15)):
        angles = (-100, -65, -30, 5, 40, 75, 100)
        _vessel_tree(mdraw, fr, tex_rng, (geo.mid + side * 0.24, hy), side, angles)
    if "Edema" in findings:
        _kerley_lines(mdraw, fr, rngs["Edema"], findings["Edema"], geo)
    marks8 = _u8(mimg)
    devices8 = None
    if "Support Devices" in findings:
        devices8 = _devices(fr, rngs["Support Devices"], findings["Support Devices"], geo)
    # Oedema blurs the vessels into the haze.
    marks_gain = F32(0.11 / 255.0 * (1.0 - 0.45 * findings.get("Edema", 0.0)))

    def strip_att(st: _Strip) -> np.ndarray:
        marks = marks8[st.rows] * marks_gain
        att, lung_eff, lay = _frontal_anatomy(st, anat, acq, geo, fracture, marks, painters)
        air = anat.lung_air * (1.0 - 0.2 * _unit((st.Y + 0.3) * 0.9))
        if lay is None:
            att += lung_eff * (marks - air)
        else:
            for paint in painters:
                paint(st, lay)
            np.clip(lay.opac, -0.3, 1.0, out=lay.opac)
            marks *= 1.0 - lay.no_marks
            att += lung_eff * ((marks - air) * (1.0 - lay.opac)) + lay.extra
        if devices8 is not None:
            att += devices8[st.rows] * F32(1.4 / 255.0)
        return att

    return _render(fr, acq, tex_rng, strip_att)


def _frontal_anatomy(
    st: _Strip,
    anat: Anatomy,
    acq: _Acquisition,
    geo: _FrontalGeometry,
    fracture: tuple[int, int, float, float, float] | None,
    marks: np.ndarray,
    painters: Sequence[Painter],
) -> tuple[np.ndarray, np.ndarray, _Layers | None]:
    """Normal frontal anatomy for one strip: attenuation, visible lung, layers for painters.

    Row vectors (functions of X) and column vectors (functions of Y) are nearly free; every
    operation that combines them costs a pass over the strip. So edges are written as
    clip(col - row) with the anti-aliasing scale folded into both 1-D terms, and structures
    confined to a few rows or columns are only computed in their windows.
    """
    X, Y, vs, t = st.X, st.Y, st.fr.vs, st.fr.t
    y_lo, y_hi = float(Y[0, 0]), float(Y[-1, 0])
    ux = np.abs(X)
    # Body: neck, sloping shoulders, chest wall; soft tissue thicker centrally (AP diameter).
    k = t / 2.5
    shape = (Y.shape[0], X.shape[1])
    top_line = -0.93 - 0.5 * np.exp((0.34 - ux) * (1.0 / 0.22))  # trapezius slope
    inner = (0.34 - ux) * k + 0.5
    density = 0.22 + 0.4 * _unit(1.0 - 0.6 * X * X)
    arms = None
    if acq.arms:
        # Arms by the sides (portable films): soft tissue strips with the humerus, below the
        # shoulders and separated from the chest wall by a dark gap.
        a0 = 1.0 + anat.soft_tissue + acq.arm_gap
        arm = _unit((ux - a0) * k + 0.5)
        humerus = _unit((0.07 - np.abs(ux - a0 - 0.22)) * k + 0.5)
        arms = arm * 0.3 + humerus * 0.12
    if y_lo >= -0.445 and (y_lo - float(top_line.max())) * (vs * k) >= 0.5:
        # Below the shoulders the body outline is the same in every row: one row, broadcast.
        body_row = _unit(np.maximum((1.0 + anat.soft_tissue) * k + 0.5 - ux * k, inner))
        body = np.broadcast_to(body_row, shape)
        att = np.empty(shape, dtype=F32)
        np.multiply(body_row, density, out=att)
        if arms is not None:
            att += arms  # the arms hang over these rows: hang == 1
    else:
        shoulder = _unit(1.0 - np.abs(Y + 0.9) * 2.2)
        side_wall = ((1.0 + anat.soft_tissue) + 0.45 * shoulder * shoulder) * k + 0.5 - ux * k
        shoulder_top = (Y * (vs * k) + 0.5) - top_line * (vs * k)
        body = np.maximum(np.minimum(side_wall, shoulder_top), inner)
        np.clip(body, 0.0, 1.0, out=body)
        att = body * density
        if arms is not None:
            hang = _unit((Y + 1.0) * 5.0)
            att += hang * arms

    # Hemidiaphragms peak mid-hemithorax and fall to sharp lateral costophrenic angles.
    k = vs * t / 1.5
    du = ux - 0.55
    right = (X - geo.mid) < 0  # patient's right = image left
    dome = np.where(right, geo.dome_r, geo.dome_l) + np.where(du > 0, 1.4, 0.8) * du * du
    dome_k = (dome * k).astype(F32)
    # None: the whole strip is above the diaphragm (below == 0 everywhere).
    below = None
    if y_hi * k + 0.5 > float(dome_k.min()):
        below = _unit((Y * k + 0.5) - dome_k)
    # Lung fields: rounded apex, near-vertical lateral wall, diaphragm below.
    du = ux - 0.42
    rad = np.where(du > 0, 0.45, 0.25)  # a domed apex, steeper medially
    top = (geo.apex + rad - np.sqrt(np.maximum(rad * rad - du * du, 0.0))).astype(F32)
    lat = 0.97 - 0.12 * (Y - 0.3) ** 2  # gently convex lateral wall, widest at the bases
    wall = np.minimum(Y * (vs * 0.45) - top * (vs * 0.45), lat - ux)
    lung = st.edge(wall, 1.5)
    if below is not None:
        lung *= 1.0 - below

    # Central shadow. Mediastinal borders are 1-D profiles of Y: the right border (SVC) and
    # the left border with the aortic knob and pulmonary trunk bulges, broadening into the hila.
    k = t / 2.0
    xm = X - geo.mid
    med_w = geo.med_half + 0.08 * _unit((Y + 0.42) * 3.0)
    med_w = med_w + geo.med_widen * _unit((geo.heart_top + 0.15 - Y) * 4.0)
    bulge = 0.075 * np.exp(-(((Y + 0.52) * 12.0) ** 2)) + 0.05 * np.exp(-(((Y + 0.3) * 14) ** 2))
    left_b = (med_w + bulge + 0.01) * k + 0.5
    right_b = med_w * k + 0.5
    # The central shadow is zero outside a band of columns around the midline (and the heart):
    # compute it only there.
    heart = _heart(st, geo)
    c0, c1 = _cols_between(xm, -float(right_b.max()) / k, float(left_b.max()) / k)
    if heart is not None:
        c0, c1 = min(c0, heart[0][1].start), max(c1, heart[0][1].stop)
    xw = xm[:, c0:c1]
    central = _unit(np.minimum(left_b - xw * k, right_b + xw * k))
    if heart is not None:
        sl, mask = heart
        hsl = (sl[0], slice(sl[1].start - c0, sl[1].stop - c0))
        np.maximum(central[hsl], mask, out=central[hsl])
        # The heart is thicker than the mediastinum.
        att[sl] += mask * F32(0.07) if below is None else mask * (1.0 - below[sl]) * F32(0.07)
    lung_eff = lung.copy()
    lung_eff[:, c0:c1] *= 1.0 - central
    if below is not None:
        att += body * below * F32(0.05)

    # Bones: ribs, clavicles, spine, humeral heads.
    att += _ribs(st, ux, wall, below, anat, fracture)
    if y_lo < -0.6 and y_hi > -1.35:
        att += _clavicles(st, ux, Y, acq.ap) * body
    vert = 0.06 * (0.75 + 0.25 * _unit(np.cos(Y * (2 * np.pi / 0.16)) * 3.0 + 1.5))
    reach = 0.075 + 0.75 / t
    cs = slice(*_cols_between(xm, -reach, reach))
    spine = _unit((0.075 - np.abs(xm[:, cs])) * (t / 1.5) + 0.5)
    att[:, cs] += (vert * spine) * body[:, cs]
    for side in (-1, 1):
        disc = _disc(st, side * 1.3, -0.84, 0.17)
        if disc is not None:
            att[disc[0]] += 0.18 * disc[1] * body[disc[0]]
    # Air: trachea down to the carina, stomach bubble under the left dome.
    if y_lo < -0.32:
        carina = 0.1 * _unit((-0.32 - Y) * 8.0)
        reach = 0.038 + 0.6 / t
        cs = slice(*_cols_between(xm, -0.01 - reach, -0.01 + reach))
        att[:, cs] -= carina * _unit((0.038 - np.abs(xm[:, cs] + 0.01)) * (t / 1.2) + 0.5)
    bubble = st.window(st.fr.box(geo.mid + 0.45, geo.dome_l + 0.24, 0.2, 0.12))
    if bubble is not None:
        sl = bubble[0]
        wx, wy = st.xy(sl)
        gd = _ellipse_dist(wx - geo.mid - 0.45, (wy - geo.dome_l - 0.24) * vs, 0.15, 0.08)
        att[sl] -= 0.08 * st.edge(gd, 2.5) * body[sl]
    if anat.breast > 0 and y_hi > geo.dome_r - 0.35:
        # Only rows within the ellipse's height (plus the soft edge) can be non-zero.
        dy = (Y - geo.dome_r - 0.02) * vs
        rows = np.abs(dy[:, 0]) < 0.3 + 3.0 / t
        if rows.any():
            r0, r1 = int(np.argmax(rows)), rows.size - int(np.argmax(rows[::-1]))
            bd = _ellipse_dist(ux - 0.58, dy[r0:r1], 0.48, 0.3)
            att[r0:r1] += (0.07 * anat.breast) * st.edge(bd, 5.0)
    # Hila: pulmonary arteries, denser than the lung around them.
    for side, hy in ((-1, -0.1), (1, -0.15)):
        disc = _disc(st, geo.mid + side * 0.24, hy, 0.09, soft_px=0.06 * t)
        if disc is not None:
            att[disc[0]] += 0.06 * disc[1] * lung[disc[0]]

    if not painters:
        return att, lung_eff, None
    zeros = np.zeros_like(att)
    return att, lung_eff, _Layers(lung, wall, marks, zeros, zeros.copy(), zeros.copy())


def _cols_between(x: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Columns c0:c1 of an ascending (1, W) row vector with lo <= x <= hi, one pixel padded."""
    row = x[0]
    c0 = int(np.searchsorted(row, lo, side="left"))
    c1 = int(np.searchsorted(row, hi, side="right"))
    return max(c0 - 1, 0), min(max(c1 + 1, c0), row.size)


def _heart(st: _Strip, geo: _FrontalGeometry) -> tuple[Slices, np.ndarray] | None:
    """Heart mask (right atrium and left ventricle) inside its window, or None off-strip."""
    rx, ry, rr = geo.ra
    lx, ly, qa, qb, qc, hb, hw, hh = geo.lv
    x0, x1 = rx - rr - 0.02, lx + hw + 0.02
    y0, y1 = min(ry - rr / st.fr.vs, ly - hh) - 0.02, max(ry + rr / st.fr.vs, ly + hh) + 0.02
    win = st.window(st.fr.box((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2))
    if win is None:
        return None
    sl = win[0]
    x, y = st.xy(sl)
    vs = st.fr.vs
    dx, dy = x - lx, (y - ly) * vs
    q = (qa * dx * dx + (qc * dy * dy)) + (qb * dx) * dy
    mask = st.edge((1.0 - np.sqrt(q)) * hb, 1.5)
    ra = rr - np.sqrt((x - rx) ** 2 + ((y - ry) * vs) ** 2)
    np.maximum(mask, st.edge(ra, 1.5), out=mask)
    return sl, mask


def _ribs(
    st: _Strip,
    ux: np.ndarray,
    wall: np.ndarray,
    below: np.ndarray | None,
    anat: Anatomy,
    fracture: tuple[int, int, float, float, float] | None,
) -> np.ndarray:
    """Posterior ribs (flat medially, curving down laterally) and fainter anterior ribs.

    A rib family is the band pattern of a phase P(Y) - G(|X|): P makes the spacing widen
    downward and G bends the ribs. cos(P - G) is expanded into products of 1-D cos/sin terms,
    which is much cheaper than a 2-D cos. A fracture shifts the phase of a lateral rib segment
    and cuts a lucent gap: a displaced, discontinuous rib.
    """
    Y = st.Y
    two_pi = 2 * np.pi
    yr = Y + 1.2
    p = (yr - 0.07 * yr * yr) * (1.0 / anat.rib_spacing)
    g = ((0.5 * ux + 0.12) * ux * ux - 0.12 * ux) * (1.0 / anat.rib_spacing)
    if fracture is None:
        c = np.cos(p * two_pi) * np.cos(g * two_pi) + np.sin(p * two_pi) * np.sin(g * two_pi)
    else:
        c = np.cos(_fracture(p - g, st.X, fracture) * F32(two_pi))
    band = _unit(c * 2.5 - 0.75)
    cage = _unit((wall + 0.06) * (st.fr.t / 3.0) + 0.5)
    if below is not None:
        cage *= 1.0 - 0.6 * below  # ribs over the abdomen are overexposed by its density
    cage *= _unit((ux - 0.06) * 12.0)
    ribs = band * (1.6 - band)  # bright cortical margins, paler marrow
    # Anterior ribs: fainter, running down and medially from the lateral wall; only above
    # Y = 0.2 (the gate is zero below), so only those rows of the strip are computed.
    n = int(np.count_nonzero(Y[:, 0] < 0.2))
    if n:
        ya = Y[:n]
        pa = (ya + 0.95) * (1.0 / (anat.rib_spacing * 1.25))
        ga = (0.55 / (anat.rib_spacing * 1.25)) * ux
        ca = np.cos(pa * two_pi) * np.cos(ga * two_pi) - np.sin(pa * two_pi) * np.sin(ga * two_pi)
        gate = _unit((ux - 0.3) * 4.0) * (0.25 * _unit((0.2 - ya) * 3.0))
        ribs[:n] += _unit(ca * 2.0 - 0.6) * gate
    ribs *= cage * F32(0.1)
    return ribs


def _plan_fracture(rng: np.random.Generator, sev: float) -> tuple[int, int, float, float, float]:
    side = _pick_side(rng)
    rib = int(rng.integers(3, 8))  # mid ribs, clear of the clavicles and the diaphragm
    u0 = float(rng.uniform(0.6, 0.85))
    shift = (0.35 + 0.25 * sev) * (1 if rng.random() < 0.5 else -1)
    return side, rib, u0, shift, 0.025 + 0.025 * sev


def _fracture(
    phase: np.ndarray, X: np.ndarray, plan: tuple[int, int, float, float, float]
) -> np.ndarray:
    side, rib, u0, shift, gap_w = plan
    sx = X * side  # >0 on the fractured side
    # Displacement tapers back to zero along the fragment (an angulated fragment).
    taper = (_unit(1.0 - (sx - u0) * (1.0 / 0.35)) * (sx >= u0)).astype(F32)
    near = (np.abs(phase - rib) < 0.7) & (sx > u0 - 0.15)
    out = np.where(near, phase + F32(shift) * taper, phase)
    gap = np.abs(sx - u0) < gap_w
    return np.where(near & gap, F32(rib + 0.5), out)  # phase k + 0.5: the intercostal lucency


def _clavicles(st: _Strip, ux: np.ndarray, Y: np.ndarray, ap: bool) -> np.ndarray:
    # PA: clavicles slope up laterally; AP (lordotic, supine): higher and more horizontal.
    y0 = -0.93 if ap else -0.84
    slope = -0.08 if ap else -0.2
    yc = y0 + slope * (ux - 0.12) + 0.16 * (ux - 0.55) ** 2
    along = _unit((ux - 0.1) * 15.0) * _unit((1.08 - ux) * 10.0)
    d = 0.042 - np.abs(Y - yc) * st.fr.vs
    return st.edge(d, 1.5) * (0.13 * along)


def _kerley_lines(
    draw: ImageDraw.ImageDraw,
    fr: _Frame,
    rng: np.random.Generator,
    sev: float,
    geo: _FrontalGeometry,
) -> None:
    """Short horizontal septal lines at the lateral lung bases (interstitial oedema)."""
    for i in range(int(2 + 10 * sev)):
        side = -1 if i % 2 == 0 else 1
        dome = geo.dome_r if side < 0 else geo.dome_l
        y = dome + 0.15 - rng.uniform(0.05, 0.4)
        x0 = side * rng.uniform(0.9, 0.95)
        _polyline(draw, fr, [(x0, y), (x0 - side * rng.uniform(0.06, 0.12), y)], 0.009, 230)


def _frontal_painters(
    fr: _Frame,
    findings: Mapping[str, float],
    rngs: Mapping[str, np.random.Generator],
    geo: _FrontalGeometry,
    atel_side: int,
) -> list[Painter]:
    """Sample each finding's geometry once; return functions that paint it strip by strip."""
    painters: list[Painter] = []
    if "Pleural Effusion" in findings:
        painters += _plan_effusion(fr, findings["Pleural Effusion"], rngs["Pleural Effusion"], geo)
    if "Edema" in findings:
        painters.append(_plan_edema(findings["Edema"], geo))
    patches = [n for n in ("Consolidation", "Pneumonia") if n in findings]
    if patches:
        # Pneumonia is drawn as an airspace consolidation; with both, one region is involved.
        sev = max(findings[n] for n in patches)
        patchy = "Pneumonia" in patches
        painters.append(_plan_airspace(fr, rngs[patches[0]], sev, dense=True, patchy=patchy))
    if LUNG_OPACITY in findings and not any(n in findings for n in PARENCHYMAL):
        painters.append(_plan_airspace(fr, rngs[LUNG_OPACITY], findings[LUNG_OPACITY], False))
    if atel_side:
        sev = findings["Atelectasis"]
        painters.append(_plan_atelectasis(fr, sev, rngs["Atelectasis"], atel_side, geo))
    if "Lung Lesion" in findings:
        painters.append(_plan_lesion(fr, findings["Lung Lesion"], rngs["Lung Lesion"]))
    if "Pneumothorax" in findings:
        painters.append(_plan_pneumothorax(fr, findings["Pneumothorax"], rngs["Pneumothorax"], geo))
    if "Pleural Other" in findings:
        painters.append(_plan_thickening(fr, findings["Pleural Other"], rngs["Pleural Other"]))
    return painters


def _plan_effusion(
    fr: _Frame, sev: float, rng: np.random.Generator, geo: _FrontalGeometry
) -> list[Painter]:
    """Dependent fluid: dense at the base, a meniscus climbing the lateral wall, blunted angle."""
    r = rng.random()
    sides = (-1, 1) if r < 0.45 else ((-1,) if r < 0.75 else (1,))
    other = float(rng.uniform(0.5, 1.0))
    painters = []
    for side in sides:
        s_sev = sev if side == sides[0] else sev * other
        cp = (geo.dome_r if side < 0 else geo.dome_l) + 0.3  # just below the costophrenic angle
        height = 0.15 + 0.85 * s_sev
        soft = 0.05 + 0.1 * s_sev
        box = fr.box(side * 0.55, cp - height / 2 - 0.1, 0.6, height / 2 + 0.4)
        painters.append(partial(_paint_effusion, box, side, cp, height, soft, geo.mid))
    return painters


def _paint_effusion(
    box: Box | None,
    side: int,
    cp: float,
    height: float,
    soft: float,
    mid: float,
    st: _Strip,
    lay: _Layers,
) -> None:
    win = st.window(box)
    if win is None:
        return
    sl = win[0]
    x, y = st.xy(sl)
    climb = _unit((np.abs(x) - 0.3) * (1.0 / 0.67))
    top = cp - height * (0.6 + 0.4 * climb * climb)  # meniscus: higher at the lateral wall
    onside = _unit((x - mid) * side * 20.0)
    lay.opac[sl] += _unit((y - top) * (1.0 / soft)) * onside


def _plan_edema(sev: float, geo: _FrontalGeometry) -> Painter:
    """Bilateral perihilar ("bat-wing") haze fading toward the periphery."""

    def paint(st: _Strip, lay: _Layers) -> None:
        gx = np.exp(-(((np.abs(st.X - geo.mid) - 0.3) * (1.0 / 0.4)) ** 2))
        gy = np.exp(-(((st.Y + 0.05) * (1.0 / 0.6)) ** 2)) * (0.25 + 0.5 * sev)
        lay.opac += gy * gx

    return paint


def _plan_airspace(
    fr: _Frame, rng: np.random.Generator, sev: float, dense: bool, patchy: bool = False
) -> Painter:
    """Airspace opacity: a cluster of soft acinar blobs with ill-defined margins.

    Dense (consolidation) patches are confluent and keep lucent air bronchograms where the
    vessel/bronchial layer runs through them; pneumonia is patchier; a nonspecific opacity is
    a fainter haze. Severity scales extent and density.
    """
    side = _pick_side(rng, 0.55)
    zone_y = float(rng.choice([-0.55, -0.1, 0.3], p=[0.25, 0.3, 0.45]))
    cx = side * float(rng.uniform(0.45, 0.7))
    cy = zone_y + float(rng.uniform(-0.08, 0.08))
    radius = (0.12 + 0.2 * sev) * (1.0 if dense else 1.3)
    n_blobs = 10 if patchy else 5
    spread, size = (0.6, 0.3) if patchy else (0.4, 0.55)
    blobs = [
        (
            cx + float(rng.normal(0.0, radius * spread)),
            cy + float(rng.normal(0.0, radius * spread)),
            radius * size * float(rng.uniform(0.7, 1.2)),
        )
        for _ in range(n_blobs)
    ]
    box = fr.box(cx, cy, radius * 2.0, radius * 2.0)
    if box is None:
        return _noop
    noise = _lowfreq(rng, (box[1] - box[0], box[3] - box[2]), 6 if patchy else 4)
    noise = noise * F32(0.45 if patchy else 0.2) + F32(1.0)
    density = (0.65 + 0.3 * sev) if dense else (0.3 + 0.3 * sev)

    def paint(st: _Strip, lay: _Layers) -> None:
        win = st.window(box)
        if win is None:
            return
        sl, bl = win
        x, y = st.xy(sl)
        field = np.zeros((y.shape[0], x.shape[1]), dtype=F32)
        for bx, by, br in blobs:
            field += np.exp((x - bx) ** 2 * (-1.0 / br**2)) * np.exp((y - by) ** 2 * (-1.0 / br**2))
        field *= noise[bl]
        patch = _unit(field * (1.0 if patchy else 1.4) - (0.1 if patchy else 0.25)) * density
        if dense:
            patch *= 1.0 - 5.0 * lay.vessels[sl]  # air bronchograms stay lucent
        lay.opac[sl] += patch

    return paint


def _noop(st: _Strip, lay: _Layers) -> None:
    return None


def _plan_atelectasis(
    fr: _Frame, sev: float, rng: np.random.Generator, side: int, geo: _FrontalGeometry
) -> Painter:
    """Plate-like (discoid) band above the raised dome; a lower-lobe wedge when more severe."""
    dome = geo.dome_r if side < 0 else geo.dome_l
    if sev < 0.55:
        y0 = dome - float(rng.uniform(0.12, 0.3))
        x0, x1 = side * 0.3, side * float(rng.uniform(0.75, 0.9))
        tilt = float(rng.uniform(-0.12, 0.05))
        thick = 0.015 + 0.03 * sev
        box = fr.box((x0 + x1) / 2, y0, abs(x1 - x0) / 2 + 0.05, 0.15)

        def plate(st: _Strip, lay: _Layers) -> None:
            win = st.window(box)
            if win is None:
                return
            sl = win[0]
            x, y = st.xy(sl)
            t = _unit((x - x0) * (1.0 / (x1 - x0)))
            along = _unit(np.minimum(t, 1.0 - t) * 6.0) * 0.6
            d = thick - np.abs(y - (y0 + tilt * t)) * st.fr.vs
            lay.opac[sl] += st.edge(d, 2.0) * along

        return plate
    # Wedge: apex at the hilum, base on the medial hemidiaphragm (lower-lobe collapse).
    hx, hy = side * 0.3, -0.05
    bx0, bx1 = side * 0.12, side * (0.2 + 0.45 * sev)
    box = fr.box(side * 0.35, (hy + dome) / 2 + 0.05, 0.4, (dome - hy) / 2 + 0.15)

    def wedge(st: _Strip, lay: _Layers) -> None:
        win = st.window(box)
        if win is None:
            return
        sl = win[0]
        x, y = st.xy(sl)
        t = _unit((y - hy) * (1.0 / (dome + 0.1 - hy)))  # 0 at hilum, 1 at base
        lo = hx + (min(bx0, bx1) - hx) * t
        hi = hx + (max(bx0, bx1) - hx) * t
        inside = np.minimum(x - lo, hi - x)
        lay.opac[sl] += st.edge(inside, 2.0) * (0.75 * (t > 0.05))

    return wedge


def _plan_lesion(fr: _Frame, sev: float, rng: np.random.Generator) -> Painter:
    """Nodule (small, round, sharp) or, when severe, a lobulated mass."""
    side = _pick_side(rng)
    cx = side * float(rng.uniform(0.35, 0.75))
    cy = float(rng.uniform(-0.65, 0.2))
    radius = 0.04 + 0.13 * sev
    lobes = [(cx, cy, radius)]
    if sev >= 0.5:
        for _ in range(2):
            ox, oy = rng.normal(0.0, radius * 0.45, 2)
            lobes.append((cx + ox, cy + oy, radius * float(rng.uniform(0.55, 0.8))))
    box = fr.box(cx, cy, radius * 1.9, radius * 1.9)

    def paint(st: _Strip, lay: _Layers) -> None:
        win = st.window(box)
        if win is None:
            return
        sl = win[0]
        x, y = st.xy(sl)
        mask = np.zeros((y.shape[0], x.shape[1]), dtype=F32)
        for lx, ly, r in lobes:
            np.maximum(mask, st.edge(r - np.sqrt((x - lx) ** 2 + (y - ly) ** 2), 1.3), out=mask)
        lay.opac[sl] += mask * F32(0.9)

    return paint


def _plan_pneumothorax(
    fr: _Frame, sev: float, rng: np.random.Generator, geo: _FrontalGeometry
) -> Painter:
    """Visceral pleural line parallel to the chest wall; no lung markings beyond it.

    In an upright patient the air collects apically, so the gap is widest at the apex.
    """
    side = _pick_side(rng)
    dome = geo.dome_r if side < 0 else geo.dome_l
    gap_top = 0.06 + 0.26 * sev
    box = fr.box(side * 0.55, (geo.apex + dome) / 2, 0.55, (dome - geo.apex) / 2 + 0.05)

    def paint(st: _Strip, lay: _Layers) -> None:
        win = st.window(box)
        if win is None:
            return
        sl = win[0]
        x, y = st.xy(sl)
        wall = lay.wall[sl]
        gap = gap_top * _clamp(1.0 - (y - geo.apex) * 0.5, 0.2, 1.0)
        gate = _unit((x - geo.mid) * side * 20.0) * _unit((dome - 0.1 - y) * 6)
        keep = gate * lay.lung[sl]
        off = wall - gap
        region = _unit(off * (-st.fr.t / 1.5) + 0.5) * keep
        lay.no_marks[sl] += region
        line = np.exp(-((off * (st.fr.t / 1.1)) ** 2))
        lay.extra[sl] += line * keep * F32(0.1)
        # Pleural air is blacker than aerated lung; the collapsed lung is a little denser.
        lay.opac[sl] += keep * (0.15 * sev) - region * (0.25 + 0.15 * sev)

    return paint


def _plan_thickening(fr: _Frame, sev: float, rng: np.random.Generator) -> Painter:
    """Smooth, slightly undulating soft-tissue band along the lateral chest wall or the apex."""
    side = _pick_side(rng)
    y_lo, y_hi = (-1.0, -0.55) if rng.random() < 0.3 else (-0.6, 0.4)
    phase = float(rng.uniform(0, 2 * np.pi))
    base = 0.035 + 0.06 * sev
    box = fr.box(side * 0.65, (y_lo + y_hi) / 2, 0.4, (y_hi - y_lo) / 2 + 0.05)

    def paint(st: _Strip, lay: _Layers) -> None:
        win = st.window(box)
        if win is None:
            return
        sl = win[0]
        x, y = st.xy(sl)
        thick = base * (1.0 + 0.35 * np.sin(y * 9.0 + phase))
        along = _unit((y - y_lo) * 6.0) * _unit((y_hi - y) * 6.0)
        gate = along * (0.32 * ((x * side) > 0))
        lay.extra[sl] += st.edge(thick - lay.wall[sl], 2.0) * lay.lung[sl] * gate

    return paint


def _devices(fr: _Frame, rng: np.random.Generator, sev: float, geo: _FrontalGeometry) -> np.ndarray:
    """Radio-opaque tubes, lines, pacemaker, ECG leads: bright thin lines and a bright box."""
    img, draw = _layer_image(fr)
    kinds = ("et", "ng", "cvc", "pacer", "ecg", "chest")
    n = 1 + int(sev * 3.2)
    chosen = rng.choice(len(kinds), size=n, replace=False, p=[0.25, 0.2, 0.22, 0.1, 0.13, 0.1])
    m = geo.mid
    for k in sorted(int(i) for i in chosen):
        kind = kinds[k]
        if kind == "et":
            tip = float(rng.uniform(-0.62, -0.42))
            pts = [(m + 0.01, -1.6), (m + 0.01, tip)]
            _polyline(draw, fr, pts, 0.035, 200)
            _polyline(draw, fr, pts, 0.012, 110)  # the lumen: a tube shows two walls
        elif kind == "ng":
            bend = _bezier(
                (m - 0.02, geo.dome_l - 0.1),
                (m + 0.05, geo.dome_l + 0.25),
                (m + 0.45, geo.dome_l + 0.3),
            )
            _polyline(draw, fr, [(m - 0.03, -1.6), *bend], 0.018, 230)
        elif kind == "cvc":
            sx = _pick_side(rng, 0.6)
            pts = _bezier((sx * 0.85, -1.05), (m + sx * 0.1, -0.95), (m + sx * 0.07, -0.4))
            _polyline(draw, fr, pts, 0.014, 240)
        elif kind == "pacer":
            bx, by = 0.62, -0.8
            (x0, y0), (x1, y1) = fr.to_px(bx - 0.11, by - 0.07), fr.to_px(bx + 0.11, by + 0.07)
            draw.rounded_rectangle([x0, y0, x1, y1], radius=max(1, int(0.02 * fr.t)), fill=255)
            leads = _bezier((bx - 0.05, by), (m + 0.05, -0.7), (m - 0.05, -0.05))
            leads += _bezier((m - 0.05, -0.05), (m + 0.1, geo.dome_l), (m + 0.4, geo.dome_l - 0.1))
            _polyline(draw, fr, leads, 0.012, 245)
        elif kind == "ecg":
            for _ in range(3):
                ex, ey = float(rng.uniform(-0.9, 0.9)), float(rng.uniform(-0.95, -0.3))
                r = 0.03 * fr.t
                px, py = fr.to_px(ex, ey)
                draw.ellipse(
                    [px - r, py - r, px + r, py + r], outline=230, width=max(1, int(r / 3))
                )
                ctrl = (ex + float(rng.uniform(-0.3, 0.3)), ey - 0.3)
                _polyline(draw, fr, _bezier((ex, ey), ctrl, (ex * 1.4, -1.6)), 0.006, 170)
        else:  # chest tube from the lateral base toward the apex
            sx = _pick_side(rng)
            pts = _bezier((sx * 1.3, 0.45), (sx * 0.85, 0.35), (sx * 0.55, -0.6))
            _polyline(draw, fr, pts, 0.04, 210)
            _polyline(draw, fr, pts, 0.015, 130)
    return _u8(img)


# --------------------------------------------------------------------------------------------
# Lateral film (simpler: silhouette, spine, heart, diaphragm, and the findings that show well)
# --------------------------------------------------------------------------------------------


def _draw_lateral(
    findings: Mapping[str, float],
    anat: Anatomy,
    acq: _Acquisition,
    rng: np.random.Generator,
    size: int,
) -> np.ndarray:
    """Left lateral projection: anterior to the image left, spine to the right."""
    tex_rng, rngs = _sub_rngs(rng, findings)
    fr = _make_frame(size, anat, acq)
    dome = anat.dome + 0.05 - (0.05 if acq.ap else 0.0)
    ctr = 0.52 + 0.16 * findings["Cardiomegaly"] if "Cardiomegaly" in findings else anat.ctr
    scale = ctr / 0.43

    mimg, mdraw = _marks_layer(fr, tex_rng)
    angles = (-150, -110, -70, -30, 10, 50, 90, 130, 170)
    _vessel_tree(mdraw, fr, tex_rng, (0.0, -0.1), 1, angles, levels=3)
    marks8 = _u8(mimg)
    painters = [
        _plan_lateral_patch(fr, name, findings[name], rngs[name], dome)
        for name in ("Consolidation", "Pneumonia", "Atelectasis", LUNG_OPACITY, "Lung Lesion")
        if name in findings
    ]
    if "Pleural Effusion" in findings:
        painters.append(_plan_lateral_effusion(findings["Pleural Effusion"], dome))
    if "Edema" in findings:
        painters.append(_plan_lateral_edema(findings["Edema"]))
    devices8 = None
    if "Support Devices" in findings:
        devices8 = _lateral_devices(fr, findings["Support Devices"])
    widen = findings.get("Enlarged Cardiomediastinum", 0.0)

    def strip_att(st: _Strip) -> np.ndarray:
        X, Y, vs = st.X, st.Y, fr.vs
        # Body: chest wall front (left) to back (right); raised arms over the upper chest.
        front = -0.82 - 0.1 * _clamp(Y * 0.5, -0.2, 0.6) ** 2 - anat.soft_tissue * 0.5
        back = 0.85 + anat.soft_tissue * 0.5 + 0.05 * Y * Y
        body = st.edge(np.minimum(X - front, back - X), 2.0)
        att = body * (0.36 + 0.22 * _unit(1.0 - (X - 0.05) ** 2))
        arms = 0.5 - np.abs(Y + 1.2)
        att += st.edge(arms - np.abs(X + 0.1) * 0.3, 8.0) * F32(0.08)
        # Diaphragm: anterior high, posterior costophrenic sulcus lowest.
        xd = X + 0.2
        dia = (dome - 0.08 + 0.35 * _unit(xd * 1.4) ** 2 + 0.08 * xd * xd).astype(F32)
        above = st.edge((dia - Y) * vs, 1.5)
        lung = st.edge(_ellipse_dist(X + 0.07, (Y - 0.08) * 0.98, 0.68, 1.0), 2.0) * above
        # Heart: anterior and inferior, resting on the diaphragm behind the sternum.
        hx, hy = -0.36 + 0.12 * (scale - 1), dome - 0.1
        heart = st.edge(_ellipse_dist(X - hx, (Y - hy) * vs, 0.38 * scale, 0.36 * scale**0.5), 2)
        central = heart
        if widen:
            # Anterior mediastinal widening fills the retrosternal clear space.
            ant = st.edge(_ellipse_dist(X + 0.5, Y + 0.35, 0.2 + 0.15 * widen, 0.35), 4.0)
            central = np.maximum(central, ant)
        lung_eff = lung * (1.0 - central)
        spine_x = 0.6 + 0.06 * Y * Y
        vert = _unit((np.cos(Y * (2 * np.pi / 0.17)) + 0.75) * 3.0)
        vert *= 0.8 - 0.25 * np.clip(Y, -0.8, 1.0)  # vertebrae look darker lower down
        spine = st.edge(0.11 - np.abs(X - spine_x), 1.5) * vert
        spine += 0.5 * st.edge(0.05 - np.abs(X - spine_x - 0.18), 1.5)  # posterior elements
        sternum_x = -0.74 - anat.soft_tissue * 0.3
        sternum = st.edge(0.025 - np.abs(X - sternum_x), 1.0) * ((Y > -0.85) & (Y < 0.35))
        trach = st.edge(0.04 - np.abs(X + 0.08 - 0.2 * (Y + 1.0)), 1.2)
        trach *= _unit((-0.25 - Y) * 8.0)

        opac = np.zeros_like(att)
        marks = marks8[st.rows] * F32(0.05 / 255.0)
        lay = _Layers(lung, lung, marks, opac, opac, opac)
        for paint in painters:
            paint(st, lay)
        np.clip(opac, 0.0, 1.0, out=opac)

        att += heart * above * F32(0.08) + body * (1.0 - above) * F32(0.05)
        att += spine * body * F32(0.16) + sternum * F32(0.12) - trach * F32(0.1)
        att += lung_eff * ((marks - anat.lung_air * 0.95) * (1.0 - opac))
        hilum = _disc(st, 0.0, -0.1, 0.12, soft_px=6.0)
        if hilum is not None:
            att[hilum[0]] += 0.05 * hilum[1]
        if devices8 is not None:
            att += devices8[st.rows] * F32(1.4 / 255.0)
        return att

    return _render(fr, acq, tex_rng, strip_att)


def _plan_lateral_effusion(sev: float, dome: float) -> Painter:
    """Fluid fills the posterior costophrenic sulcus first, with a meniscus rising posteriorly."""
    height = 0.1 + 0.6 * sev
    soft = 0.06 + 0.1 * sev

    def paint(st: _Strip, lay: _Layers) -> None:
        xd = st.X + 0.2
        dia = dome - 0.08 + 0.35 * _unit(xd * 1.4) ** 2 + 0.08 * xd * xd
        top = (dia - height * _clamp((st.X + 0.5) * 0.9, 0.25, 1.0)).astype(F32)
        lay.opac += _unit((st.Y - top) * (1.0 / soft))

    return paint


def _plan_lateral_edema(sev: float) -> Painter:
    def paint(st: _Strip, lay: _Layers) -> None:
        gx = np.exp(-((st.X * 2.2) ** 2))
        gy = np.exp(-(((st.Y + 0.05) * 1.8) ** 2)) * (0.2 + 0.5 * sev)
        lay.opac += gy * gx

    return paint


def _plan_lateral_patch(
    fr: _Frame, name: str, sev: float, rng: np.random.Generator, dome: float
) -> Painter:
    # Behind the heart and in front of the spine: where lung is seen on a lateral film.
    cx = float(rng.uniform(-0.15, 0.4))
    cy = float(rng.uniform(-0.55, dome - 0.35))
    if name == "Lung Lesion":
        r = 0.04 + 0.14 * sev
        box = fr.box(cx, cy, r + 0.05, r + 0.05)

        def nodule(st: _Strip, lay: _Layers) -> None:
            win = st.window(box)
            if win is not None:
                sl = win[0]
                x, y = st.xy(sl)
                lay.opac[sl] += st.edge(r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2), 1.2)

        return nodule
    if name == "Atelectasis":
        y0 = dome - 0.2
        box = fr.box(cx, y0, 0.4, 0.1 + 0.15 * 0.4)

        def band(st: _Strip, lay: _Layers) -> None:
            win = st.window(box)
            if win is not None:
                sl = win[0]
                x, y = st.xy(sl)
                d = 0.02 + 0.03 * sev - np.abs(y - y0 - 0.15 * (x - cx))
                lay.opac[sl] += st.edge(d, 2.0) * (0.65 * (np.abs(x - cx) < 0.35))

        return band
    r = (0.15 + 0.2 * sev) * (1.3 if name == LUNG_OPACITY else 1.0)
    box = fr.box(cx, cy, r * 1.5, r * 1.5)
    if box is None:
        return _noop
    noise = _lowfreq(rng, (box[1] - box[0], box[3] - box[2]), 5) * F32(0.3)
    gain = 0.4 if name == LUNG_OPACITY else 0.55 + 0.4 * sev

    def patch(st: _Strip, lay: _Layers) -> None:
        win = st.window(box)
        if win is None:
            return
        sl, bl = win
        x, y = st.xy(sl)
        field = np.exp((x - cx) ** 2 * (-1.0 / r**2)) * np.exp((y - cy) ** 2 * (-1.0 / r**2))
        field = field * (1.0 + noise[bl])
        lay.opac[sl] += _unit((field - 0.4) * 2.5) * gain

    return patch


def _lateral_devices(fr: _Frame, sev: float) -> np.ndarray:
    """Tubes down the front of the spine; a pacemaker box anteriorly when there are more."""
    img, draw = _layer_image(fr)
    n = 1 + int(sev * 2.5)
    _polyline(draw, fr, [(-0.2, -1.6), (0.02, -0.55)], 0.03, 210)
    if n >= 2:
        pts = [(0.1, -1.6), (0.32, 0.2), *_bezier((0.32, 0.2), (0.25, 0.7), (-0.2, 0.8))]
        _polyline(draw, fr, pts, 0.018, 230)
    if n >= 3:
        px, py = fr.to_px(-0.7, -0.75)
        r = 0.07 * fr.t
        draw.rectangle([px - r * 1.3, py - r, px + r * 0.6, py + r], fill=255)
        _polyline(draw, fr, _bezier((-0.7, -0.75), (-0.2, -0.5), (-0.4, 0.3)), 0.012, 240)
    return _u8(img)


# --------------------------------------------------------------------------------------------
# Public drawing API
# --------------------------------------------------------------------------------------------


def _check_findings(findings: Mapping[str, float]) -> dict[str, float]:
    clean: dict[str, float] = {}
    for name, sev in findings.items():
        if name not in FINDINGS:
            raise ValueError(f"unknown finding {name!r}; expected one of {FINDINGS}")
        sev = float(sev)
        if not 0.0 <= sev <= 1.0:
            raise ValueError(f"severity of {name!r} must be in (0, 1], got {sev}")
        if sev > 0.0:
            clean[name] = sev
    return clean


def generate_image(
    findings: Mapping[str, float],
    rng: np.random.Generator,
    size: int = 320,
    view: str = "frontal",
    *,
    anatomy: Anatomy | None = None,
    ap: bool | None = None,
) -> np.ndarray:
    """Draw one radiograph with the given findings; returns a ``(size, size)`` uint8 array.

    ``findings`` maps observation name to severity in (0, 1] (absent names are normal). The patient
    habitus (unless ``anatomy`` is given), film technique and texture are drawn from ``rng`` first
    and each finding's geometry from its own sub-stream, so two calls with equally seeded
    generators draw the *same* patient and differ only in the findings that differ.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    clean = _check_findings(findings)
    anat = anatomy if anatomy is not None else sample_anatomy(rng)
    # Drawn whatever the findings, so equally seeded generators give the same patient and film
    # technique with and without a finding (write_dataset passes ap, correlated with devices).
    coin = rng.random() < 0.5
    if ap is None:
        ap = coin
    acq = _sample_acquisition(rng, ap)
    draw = _draw_frontal if view == "frontal" else _draw_lateral
    return draw(clean, anat, acq, rng, size)


# --------------------------------------------------------------------------------------------
# Dataset planning and writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyPlan:
    """Everything needed to render and label one study (pure data, picklable)."""

    split: str
    patient: int
    study: int
    views: tuple[str, ...]
    ap: bool
    findings: Mapping[str, float]
    labels: Mapping[str, float]
    anatomy: Anatomy

    def image_path(self, view: str) -> str:
        """CheXpert-style path relative to the dataset root."""
        idx = self.views.index(view) + 1
        return f"{self.split}/patient{self.patient:05d}/study{self.study}/view{idx}_{view}.jpg"


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_dataset` wrote."""

    out: Path
    train_csv: Path
    valid_csv: Path
    train_patients: int
    valid_patients: int
    studies: int
    train_images: int
    valid_images: int

    @property
    def images(self) -> int:
        return self.train_images + self.valid_images

    def __str__(self) -> str:
        return (
            f"wrote {self.images} images ({self.train_images} train, {self.valid_images} valid) "
            f"of {self.studies} studies from {self.train_patients + self.valid_patients} patients "
            f"({self.valid_patients} in valid) to {self.out}"
        )


def _n_valid(patients: int, config: SynthConfig) -> int:
    if patients < 2:
        return 0
    return min(patients - 1, max(1, round(config.valid_fraction * patients)))


def plan_dataset(
    patients: int, seed: int = 0, config: SynthConfig = DEFAULT_CONFIG
) -> list[StudyPlan]:
    """All studies of a dataset, labels included, without drawing a pixel.

    Patients 1..N-V are train and the last V are valid (CheXpert numbers validation patients
    after the training ones). Each patient's plan depends only on (seed, patient).
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    n_train = patients - _n_valid(patients, config)
    plans: list[StudyPlan] = []
    for patient in range(1, patients + 1):
        split = "train" if patient <= n_train else "valid"
        plans.extend(_plan_patient(seed, patient, split, config))
    return plans


def _plan_patient(seed: int, patient: int, split: str, config: SynthConfig) -> list[StudyPlan]:
    rng = _rng(seed, _KIND_PATIENT, patient)
    anatomy = sample_anatomy(_rng(seed, _KIND_ANATOMY, patient), config=config)
    n_studies = 1
    if split == "train":
        while n_studies < config.max_studies and rng.random() < config.extra_study_rate:
            n_studies += 1
    plans = []
    for study, findings in enumerate(_sample_study_sequence(rng, n_studies, config), start=1):
        labels = report_labels(findings, rng, split, config)
        ap_rate = (
            config.ap_rate_devices if "Support Devices" in findings else config.ap_rate_no_devices
        )
        ap = bool(rng.random() < ap_rate)
        views = ("frontal", "lateral") if rng.random() < config.lateral_rate else ("frontal",)
        plans.append(
            StudyPlan(
                split,
                patient,
                study,
                views,
                ap,
                findings,
                labels,
                anatomy,
            )
        )
    return plans


def render_study(plan: StudyPlan, size: int = 320, seed: int = 0) -> dict[str, np.ndarray]:
    """Draw every view of a planned study: ``{view: uint8 image}``."""
    images = {}
    for view in plan.views:
        rng = image_rng(seed, plan.patient, plan.study, view)
        images[view] = generate_image(
            plan.findings, rng, size, view, anatomy=plan.anatomy, ap=plan.ap
        )
    return images


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render_and_write(args: tuple[Path, Sequence[StudyPlan], int, int, int]) -> int:
    out, plans, size, seed, quality = args
    written = 0
    for plan in plans:
        for view, img in render_study(plan, size, seed).items():
            path = out / plan.image_path(view)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode_jpeg(img, quality))
            written += 1
    return written


def _format_value(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.1f}"


def _csv_rows(plans: Iterable[StudyPlan]) -> list[list[str]]:
    rows = []
    for plan in plans:
        for view in plan.views:
            frontal = view == "frontal"
            ap_pa = ("AP" if plan.ap else "PA") if frontal else ""
            meta = [
                plan.image_path(view),
                plan.anatomy.sex,
                str(plan.anatomy.age),
                "Frontal" if frontal else "Lateral",
                ap_pa,
            ]
            rows.append(meta + [_format_value(plan.labels[o]) for o in OBSERVATIONS])
    return rows


def _write_csv_atomic(path: Path, rows: Sequence[Sequence[str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_columns())
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


# Written beside train.csv / valid.csv so any later reader (evaluation reports) can tell that
# the films are synthetic: `is_synthetic_dataset(csv_path)` looks for it in the CSV's folder.
SYNTHETIC_MARKER = "synthetic.json"


def write_synthetic_marker(out: Path, *, patients: int, size: int, seed: int) -> Path:
    marker = {
        "generator": "cxrlabel.synth",
        "synthetic": True,
        "note": "synthetic chest radiographs drawn by cxrlabel, not patients",
        "patients": patients,
        "size": size,
        "seed": seed,
    }
    path = Path(out) / SYNTHETIC_MARKER
    atomic_write_bytes(path, (json.dumps(marker, indent=2) + "\n").encode("utf-8"))
    return path


def is_synthetic_dataset(csv_path: Path) -> bool:
    """True when `csv_path` lies in a folder written by `write_dataset` (its marker file)."""
    marker = Path(csv_path).parent / SYNTHETIC_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("generator") == "cxrlabel.synth"
    except (ValueError, AttributeError):
        return False


def write_dataset(
    out: Path,
    patients: int,
    size: int = 320,
    seed: int = 0,
    *,
    config: SynthConfig = DEFAULT_CONFIG,
    workers: int = 1,
) -> SynthSummary:
    """Write a complete CheXpert-format dataset (train.csv, valid.csv, JPEGs) into ``out``.

    Output is byte-identical for the same (patients, size, seed, config) whatever ``workers`` is.
    The CSVs are written last and atomically, so their presence means the images are complete.
    """
    out = Path(out)
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    plans = plan_dataset(patients, seed, config)
    out.mkdir(parents=True, exist_ok=True)
    chunks = _chunks(plans, max(1, workers) * 4)
    jobs = [(out, chunk, size, seed, config.jpeg_quality) for chunk in chunks]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            n_images = sum(pool.map(_render_and_write, jobs))
    else:
        n_images = sum(_render_and_write(job) for job in jobs)
    train = [p for p in plans if p.split == "train"]
    valid = [p for p in plans if p.split == "valid"]
    write_synthetic_marker(out, patients=patients, size=size, seed=seed)
    _write_csv_atomic(out / "train.csv", _csv_rows(train))
    _write_csv_atomic(out / "valid.csv", _csv_rows(valid))
    summary = SynthSummary(
        out=out,
        train_csv=out / "train.csv",
        valid_csv=out / "valid.csv",
        train_patients=len({p.patient for p in train}),
        valid_patients=len({p.patient for p in valid}),
        studies=len(plans),
        train_images=sum(len(p.views) for p in train),
        valid_images=sum(len(p.views) for p in valid),
    )
    logger.info("wrote %d synthetic images (%d studies) to %s", n_images, len(plans), out)
    return summary


def _chunks(items: Sequence[StudyPlan], n: int) -> list[Sequence[StudyPlan]]:
    step = max(1, math.ceil(len(items) / n))
    return [items[i : i + step] for i in range(0, len(items), step)]


# --------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------

# Short names so captions fit under a tile; uncertain labels get a trailing "?".
_SHORT = {
    "Enlarged Cardiomediastinum": "Enl. Cardiomed.",
    "Lung Opacity": "Opacity",
    "Lung Lesion": "Lesion",
    "Pleural Effusion": "Effusion",
    "Support Devices": "Devices",
}
_CAPTION_LINES = 4


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_text(value: Any) -> str:
    """CSV cell as text; blank for missing (None, NaN from pandas, "" from csv)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def caption_text(row: Mapping[str, Any]) -> str:
    """Labels of a CSV row for a caption: positives, then uncertain ones marked with "?"."""
    positive = [o for o in OBSERVATIONS if _as_float(row.get(o)) == POSITIVE]
    uncertain = [o for o in OBSERVATIONS if _as_float(row.get(o)) == UNCERTAIN]
    parts = [_SHORT.get(o, o) for o in positive] + [_SHORT.get(o, o) + "?" for o in uncertain]
    return ", ".join(parts) if parts else "(no positive labels)"


def caption_height(font_size: int = 14, lines: int = _CAPTION_LINES) -> int:
    """Height in pixels of the caption band under each contact-sheet tile."""
    return 6 + lines * (font_size + 3)


def _wrap(text: str, font: Any, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def _read_rows(source: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name in ("train.csv", "valid.csv"):
        path = source / name
        if path.exists():
            with path.open(newline="", encoding="utf-8") as fh:
                rows.extend(csv.DictReader(fh))
    if not rows:
        raise FileNotFoundError(f"no train.csv/valid.csv with rows in {source}")
    return rows


def _patient_of(row: Mapping[str, Any]) -> str:
    parts = _as_text(row.get("Path")).split("/")
    return parts[1] if len(parts) > 1 else ""


def _pick_rows(rows: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """Deterministic, varied pick: every observation shown when possible, one film per patient
    first (several studies of one patient look alike), then fill up in file order."""
    chosen: list[int] = []
    patients: set[str] = set()
    shown: set[str] = set()

    def take(i: int) -> None:
        chosen.append(i)
        patients.add(_patient_of(rows[i]))
        shown.update(o for o in OBSERVATIONS if _as_float(rows[i].get(o)) == POSITIVE)

    # Rarest observations first, so common ones do not use up the slots.
    counts = {o: sum(_as_float(r.get(o)) == POSITIVE for r in rows) for o in OBSERVATIONS}
    for name in sorted(OBSERVATIONS, key=lambda o: counts[o]):
        if len(chosen) >= n or name in shown or counts[name] == 0:
            continue
        for i, row in enumerate(rows):
            if _as_float(row.get(name)) == POSITIVE and _patient_of(row) not in patients:
                take(i)
                break
    # Show a lateral film too when there is one.
    laterals = [i for i, r in enumerate(rows) if _as_text(r.get("Frontal/Lateral")) == "Lateral"]
    if laterals and len(chosen) < n and not any(i in laterals for i in chosen):
        take(laterals[0])
    for new_patient_only in (True, False):
        for i, row in enumerate(rows):
            if len(chosen) >= n:
                break
            if i not in chosen and not (new_patient_only and _patient_of(row) in patients):
                take(i)
    return [rows[i] for i in chosen[:n]]


def contact_sheet(
    source: Path | Sequence[Mapping[str, Any]],
    out_png: Path,
    n: int = 16,
    *,
    root: Path | None = None,
    columns: int = 4,
    tile: int = 256,
    font_size: int = 14,
) -> Path:
    """Write one PNG grid of example films captioned with their labels, for people to look at.

    ``source`` is a dataset directory (its train.csv and valid.csv are read) or CSV-like rows
    (mappings with "Path" and the observation columns; ``root`` is then the directory the paths
    are relative to). Each caption shows the patient/study/view and the positive labels, then the
    uncertain ones marked "?". The sheet is ``columns * tile`` wide and
    ``ceil(n / columns) * (tile + caption_height(font_size))`` high.
    """
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        rows: Sequence[Mapping[str, Any]] = _read_rows(root)
    else:
        rows = list(source)
        if root is None:
            raise ValueError("root (the dataset directory) is required when rows are given")
    if n < 1 or not rows:
        raise ValueError("need at least one row and n >= 1")
    picked = _pick_rows(rows, n)
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    cap_h = caption_height(font_size)
    grid_rows = math.ceil(len(picked) / columns)
    sheet = Image.new("L", (columns * tile, grid_rows * (tile + cap_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(picked):
        x0 = (i % columns) * tile
        y0 = (i // columns) * (tile + cap_h)
        rel = _as_text(row["Path"])
        with Image.open(Path(root) / rel) as im:
            film = im.convert("L").resize((tile, tile), Image.Resampling.LANCZOS)
        sheet.paste(film, (x0, y0))
        parts = rel.split("/")
        where = "/".join(parts[1:3]) if len(parts) > 3 else rel
        view = _as_text(row.get("AP/PA")) or _as_text(row.get("Frontal/Lateral"))
        head = f"{where} {view}".strip()
        lines = [head, *_wrap(caption_text(row), font, tile - 8, draw)]
        if len(lines) > _CAPTION_LINES:
            lines = [*lines[: _CAPTION_LINES - 1], lines[_CAPTION_LINES - 1] + " ..."]
        for j, text in enumerate(lines):
            draw.text(
                (x0 + 4, y0 + tile + 3 + j * line_h), text, fill=100 if j == 0 else 0, font=font
            )
        draw.rectangle([x0, y0, x0 + tile - 1, y0 + tile + cap_h - 1], outline=170)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png
