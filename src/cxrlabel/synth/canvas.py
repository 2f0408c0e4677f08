"""Drawing primitives shared by both views: the canvas frame, row strips, layers, the film curve.

Drawing is vectorised numpy: anatomy is written as 1-D profiles of the patient coordinates X and
Y that broadcast into 2-D row strips; attenuation is accumulated in "thickness" units and mapped
to grey levels with an exponential film curve. Thin structures (vessels, tubes, wires) are drawn
with Pillow's ImageDraw; Pillow also tilts and blurs the film.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cxrlabel.synth.anatomy import MAX_TILT_DEG, Acquisition, Anatomy
from cxrlabel.synth.config import FINDINGS

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
Painter = Callable[["Strip", "Layers"], None]


@dataclass(frozen=True)
class Frame:
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

    def strips(self) -> Iterator[Strip]:
        pix = np.arange(self.canvas, dtype=F32) + F32(0.5)
        x = ((pix - F32(self.cx)) * F32(1.0 / self.t))[None, :]
        y_all = (pix - F32(self.cy)) * F32(1.0 / self.ty)
        step = max(4, _STRIP_PIXELS // self.canvas)
        for r0 in range(0, self.canvas, step):
            r1 = min(r0 + step, self.canvas)
            yield Strip(self, r0, r1, x, y_all[r0:r1, None])


@dataclass
class Strip:
    """Canvas rows r0:r1: X is a (1, W) row vector, Y an (h, 1) column vector."""

    fr: Frame
    r0: int
    r1: int
    X: np.ndarray
    Y: np.ndarray

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r1)

    def edge(self, dist: np.ndarray, soft_px: float = 1.2) -> np.ndarray:
        """Anti-aliased mask from a signed distance in horizontal units (>0 inside)."""
        return unit(dist * (self.fr.t / soft_px) + 0.5)

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

    def region(self, box: Box | None) -> tuple[Slices, np.ndarray, np.ndarray] | None:
        """Strip slices of the part of a canvas box in this strip, with its X and Y (see xy)."""
        win = self.window(box)
        if win is None:
            return None
        sl = win[0]
        x, y = self.xy(sl)
        return sl, x, y


@dataclass
class Layers:
    """Per-strip arrays that finding painters read and accumulate into."""

    lung: np.ndarray  # inside the pleura and above the diaphragm (0..1)
    wall: np.ndarray  # approximate distance to the parietal pleura (units, >0 inside)
    vessels: np.ndarray  # drawn vessel layer (0..1)
    opac: np.ndarray  # fraction of lung air replaced by fluid or tissue (<0: extra air)
    no_marks: np.ndarray  # 1 where no lung is left to show markings (pneumothorax)
    extra: np.ndarray  # attenuation added on top (pleural line, thickening)


# Constant buffers for unit: numpy's maximum/minimum against a *scalar* take a slow path
# (about 4x slower than against an array of the same shape), so strip-sized clips compare with
# read-only views of these instead.
_ZEROS = np.zeros(2 * _STRIP_PIXELS, dtype=F32)
_ONES = np.ones(2 * _STRIP_PIXELS, dtype=F32)
_ZEROS.flags.writeable = False
_ONES.flags.writeable = False


def unit(a: np.ndarray) -> np.ndarray:
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


def clamp(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip a fresh temporary to [lo, hi] in place."""
    if a.size >= 1024:
        return np.clip(a, lo, hi, out=a)
    np.maximum(a, lo, out=a)
    return np.minimum(a, hi, out=a)


def ellipse_dist(dx: np.ndarray, dy: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse boundary (>0 inside)."""
    f = np.sqrt((dx * (1.0 / a)) ** 2 + (dy * (1.0 / b)) ** 2)
    return (1.0 - f) * min(a, b)


def soft_disc(
    st: Strip, x: float, y: float, r: float, soft_px: float = 1.5
) -> tuple[Slices, np.ndarray] | None:
    """Anti-aliased disc (round in pixels), computed only where it meets the strip."""
    pad = r + soft_px / st.fr.t
    reg = st.region(st.fr.box(x, y, pad, pad / st.fr.vs))
    if reg is None:
        return None
    sl, wx, wy = reg
    d = r - np.sqrt((wx - x) ** 2 + ((wy - y) * st.fr.vs) ** 2)
    return sl, st.edge(d, soft_px)


def lowfreq(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field (unit-ish variance) by bicubic upsampling of a coarse normal grid."""
    h, w = shape
    coarse = rng.standard_normal((cells, cells)).astype(F32)
    img = Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=F32)


def polyline(
    draw: ImageDraw.ImageDraw,
    fr: Frame,
    pts: Sequence[tuple[float, float]],
    width_units: float,
    fill: int,
) -> None:
    width = max(1, round(width_units * fr.t))
    draw.line([fr.to_px(x, y) for x, y in pts], fill=fill, width=width, joint="curve")


def bezier(
    p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 12
) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)
    xs = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t**2 * p2[0]
    ys = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t**2 * p2[1]
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def vessel_tree(
    draw: ImageDraw.ImageDraw,
    fr: Frame,
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


def sub_rngs(
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


def pick_side(rng: np.random.Generator, p_right: float = 0.5) -> int:
    """-1 = patient's right (image left), +1 = patient's left (image right)."""
    return -1 if rng.random() < p_right else 1


def layer_image(fr: Frame) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (fr.canvas, fr.canvas), 0)
    return img, ImageDraw.Draw(img)


def lung_markings(
    fr: Frame,
    tex_rng: np.random.Generator,
    hila: Sequence[tuple[tuple[float, float], int]],
    angles_deg: Sequence[float],
    levels: int = 4,
    also: Callable[[ImageDraw.ImageDraw], None] | None = None,
) -> np.ndarray:
    """8-bit "lung markings" layer: faint parenchymal mottle with a vessel tree per hilum.

    ``hila`` are ((x, y), side) pairs (see vessel_tree); ``also`` draws more lines on the layer
    (Kerley lines). Kept as uint8 and converted strip by strip: no full-frame float temporaries.
    """
    coarse = clamp(tex_rng.normal(40.0, 22.0, (24, 24)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse, mode="L").resize((fr.canvas, fr.canvas), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for hilum, side in hila:
        vessel_tree(draw, fr, tex_rng, hilum, side, angles_deg, levels)
    if also is not None:
        also(draw)
    return as_u8(img)


def as_u8(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


def _develop(img8: np.ndarray, fr: Frame, acq: Acquisition) -> np.ndarray:
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


def render_film(
    film: Film, strip_att: Callable[[Strip], np.ndarray], devices8: np.ndarray | None = None
) -> np.ndarray:
    """Run the per-strip attenuation function, apply the film curve and noise, develop.

    ``devices8`` is an 8-bit layer of radio-opaque devices added on top of the anatomy.
    """
    fr, acq, tex_rng = film.fr, film.acq, film.tex_rng
    out = np.empty((fr.canvas, fr.canvas), dtype=np.uint8)
    gain = F32(255.0 * acq.contrast)
    # Quantum noise: uniform bytes are the cheapest random numbers; blur makes them Gaussian-ish.
    noise8 = np.frombuffer(tex_rng.bytes(fr.canvas * fr.canvas), dtype=np.uint8)
    noise8 = noise8.reshape(fr.canvas, fr.canvas)
    noise = F32(255.0 * acq.noise * 3.5 / 255.0)
    offset = F32(255.0 * (0.5 + acq.brightness + 0.5 * acq.contrast) + 0.5) - 127.5 * noise
    for st in fr.strips():
        att = strip_att(st)
        if devices8 is not None:
            att += devices8[st.rows] * F32(1.4 / 255.0)
        # Film curve: transmitted fraction exp(-k * attenuation); white = attenuating.
        grey = np.exp(att * F32(-acq.exposure))
        grey *= -gain
        grey += noise8[st.rows] * noise + offset
        np.clip(grey, 0.0, 255.0, out=grey)
        out[st.rows] = grey
    return _develop(out, fr, acq)


def make_frame(size: int, anat: Anatomy, acq: Acquisition) -> Frame:
    # The canvas is large enough that the tilted output square never samples outside it.
    rad = math.radians(MAX_TILT_DEG)
    pad = math.ceil(size * 0.5 * (math.cos(rad) + math.sin(rad) - 1.0)) + 1
    canvas = size + 2 * pad
    t = anat.thorax * size * acq.zoom
    return Frame(
        size=size,
        canvas=canvas,
        t=t,
        ty=t * anat.aspect,
        cx=canvas / 2 + size * acq.dx,
        cy=canvas / 2 + size * (acq.dy - 0.03),
        tilt=acq.tilt,
    )


@dataclass(frozen=True)
class Film:
    """One film being drawn: findings, patient, technique, canvas frame and random streams."""

    findings: Mapping[str, float]
    anat: Anatomy
    acq: Acquisition
    fr: Frame
    tex_rng: np.random.Generator  # texture: lung markings first, then quantum noise
    rngs: Mapping[str, np.random.Generator]  # one stream per present finding (see sub_rngs)


def start_film(
    findings: Mapping[str, float],
    anat: Anatomy,
    acq: Acquisition,
    rng: np.random.Generator,
    size: int,
) -> Film:
    """Split ``rng`` into the film's streams and lay out its canvas."""
    tex_rng, rngs = sub_rngs(rng, findings)
    return Film(findings, anat, acq, make_frame(size, anat, acq), tex_rng, rngs)
