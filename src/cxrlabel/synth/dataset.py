"""Dataset planning and writing: studies planned without pixels, then rendered to JPEGs + CSVs."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrlabel.csvcells import neutralise_row
from cxrlabel.data.formats import write_synthetic_marker
from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.data.pictures import encode_jpeg
from cxrlabel.fileio import atomic_write_bytes
from cxrlabel.synth.anatomy import Anatomy, sample_anatomy
from cxrlabel.synth.config import (
    DEFAULT_CONFIG,
    KIND_ANATOMY,
    KIND_PATIENT,
    SynthConfig,
    csv_columns,
    image_rng,
    seeded_rng,
)
from cxrlabel.synth.film import generate_image
from cxrlabel.synth.labels import report_labels, sample_study_sequence

logger = logging.getLogger(__name__)


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
    rng = seeded_rng(seed, KIND_PATIENT, patient)
    anatomy = sample_anatomy(seeded_rng(seed, KIND_ANATOMY, patient), config=config)
    n_studies = 1
    if split == "train":
        while n_studies < config.max_studies and rng.random() < config.extra_study_rate:
            n_studies += 1
    plans = []
    for study, findings in enumerate(sample_study_sequence(rng, n_studies, config), start=1):
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


def _render_and_write(args: tuple[Path, Sequence[StudyPlan], int, int, int]) -> int:
    out, plans, size, seed, quality = args
    written = 0
    for plan in plans:
        for view, img in render_study(plan, size, seed).items():
            path = out / plan.image_path(view)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_jpeg(img, quality))
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
    writer.writerow(neutralise_row(csv_columns()))
    writer.writerows(neutralise_row(row) for row in rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


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
