"""Scored predictions on labelled data: what evaluation produces and reports consume.

`Predictions` holds one row per image (or per study after `to_study_level`): probabilities,
targets with the uncertainty policy applied, the mask of entries that count, and the ids that
study-level scoring and study-resampling bootstraps need. It also says what model and what data
the numbers came from, so a report can never lose that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxrlabel.models.thresholds import Thresholds

UNITS = ("image", "study")
STUDY_AGGREGATES = ("max", "mean")


@dataclass(frozen=True)
class Predictions:
    labels: tuple[str, ...]
    paths: tuple[str, ...]
    patient_ids: tuple[str, ...]
    study_ids: tuple[str, ...]
    y_score: np.ndarray  # (N, K) probabilities
    y_true: np.ndarray  # (N, K) 0/1 targets after the uncertainty policy
    mask: np.ndarray  # (N, K) bool: True where the target counts
    thresholds: Thresholds
    model: str = ""  # display name, e.g. "Xception_3_D" or "finetune-tiny (best)"
    kind: str = "single model"  # or "ensemble of 5 checkpoints", "external predictions"
    data: str = ""  # what the rows are, e.g. "synthetic valid.csv, frontal"
    synthetic: bool = False
    unit: str = "image"
    aggregate: str = ""  # how studies were formed from images ("max" or "mean"); "" for images
    notes: tuple[str, ...] = field(default=())
    tta: int = 1  # fixed transforms the probabilities average over (1: no TTA, see models.tta)

    def __post_init__(self) -> None:
        n, k = len(self.paths), len(self.labels)
        for name in ("y_score", "y_true", "mask"):
            shape = np.shape(getattr(self, name))
            if shape != (n, k):
                raise ValueError(f"Predictions.{name} has shape {shape}, expected {(n, k)}")
        if not len(self.patient_ids) == len(self.study_ids) == n:
            raise ValueError("Predictions needs one patient id and one study id per row")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}")
        if tuple(self.thresholds.labels) != tuple(self.labels):
            raise ValueError("thresholds must be given for exactly the predicted labels")

    def __len__(self) -> int:
        return len(self.paths)

    def replace(self, **changes: object) -> Predictions:
        return dataclasses.replace(self, **changes)

    def subset_labels(self, labels: Sequence[str]) -> Predictions:
        idx = [self.labels.index(name) for name in labels]
        return self.replace(
            labels=tuple(labels),
            y_score=self.y_score[:, idx],
            y_true=self.y_true[:, idx],
            mask=self.mask[:, idx],
            thresholds=self.thresholds.subset(labels),
        )

    def to_study_level(self, how: str = "max") -> Predictions:
        """One row per study: the probability is the max (or mean) over its views, as the
        CheXpert paper scores its validation set. A study's target counts where any view's
        does, and is positive where any counted view is positive."""
        if how not in STUDY_AGGREGATES:
            raise ValueError(f"study aggregate must be one of {STUDY_AGGREGATES}")
        if self.unit == "study":
            return self
        codes, uniques = pd.factorize(pd.Series(self.study_ids), sort=False)
        g, k = len(uniques), len(self.labels)
        score = np.full((g, k), -np.inf) if how == "max" else np.zeros((g, k))
        if how == "max":
            np.maximum.at(score, codes, self.y_score)
        else:
            np.add.at(score, codes, self.y_score)
            score /= np.bincount(codes, minlength=g)[:, None]
        mask = np.zeros((g, k), dtype=bool)
        np.logical_or.at(mask, codes, self.mask)
        truth = np.zeros((g, k))
        np.maximum.at(truth, codes, np.where(self.mask, self.y_true, 0.0))
        first = np.unique(codes, return_index=True)[1]
        return self.replace(
            paths=tuple(str(s) for s in uniques),
            patient_ids=tuple(self.patient_ids[i] for i in first),
            study_ids=tuple(str(s) for s in uniques),
            y_score=score,
            y_true=truth,
            mask=mask,
            unit="study",
            aggregate=how,
        )

    def frame(self) -> pd.DataFrame:
        """Path, ids and one probability column per label (for CSV output)."""
        out = pd.DataFrame(
            {"Path": self.paths, "patient_id": self.patient_ids, "study_id": self.study_ids}
        )
        for k, name in enumerate(self.labels):
            out[name] = self.y_score[:, k]
        return out
