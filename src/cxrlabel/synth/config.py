"""Every knob of the synthetic generator: observations drawn, per-finding specs, SynthConfig.

Also the seed tree: all randomness comes from ``numpy.random.SeedSequence`` keyed by
``(seed, kind, patient[, study, view])``, so every image and label is a pure function of those
numbers and does not depend on rendering order or parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from cxrlabel.data.labels import OBSERVATIONS

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
KIND_PATIENT, KIND_ANATOMY, KIND_IMAGE = 0, 1, 2


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def image_rng(seed: int, patient: int, study: int, view: str) -> np.random.Generator:
    """The generator for one image; a pure function of its identity, not of rendering order."""
    return seeded_rng(seed, KIND_IMAGE, patient, study, VIEWS.index(view))
