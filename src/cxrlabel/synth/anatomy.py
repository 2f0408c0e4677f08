"""The patient and the film technique: habitus, acquisition, and structures moved by findings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cxrlabel.synth.config import DEFAULT_CONFIG, SynthConfig


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


MAX_TILT_DEG = 3.5  # patient tilt on the detector, either way


@dataclass(frozen=True)
class Acquisition:
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


def sample_acquisition(rng: np.random.Generator, ap: bool) -> Acquisition:
    return Acquisition(
        ap=ap,
        dx=float(rng.uniform(-0.035, 0.035)),
        dy=float(rng.uniform(-0.03, 0.03)),
        tilt=float(np.deg2rad(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))),
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


@dataclass(frozen=True)
class FrontalGeometry:
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


def frontal_geometry(
    anat: Anatomy,
    acq: Acquisition,
    findings: Mapping[str, float],
    atel_side: int,
) -> FrontalGeometry:
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
    return FrontalGeometry(
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
