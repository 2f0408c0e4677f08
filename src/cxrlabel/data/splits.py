"""Patient-level train/validation splits: seeded, saved as a file, asserted disjoint.

Films of one patient look alike, so a split by image leaks the patient into validation and
inflates every metric. Splits here are always by patient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlabel.csvcells import frame_csv, restore_frame
from cxrlabel.data.labels import LabelTable
from cxrlabel.fileio import atomic_write_text

log = logging.getLogger(__name__)

TRAIN, VALID = "train", "valid"


class SplitError(ValueError):
    """A split that would leak patients or cannot be applied to a table."""


@dataclass(frozen=True)
class Split:
    """Which patients are in training and which in validation."""

    train: frozenset[str]
    valid: frozenset[str]

    def __post_init__(self) -> None:
        assert_disjoint(self.train, self.valid)

    def apply(self, table: LabelTable) -> tuple[LabelTable, LabelTable]:
        """Rows of `table` in each part; every patient of the table must be assigned."""
        patients = table.frame["patient_id"].astype(str)
        unassigned = set(patients) - self.train - self.valid
        if unassigned:
            example = sorted(unassigned)[:3]
            raise SplitError(f"{len(unassigned)} patients are in no split part, e.g. {example}")
        in_train = patients.isin(self.train).to_numpy()
        return table.subset(in_train), table.subset(~in_train)


def assert_disjoint(train: frozenset[str] | set[str], valid: frozenset[str] | set[str]) -> None:
    shared = set(train) & set(valid)
    if shared:
        example = sorted(shared)[:3]
        raise SplitError(f"{len(shared)} patients in both train and valid, e.g. {example}")


def patient_split(table: LabelTable, valid_fraction: float = 0.1, seed: int = 0) -> Split:
    """Assign whole patients to validation at random, `valid_fraction` of patients (at least 1).

    Patients are sorted before shuffling so the split depends only on the seed and the set of
    patients, not on row order.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), not {valid_fraction}")
    patients = np.array(sorted(set(table.frame["patient_id"].astype(str))))
    if len(patients) < 2:
        raise SplitError("a patient-level split needs at least two patients")
    order = np.random.default_rng(seed).permutation(len(patients))
    n_valid = min(len(patients) - 1, max(1, round(valid_fraction * len(patients))))
    valid = frozenset(patients[order[:n_valid]])
    train = frozenset(patients[order[n_valid:]])
    log.info(
        "split %d patients: %d train, %d valid (seed %d)",
        len(patients),
        len(train),
        len(valid),
        seed,
    )
    return Split(train=train, valid=valid)


def patient_folds(table: LabelTable, k: int = 5, seed: int = 0) -> list[Split]:
    """K patient-level folds for cross-validation: fold i validates on the i-th patient group."""
    patients = np.array(sorted(set(table.frame["patient_id"].astype(str))))
    if not 2 <= k <= len(patients):
        raise ValueError(f"k must be between 2 and the number of patients ({len(patients)})")
    groups = np.array_split(patients[np.random.default_rng(seed).permutation(len(patients))], k)
    every = frozenset(patients)
    return [Split(train=every - frozenset(g), valid=frozenset(g)) for g in groups]


def save_split(split: Split, path: Path) -> None:
    """Write `patient_id,split` rows atomically (temporary file, then rename)."""
    rows = [(p, TRAIN) for p in sorted(split.train)] + [(p, VALID) for p in sorted(split.valid)]
    frame = pd.DataFrame(rows, columns=["patient_id", "split"])
    atomic_write_text(Path(path), frame_csv(frame, index=False))


def load_split(path: Path) -> Split:
    frame = restore_frame(pd.read_csv(path, dtype=str, keep_default_na=False))
    if list(frame.columns) != ["patient_id", "split"]:
        raise SplitError(f"{path}: expected columns patient_id,split")
    bad = set(frame["split"]) - {TRAIN, VALID}
    if bad:
        raise SplitError(f"{path}: unknown split names {sorted(bad)}")
    part = frame.groupby("split")["patient_id"]
    groups = {name: frozenset(ids) for name, ids in part}
    return Split(train=groups.get(TRAIN, frozenset()), valid=groups.get(VALID, frozenset()))
