"""Synthetic labels without pixels: true findings of a study, and what a report would say.

:func:`sample_labels` draws the *true* findings of a study as ``{observation: severity}`` from a
small latent-factor model (an "acuity" factor for ICU-type patients, a "cardiac" factor and an
"infection" factor), so findings co-occur the way they do in CheXpert (devices with effusion and
oedema, pneumonia with consolidation, ...). :func:`report_labels` turns the truth into what a
report-mining labeller would write: uncertain (-1) for subtle findings, a little label noise and
blank cells in train; the exact truth with 0/1 only in valid (CheXpert's radiologist-labelled
validation set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from cxrlabel.data.labels import NEGATIVE, OBSERVATIONS, POSITIVE, UNCERTAIN
from cxrlabel.synth.config import (
    DEFAULT_CONFIG,
    FINDINGS,
    LUNG_OPACITY,
    NO_FINDING,
    PARENCHYMAL,
    SynthConfig,
)

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


def sample_study_sequence(
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
