"""The left lateral film: silhouette, spine, heart, diaphragm and the findings that show well."""

from __future__ import annotations

import numpy as np

from cxrlabel.synth.canvas import (
    F32,
    Film,
    Frame,
    Layers,
    Strip,
    as_u8,
    bezier,
    clamp,
    ellipse_dist,
    layer_image,
    lung_markings,
    polyline,
    render_film,
    soft_disc,
    unit,
)
from cxrlabel.synth.config import LUNG_OPACITY
from cxrlabel.synth.findings import plan_lateral_edema, plan_lateral_effusion, plan_lateral_patch


def draw_lateral(film: Film) -> np.ndarray:
    """Left lateral projection: anterior to the image left, spine to the right."""
    findings, anat, acq, fr, rngs = film.findings, film.anat, film.acq, film.fr, film.rngs
    dome = anat.dome + 0.05 - (0.05 if acq.ap else 0.0)
    ctr = 0.52 + 0.16 * findings["Cardiomegaly"] if "Cardiomegaly" in findings else anat.ctr
    scale = ctr / 0.43

    angles = (-150, -110, -70, -30, 10, 50, 90, 130, 170)
    marks8 = lung_markings(fr, film.tex_rng, [((0.0, -0.1), 1)], angles, levels=3)
    painters = [
        plan_lateral_patch(fr, name, findings[name], rngs[name], dome)
        for name in ("Consolidation", "Pneumonia", "Atelectasis", LUNG_OPACITY, "Lung Lesion")
        if name in findings
    ]
    if "Pleural Effusion" in findings:
        painters.append(plan_lateral_effusion(findings["Pleural Effusion"], dome))
    if "Edema" in findings:
        painters.append(plan_lateral_edema(findings["Edema"]))
    devices8 = None
    if "Support Devices" in findings:
        devices8 = _lateral_devices(fr, findings["Support Devices"])
    widen = findings.get("Enlarged Cardiomediastinum", 0.0)

    def strip_att(st: Strip) -> np.ndarray:
        X, Y, vs = st.X, st.Y, fr.vs
        # Body: chest wall front (left) to back (right); raised arms over the upper chest.
        front = -0.82 - 0.1 * clamp(Y * 0.5, -0.2, 0.6) ** 2 - anat.soft_tissue * 0.5
        back = 0.85 + anat.soft_tissue * 0.5 + 0.05 * Y * Y
        body = st.edge(np.minimum(X - front, back - X), 2.0)
        att = body * (0.36 + 0.22 * unit(1.0 - (X - 0.05) ** 2))
        arms = 0.5 - np.abs(Y + 1.2)
        att += st.edge(arms - np.abs(X + 0.1) * 0.3, 8.0) * F32(0.08)
        # Diaphragm: anterior high, posterior costophrenic sulcus lowest.
        xd = X + 0.2
        dia = (dome - 0.08 + 0.35 * unit(xd * 1.4) ** 2 + 0.08 * xd * xd).astype(F32)
        above = st.edge((dia - Y) * vs, 1.5)
        lung = st.edge(ellipse_dist(X + 0.07, (Y - 0.08) * 0.98, 0.68, 1.0), 2.0) * above
        # Heart: anterior and inferior, resting on the diaphragm behind the sternum.
        hx, hy = -0.36 + 0.12 * (scale - 1), dome - 0.1
        heart = st.edge(ellipse_dist(X - hx, (Y - hy) * vs, 0.38 * scale, 0.36 * scale**0.5), 2)
        central = heart
        if widen:
            # Anterior mediastinal widening fills the retrosternal clear space.
            ant = st.edge(ellipse_dist(X + 0.5, Y + 0.35, 0.2 + 0.15 * widen, 0.35), 4.0)
            central = np.maximum(central, ant)
        lung_eff = lung * (1.0 - central)
        spine_x = 0.6 + 0.06 * Y * Y
        vert = unit((np.cos(Y * (2 * np.pi / 0.17)) + 0.75) * 3.0)
        vert *= 0.8 - 0.25 * np.clip(Y, -0.8, 1.0)  # vertebrae look darker lower down
        spine = st.edge(0.11 - np.abs(X - spine_x), 1.5) * vert
        spine += 0.5 * st.edge(0.05 - np.abs(X - spine_x - 0.18), 1.5)  # posterior elements
        sternum_x = -0.74 - anat.soft_tissue * 0.3
        sternum = st.edge(0.025 - np.abs(X - sternum_x), 1.0) * ((Y > -0.85) & (Y < 0.35))
        trach = st.edge(0.04 - np.abs(X + 0.08 - 0.2 * (Y + 1.0)), 1.2)
        trach *= unit((-0.25 - Y) * 8.0)

        opac = np.zeros_like(att)
        marks = marks8[st.rows] * F32(0.05 / 255.0)
        lay = Layers(lung, lung, marks, opac, opac, opac)
        for paint in painters:
            paint(st, lay)
        np.clip(opac, 0.0, 1.0, out=opac)

        att += heart * above * F32(0.08) + body * (1.0 - above) * F32(0.05)
        att += spine * body * F32(0.16) + sternum * F32(0.12) - trach * F32(0.1)
        att += lung_eff * ((marks - anat.lung_air * 0.95) * (1.0 - opac))
        hilum = soft_disc(st, 0.0, -0.1, 0.12, soft_px=6.0)
        if hilum is not None:
            att[hilum[0]] += 0.05 * hilum[1]
        return att

    return render_film(film, strip_att, devices8)


def _lateral_devices(fr: Frame, sev: float) -> np.ndarray:
    """Tubes down the front of the spine; a pacemaker box anteriorly when there are more."""
    img, draw = layer_image(fr)
    n = 1 + int(sev * 2.5)
    polyline(draw, fr, [(-0.2, -1.6), (0.02, -0.55)], 0.03, 210)
    if n >= 2:
        pts = [(0.1, -1.6), (0.32, 0.2), *bezier((0.32, 0.2), (0.25, 0.7), (-0.2, 0.8))]
        polyline(draw, fr, pts, 0.018, 230)
    if n >= 3:
        px, py = fr.to_px(-0.7, -0.75)
        r = 0.07 * fr.t
        draw.rectangle([px - r * 1.3, py - r, px + r * 0.6, py + r], fill=255)
        polyline(draw, fr, bezier((-0.7, -0.75), (-0.2, -0.5), (-0.4, 0.3)), 0.012, 240)
    return as_u8(img)
