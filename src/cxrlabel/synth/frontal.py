"""The frontal (PA/AP) film: normal anatomy, bones, devices, and the finding painters over it."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
from PIL import ImageDraw

from cxrlabel.synth.anatomy import Acquisition, Anatomy, FrontalGeometry, frontal_geometry
from cxrlabel.synth.canvas import (
    F32,
    Film,
    Frame,
    Layers,
    Painter,
    Slices,
    Strip,
    as_u8,
    bezier,
    ellipse_dist,
    layer_image,
    lung_markings,
    pick_side,
    polyline,
    render_film,
    soft_disc,
    unit,
)
from cxrlabel.synth.findings import frontal_painters

# Hila (side, height): the left hilum sits a little higher than the right.
_HILA = ((-1, -0.1), (1, -0.15))


def draw_frontal(film: Film) -> np.ndarray:
    """PA or AP projection, patient's right on the image left."""
    findings, anat, acq, fr, rngs = film.findings, film.anat, film.acq, film.fr, film.rngs
    atel_side = pick_side(rngs["Atelectasis"], 0.55) if "Atelectasis" in findings else 0
    geo = frontal_geometry(anat, acq, findings, atel_side)
    painters = frontal_painters(fr, findings, rngs, geo, atel_side)
    fracture = None
    if "Fracture" in findings:
        fracture = _plan_fracture(rngs["Fracture"], findings["Fracture"])

    kerley = None
    if "Edema" in findings:
        kerley = partial(_kerley_lines, fr=fr, rng=rngs["Edema"], sev=findings["Edema"], geo=geo)
    hila = [((geo.mid + side * 0.24, hy), side) for side, hy in _HILA]
    marks8 = lung_markings(fr, film.tex_rng, hila, (-100, -65, -30, 5, 40, 75, 100), also=kerley)
    devices8 = None
    if "Support Devices" in findings:
        devices8 = _devices(fr, rngs["Support Devices"], findings["Support Devices"], geo)
    # Oedema blurs the vessels into the haze.
    marks_gain = F32(0.11 / 255.0 * (1.0 - 0.45 * findings.get("Edema", 0.0)))

    def strip_att(st: Strip) -> np.ndarray:
        marks = marks8[st.rows] * marks_gain
        att, lung_eff, lay = _frontal_anatomy(st, anat, acq, geo, fracture, marks, painters)
        air = anat.lung_air * (1.0 - 0.2 * unit((st.Y + 0.3) * 0.9))
        if lay is None:
            att += lung_eff * (marks - air)
        else:
            for paint in painters:
                paint(st, lay)
            np.clip(lay.opac, -0.3, 1.0, out=lay.opac)
            marks *= 1.0 - lay.no_marks
            att += lung_eff * ((marks - air) * (1.0 - lay.opac)) + lay.extra
        return att

    return render_film(film, strip_att, devices8)


def _frontal_anatomy(
    st: Strip,
    anat: Anatomy,
    acq: Acquisition,
    geo: FrontalGeometry,
    fracture: tuple[int, int, float, float, float] | None,
    marks: np.ndarray,
    painters: Sequence[Painter],
) -> tuple[np.ndarray, np.ndarray, Layers | None]:
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
    density = 0.22 + 0.4 * unit(1.0 - 0.6 * X * X)
    arms = None
    if acq.arms:
        # Arms by the sides (portable films): soft tissue strips with the humerus, below the
        # shoulders and separated from the chest wall by a dark gap.
        a0 = 1.0 + anat.soft_tissue + acq.arm_gap
        arm = unit((ux - a0) * k + 0.5)
        humerus = unit((0.07 - np.abs(ux - a0 - 0.22)) * k + 0.5)
        arms = arm * 0.3 + humerus * 0.12
    if y_lo >= -0.445 and (y_lo - float(top_line.max())) * (vs * k) >= 0.5:
        # Below the shoulders the body outline is the same in every row: one row, broadcast.
        body_row = unit(np.maximum((1.0 + anat.soft_tissue) * k + 0.5 - ux * k, inner))
        body = np.broadcast_to(body_row, shape)
        att = np.empty(shape, dtype=F32)
        np.multiply(body_row, density, out=att)
        if arms is not None:
            att += arms  # the arms hang over these rows: hang == 1
    else:
        shoulder = unit(1.0 - np.abs(Y + 0.9) * 2.2)
        side_wall = ((1.0 + anat.soft_tissue) + 0.45 * shoulder * shoulder) * k + 0.5 - ux * k
        shoulder_top = (Y * (vs * k) + 0.5) - top_line * (vs * k)
        body = np.maximum(np.minimum(side_wall, shoulder_top), inner)
        np.clip(body, 0.0, 1.0, out=body)
        att = body * density
        if arms is not None:
            hang = unit((Y + 1.0) * 5.0)
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
        below = unit((Y * k + 0.5) - dome_k)
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
    med_w = geo.med_half + 0.08 * unit((Y + 0.42) * 3.0)
    med_w = med_w + geo.med_widen * unit((geo.heart_top + 0.15 - Y) * 4.0)
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
    central = unit(np.minimum(left_b - xw * k, right_b + xw * k))
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
    vert = 0.06 * (0.75 + 0.25 * unit(np.cos(Y * (2 * np.pi / 0.16)) * 3.0 + 1.5))
    reach = 0.075 + 0.75 / t
    cs = slice(*_cols_between(xm, -reach, reach))
    spine = unit((0.075 - np.abs(xm[:, cs])) * (t / 1.5) + 0.5)
    att[:, cs] += (vert * spine) * body[:, cs]
    for side in (-1, 1):
        disc = soft_disc(st, side * 1.3, -0.84, 0.17)
        if disc is not None:
            att[disc[0]] += 0.18 * disc[1] * body[disc[0]]
    # Air: trachea down to the carina, stomach bubble under the left dome.
    if y_lo < -0.32:
        carina = 0.1 * unit((-0.32 - Y) * 8.0)
        reach = 0.038 + 0.6 / t
        cs = slice(*_cols_between(xm, -0.01 - reach, -0.01 + reach))
        att[:, cs] -= carina * unit((0.038 - np.abs(xm[:, cs] + 0.01)) * (t / 1.2) + 0.5)
    bubble = st.region(st.fr.box(geo.mid + 0.45, geo.dome_l + 0.24, 0.2, 0.12))
    if bubble is not None:
        sl, wx, wy = bubble
        gd = ellipse_dist(wx - geo.mid - 0.45, (wy - geo.dome_l - 0.24) * vs, 0.15, 0.08)
        att[sl] -= 0.08 * st.edge(gd, 2.5) * body[sl]
    if anat.breast > 0 and y_hi > geo.dome_r - 0.35:
        # Only rows within the ellipse's height (plus the soft edge) can be non-zero.
        dy = (Y - geo.dome_r - 0.02) * vs
        rows = np.abs(dy[:, 0]) < 0.3 + 3.0 / t
        if rows.any():
            r0, r1 = int(np.argmax(rows)), rows.size - int(np.argmax(rows[::-1]))
            bd = ellipse_dist(ux - 0.58, dy[r0:r1], 0.48, 0.3)
            att[r0:r1] += (0.07 * anat.breast) * st.edge(bd, 5.0)
    # Hila: pulmonary arteries, denser than the lung around them.
    for side, hy in _HILA:
        disc = soft_disc(st, geo.mid + side * 0.24, hy, 0.09, soft_px=0.06 * t)
        if disc is not None:
            att[disc[0]] += 0.06 * disc[1] * lung[disc[0]]

    if not painters:
        return att, lung_eff, None
    zeros = np.zeros_like(att)
    return att, lung_eff, Layers(lung, wall, marks, zeros, zeros.copy(), zeros.copy())


def _cols_between(x: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Columns c0:c1 of an ascending (1, W) row vector with lo <= x <= hi, one pixel padded."""
    row = x[0]
    c0 = int(np.searchsorted(row, lo, side="left"))
    c1 = int(np.searchsorted(row, hi, side="right"))
    return max(c0 - 1, 0), min(max(c1 + 1, c0), row.size)


def _heart(st: Strip, geo: FrontalGeometry) -> tuple[Slices, np.ndarray] | None:
    """Heart mask (right atrium and left ventricle) inside its window, or None off-strip."""
    rx, ry, rr = geo.ra
    lx, ly, qa, qb, qc, hb, hw, hh = geo.lv
    x0, x1 = rx - rr - 0.02, lx + hw + 0.02
    y0, y1 = min(ry - rr / st.fr.vs, ly - hh) - 0.02, max(ry + rr / st.fr.vs, ly + hh) + 0.02
    reg = st.region(st.fr.box((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2))
    if reg is None:
        return None
    sl, x, y = reg
    vs = st.fr.vs
    dx, dy = x - lx, (y - ly) * vs
    q = (qa * dx * dx + (qc * dy * dy)) + (qb * dx) * dy
    mask = st.edge((1.0 - np.sqrt(q)) * hb, 1.5)
    ra = rr - np.sqrt((x - rx) ** 2 + ((y - ry) * vs) ** 2)
    np.maximum(mask, st.edge(ra, 1.5), out=mask)
    return sl, mask


def _ribs(
    st: Strip,
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
    band = unit(c * 2.5 - 0.75)
    cage = unit((wall + 0.06) * (st.fr.t / 3.0) + 0.5)
    if below is not None:
        cage *= 1.0 - 0.6 * below  # ribs over the abdomen are overexposed by its density
    cage *= unit((ux - 0.06) * 12.0)
    ribs = band * (1.6 - band)  # bright cortical margins, paler marrow
    # Anterior ribs: fainter, running down and medially from the lateral wall; only above
    # Y = 0.2 (the gate is zero below), so only those rows of the strip are computed.
    n = int(np.count_nonzero(Y[:, 0] < 0.2))
    if n:
        ya = Y[:n]
        pa = (ya + 0.95) * (1.0 / (anat.rib_spacing * 1.25))
        ga = (0.55 / (anat.rib_spacing * 1.25)) * ux
        ca = np.cos(pa * two_pi) * np.cos(ga * two_pi) - np.sin(pa * two_pi) * np.sin(ga * two_pi)
        gate = unit((ux - 0.3) * 4.0) * (0.25 * unit((0.2 - ya) * 3.0))
        ribs[:n] += unit(ca * 2.0 - 0.6) * gate
    ribs *= cage * F32(0.1)
    return ribs


def _plan_fracture(rng: np.random.Generator, sev: float) -> tuple[int, int, float, float, float]:
    side = pick_side(rng)
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
    taper = (unit(1.0 - (sx - u0) * (1.0 / 0.35)) * (sx >= u0)).astype(F32)
    near = (np.abs(phase - rib) < 0.7) & (sx > u0 - 0.15)
    out = np.where(near, phase + F32(shift) * taper, phase)
    gap = np.abs(sx - u0) < gap_w
    return np.where(near & gap, F32(rib + 0.5), out)  # phase k + 0.5: the intercostal lucency


def _clavicles(st: Strip, ux: np.ndarray, Y: np.ndarray, ap: bool) -> np.ndarray:
    # PA: clavicles slope up laterally; AP (lordotic, supine): higher and more horizontal.
    y0 = -0.93 if ap else -0.84
    slope = -0.08 if ap else -0.2
    yc = y0 + slope * (ux - 0.12) + 0.16 * (ux - 0.55) ** 2
    along = unit((ux - 0.1) * 15.0) * unit((1.08 - ux) * 10.0)
    d = 0.042 - np.abs(Y - yc) * st.fr.vs
    return st.edge(d, 1.5) * (0.13 * along)


def _kerley_lines(
    draw: ImageDraw.ImageDraw,
    fr: Frame,
    rng: np.random.Generator,
    sev: float,
    geo: FrontalGeometry,
) -> None:
    """Short horizontal septal lines at the lateral lung bases (interstitial oedema)."""
    for i in range(int(2 + 10 * sev)):
        side = -1 if i % 2 == 0 else 1
        dome = geo.dome_r if side < 0 else geo.dome_l
        y = dome + 0.15 - rng.uniform(0.05, 0.4)
        x0 = side * rng.uniform(0.9, 0.95)
        polyline(draw, fr, [(x0, y), (x0 - side * rng.uniform(0.06, 0.12), y)], 0.009, 230)


def _devices(fr: Frame, rng: np.random.Generator, sev: float, geo: FrontalGeometry) -> np.ndarray:
    """Radio-opaque tubes, lines, pacemaker, ECG leads: bright thin lines and a bright box."""
    img, draw = layer_image(fr)
    kinds = ("et", "ng", "cvc", "pacer", "ecg", "chest")
    n = 1 + int(sev * 3.2)
    chosen = rng.choice(len(kinds), size=n, replace=False, p=[0.25, 0.2, 0.22, 0.1, 0.13, 0.1])
    m = geo.mid
    for k in sorted(int(i) for i in chosen):
        kind = kinds[k]
        if kind == "et":
            tip = float(rng.uniform(-0.62, -0.42))
            pts = [(m + 0.01, -1.6), (m + 0.01, tip)]
            polyline(draw, fr, pts, 0.035, 200)
            polyline(draw, fr, pts, 0.012, 110)  # the lumen: a tube shows two walls
        elif kind == "ng":
            bend = bezier(
                (m - 0.02, geo.dome_l - 0.1),
                (m + 0.05, geo.dome_l + 0.25),
                (m + 0.45, geo.dome_l + 0.3),
            )
            polyline(draw, fr, [(m - 0.03, -1.6), *bend], 0.018, 230)
        elif kind == "cvc":
            sx = pick_side(rng, 0.6)
            pts = bezier((sx * 0.85, -1.05), (m + sx * 0.1, -0.95), (m + sx * 0.07, -0.4))
            polyline(draw, fr, pts, 0.014, 240)
        elif kind == "pacer":
            bx, by = 0.62, -0.8
            (x0, y0), (x1, y1) = fr.to_px(bx - 0.11, by - 0.07), fr.to_px(bx + 0.11, by + 0.07)
            draw.rounded_rectangle([x0, y0, x1, y1], radius=max(1, int(0.02 * fr.t)), fill=255)
            leads = bezier((bx - 0.05, by), (m + 0.05, -0.7), (m - 0.05, -0.05))
            leads += bezier((m - 0.05, -0.05), (m + 0.1, geo.dome_l), (m + 0.4, geo.dome_l - 0.1))
            polyline(draw, fr, leads, 0.012, 245)
        elif kind == "ecg":
            for _ in range(3):
                ex, ey = float(rng.uniform(-0.9, 0.9)), float(rng.uniform(-0.95, -0.3))
                r = 0.03 * fr.t
                px, py = fr.to_px(ex, ey)
                draw.ellipse(
                    [px - r, py - r, px + r, py + r], outline=230, width=max(1, int(r / 3))
                )
                ctrl = (ex + float(rng.uniform(-0.3, 0.3)), ey - 0.3)
                polyline(draw, fr, bezier((ex, ey), ctrl, (ex * 1.4, -1.6)), 0.006, 170)
        else:  # chest tube from the lateral base toward the apex
            sx = pick_side(rng)
            pts = bezier((sx * 1.3, 0.45), (sx * 0.85, 0.35), (sx * 0.55, -0.6))
            polyline(draw, fr, pts, 0.04, 210)
            polyline(draw, fr, pts, 0.015, 130)
    return as_u8(img)
