"""Finding painters: each finding's geometry is sampled once, then painted strip by strip.

A painter adds to the per-strip :class:`~cxrlabel.synth.canvas.Layers` (opacity, removed lung
markings, extra attenuation); the view modules combine the layers into attenuation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import numpy as np

from cxrlabel.synth.anatomy import FrontalGeometry
from cxrlabel.synth.canvas import (
    F32,
    Box,
    Frame,
    Layers,
    Painter,
    Slices,
    Strip,
    clamp,
    lowfreq,
    pick_side,
    unit,
)
from cxrlabel.synth.config import LUNG_OPACITY, PARENCHYMAL


def frontal_painters(
    fr: Frame,
    findings: Mapping[str, float],
    rngs: Mapping[str, np.random.Generator],
    geo: FrontalGeometry,
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
    fr: Frame, sev: float, rng: np.random.Generator, geo: FrontalGeometry
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
        painters.append(_in_box(box, partial(_paint_effusion, side, cp, height, soft, geo.mid)))
    return painters


def _paint_effusion(
    side: int,
    cp: float,
    height: float,
    soft: float,
    mid: float,
    st: Strip,
    lay: Layers,
    sl: Slices,
    x: np.ndarray,
    y: np.ndarray,
) -> None:
    climb = unit((np.abs(x) - 0.3) * (1.0 / 0.67))
    top = cp - height * (0.6 + 0.4 * climb * climb)  # meniscus: higher at the lateral wall
    onside = unit((x - mid) * side * 20.0)
    lay.opac[sl] += unit((y - top) * (1.0 / soft)) * onside


def _plan_edema(sev: float, geo: FrontalGeometry) -> Painter:
    """Bilateral perihilar ("bat-wing") haze fading toward the periphery."""

    def paint(st: Strip, lay: Layers) -> None:
        gx = np.exp(-(((np.abs(st.X - geo.mid) - 0.3) * (1.0 / 0.4)) ** 2))
        gy = np.exp(-(((st.Y + 0.05) * (1.0 / 0.6)) ** 2)) * (0.25 + 0.5 * sev)
        lay.opac += gy * gx

    return paint


def _plan_airspace(
    fr: Frame, rng: np.random.Generator, sev: float, dense: bool, patchy: bool = False
) -> Painter:
    """Airspace opacity: a cluster of soft acinar blobs with ill-defined margins.

    Dense (consolidation) patches are confluent and keep lucent air bronchograms where the
    vessel/bronchial layer runs through them; pneumonia is patchier; a nonspecific opacity is
    a fainter haze. Severity scales extent and density.
    """
    side = pick_side(rng, 0.55)
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
    noise = _box_noise(rng, box, 6 if patchy else 4) * F32(0.45 if patchy else 0.2) + F32(1.0)
    density = (0.65 + 0.3 * sev) if dense else (0.3 + 0.3 * sev)

    def paint(
        st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray, tex: np.ndarray
    ) -> None:
        field = np.zeros((y.shape[0], x.shape[1]), dtype=F32)
        for bx, by, br in blobs:
            field += _blob(x, y, bx, by, br)
        field *= tex
        patch = unit(field * (1.0 if patchy else 1.4) - (0.1 if patchy else 0.25)) * density
        if dense:
            patch *= 1.0 - 5.0 * lay.vessels[sl]  # air bronchograms stay lucent
        lay.opac[sl] += patch

    return _in_box(box, paint, noise)


def _noop(st: Strip, lay: Layers) -> None:
    return None


def _in_box(
    box: Box | None, paint: Callable[..., None], texture: np.ndarray | None = None
) -> Painter:
    """A painter that calls ``paint(st, lay, sl, x, y)`` only where ``box`` meets a strip.

    ``sl`` are the strip slices of that part of the box and ``x``, ``y`` its coordinates (see
    Strip.xy); most findings are local, so most strips skip them entirely. With a ``texture``
    the size of the box, its matching part is passed too: ``paint(st, lay, sl, x, y, tex)``.
    """

    def painter(st: Strip, lay: Layers) -> None:
        win = st.window(box)
        if win is None:
            return
        sl, local = win
        x, y = st.xy(sl)
        if texture is None:
            paint(st, lay, sl, x, y)
        else:
            paint(st, lay, sl, x, y, texture[local])

    return painter


def _box_noise(rng: np.random.Generator, box: Box, cells: int) -> np.ndarray:
    """Smooth random texture the size of a canvas box (see lowfreq)."""
    return lowfreq(rng, (box[1] - box[0], box[3] - box[2]), cells)


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Isotropic Gaussian of radius r at (cx, cy), as a product of two 1-D factors (cheap)."""
    return np.exp((x - cx) ** 2 * (-1.0 / r**2)) * np.exp((y - cy) ** 2 * (-1.0 / r**2))


def _plan_atelectasis(
    fr: Frame, sev: float, rng: np.random.Generator, side: int, geo: FrontalGeometry
) -> Painter:
    """Plate-like (discoid) band above the raised dome; a lower-lobe wedge when more severe."""
    dome = geo.dome_r if side < 0 else geo.dome_l
    if sev < 0.55:
        y0 = dome - float(rng.uniform(0.12, 0.3))
        x0, x1 = side * 0.3, side * float(rng.uniform(0.75, 0.9))
        tilt = float(rng.uniform(-0.12, 0.05))
        thick = 0.015 + 0.03 * sev
        box = fr.box((x0 + x1) / 2, y0, abs(x1 - x0) / 2 + 0.05, 0.15)

        def plate(st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray) -> None:
            t = unit((x - x0) * (1.0 / (x1 - x0)))
            along = unit(np.minimum(t, 1.0 - t) * 6.0) * 0.6
            d = thick - np.abs(y - (y0 + tilt * t)) * st.fr.vs
            lay.opac[sl] += st.edge(d, 2.0) * along

        return _in_box(box, plate)
    # Wedge: apex at the hilum, base on the medial hemidiaphragm (lower-lobe collapse).
    hx, hy = side * 0.3, -0.05
    bx0, bx1 = side * 0.12, side * (0.2 + 0.45 * sev)
    box = fr.box(side * 0.35, (hy + dome) / 2 + 0.05, 0.4, (dome - hy) / 2 + 0.15)

    def wedge(st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray) -> None:
        t = unit((y - hy) * (1.0 / (dome + 0.1 - hy)))  # 0 at hilum, 1 at base
        lo = hx + (min(bx0, bx1) - hx) * t
        hi = hx + (max(bx0, bx1) - hx) * t
        inside = np.minimum(x - lo, hi - x)
        lay.opac[sl] += st.edge(inside, 2.0) * (0.75 * (t > 0.05))

    return _in_box(box, wedge)


def _plan_lesion(fr: Frame, sev: float, rng: np.random.Generator) -> Painter:
    """Nodule (small, round, sharp) or, when severe, a lobulated mass."""
    side = pick_side(rng)
    cx = side * float(rng.uniform(0.35, 0.75))
    cy = float(rng.uniform(-0.65, 0.2))
    radius = 0.04 + 0.13 * sev
    lobes = [(cx, cy, radius)]
    if sev >= 0.5:
        for _ in range(2):
            ox, oy = rng.normal(0.0, radius * 0.45, 2)
            lobes.append((cx + ox, cy + oy, radius * float(rng.uniform(0.55, 0.8))))
    box = fr.box(cx, cy, radius * 1.9, radius * 1.9)

    def paint(st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray) -> None:
        mask = np.zeros((y.shape[0], x.shape[1]), dtype=F32)
        for lx, ly, r in lobes:
            np.maximum(mask, st.edge(r - np.sqrt((x - lx) ** 2 + (y - ly) ** 2), 1.3), out=mask)
        lay.opac[sl] += mask * F32(0.9)

    return _in_box(box, paint)


def _plan_pneumothorax(
    fr: Frame, sev: float, rng: np.random.Generator, geo: FrontalGeometry
) -> Painter:
    """Visceral pleural line parallel to the chest wall; no lung markings beyond it.

    In an upright patient the air collects apically, so the gap is widest at the apex.
    """
    side = pick_side(rng)
    dome = geo.dome_r if side < 0 else geo.dome_l
    gap_top = 0.06 + 0.26 * sev
    box = fr.box(side * 0.55, (geo.apex + dome) / 2, 0.55, (dome - geo.apex) / 2 + 0.05)

    def paint(st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray) -> None:
        wall = lay.wall[sl]
        gap = gap_top * clamp(1.0 - (y - geo.apex) * 0.5, 0.2, 1.0)
        gate = unit((x - geo.mid) * side * 20.0) * unit((dome - 0.1 - y) * 6)
        keep = gate * lay.lung[sl]
        off = wall - gap
        region = unit(off * (-st.fr.t / 1.5) + 0.5) * keep
        lay.no_marks[sl] += region
        line = np.exp(-((off * (st.fr.t / 1.1)) ** 2))
        lay.extra[sl] += line * keep * F32(0.1)
        # Pleural air is blacker than aerated lung; the collapsed lung is a little denser.
        lay.opac[sl] += keep * (0.15 * sev) - region * (0.25 + 0.15 * sev)

    return _in_box(box, paint)


def _plan_thickening(fr: Frame, sev: float, rng: np.random.Generator) -> Painter:
    """Smooth, slightly undulating soft-tissue band along the lateral chest wall or the apex."""
    side = pick_side(rng)
    y_lo, y_hi = (-1.0, -0.55) if rng.random() < 0.3 else (-0.6, 0.4)
    phase = float(rng.uniform(0, 2 * np.pi))
    base = 0.035 + 0.06 * sev
    box = fr.box(side * 0.65, (y_lo + y_hi) / 2, 0.4, (y_hi - y_lo) / 2 + 0.05)

    def paint(st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray) -> None:
        thick = base * (1.0 + 0.35 * np.sin(y * 9.0 + phase))
        along = unit((y - y_lo) * 6.0) * unit((y_hi - y) * 6.0)
        gate = along * (0.32 * ((x * side) > 0))
        lay.extra[sl] += st.edge(thick - lay.wall[sl], 2.0) * lay.lung[sl] * gate

    return _in_box(box, paint)


def plan_lateral_effusion(sev: float, dome: float) -> Painter:
    """Fluid fills the posterior costophrenic sulcus first, with a meniscus rising posteriorly."""
    height = 0.1 + 0.6 * sev
    soft = 0.06 + 0.1 * sev

    def paint(st: Strip, lay: Layers) -> None:
        xd = st.X + 0.2
        dia = dome - 0.08 + 0.35 * unit(xd * 1.4) ** 2 + 0.08 * xd * xd
        top = (dia - height * clamp((st.X + 0.5) * 0.9, 0.25, 1.0)).astype(F32)
        lay.opac += unit((st.Y - top) * (1.0 / soft))

    return paint


def plan_lateral_edema(sev: float) -> Painter:
    def paint(st: Strip, lay: Layers) -> None:
        gx = np.exp(-((st.X * 2.2) ** 2))
        gy = np.exp(-(((st.Y + 0.05) * 1.8) ** 2)) * (0.2 + 0.5 * sev)
        lay.opac += gy * gx

    return paint


def plan_lateral_patch(
    fr: Frame, name: str, sev: float, rng: np.random.Generator, dome: float
) -> Painter:
    # Behind the heart and in front of the spine: where lung is seen on a lateral film.
    cx = float(rng.uniform(-0.15, 0.4))
    cy = float(rng.uniform(-0.55, dome - 0.35))
    if name == "Lung Lesion":
        r = 0.04 + 0.14 * sev
        box = fr.box(cx, cy, r + 0.05, r + 0.05)

        def nodule(st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray) -> None:
            lay.opac[sl] += st.edge(r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2), 1.2)

        return _in_box(box, nodule)
    if name == "Atelectasis":
        y0 = dome - 0.2
        box = fr.box(cx, y0, 0.4, 0.1 + 0.15 * 0.4)

        def band(st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray) -> None:
            d = 0.02 + 0.03 * sev - np.abs(y - y0 - 0.15 * (x - cx))
            lay.opac[sl] += st.edge(d, 2.0) * (0.65 * (np.abs(x - cx) < 0.35))

        return _in_box(box, band)
    r = (0.15 + 0.2 * sev) * (1.3 if name == LUNG_OPACITY else 1.0)
    box = fr.box(cx, cy, r * 1.5, r * 1.5)
    if box is None:
        return _noop
    noise = _box_noise(rng, box, 5) * F32(0.3)
    gain = 0.4 if name == LUNG_OPACITY else 0.55 + 0.4 * sev

    def patch(
        st: Strip, lay: Layers, sl: Slices, x: np.ndarray, y: np.ndarray, tex: np.ndarray
    ) -> None:
        field = _blob(x, y, cx, cy, r) * (1.0 + tex)
        lay.opac[sl] += unit((field - 0.4) * 2.5) * gain

    return _in_box(box, patch, noise)
