"""One synthetic radiograph for given findings (the public drawing entry point)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cxrlabel.synth.anatomy import Anatomy, sample_acquisition, sample_anatomy
from cxrlabel.synth.canvas import start_film
from cxrlabel.synth.config import FINDINGS, VIEWS
from cxrlabel.synth.frontal import draw_frontal
from cxrlabel.synth.lateral import draw_lateral


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
    acq = sample_acquisition(rng, ap)
    draw = draw_frontal if view == "frontal" else draw_lateral
    return draw(start_film(clean, anat, acq, rng, size))
