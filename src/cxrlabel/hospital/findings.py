"""One study's results as the hospital outputs (SR, secondary captures, FHIR) take them.

`StudyFindings` is built by the labelling layer (`cxrlabel.labelling.studies`, from a finished
`label` run, or the service, from one prediction) and read by `hospital.sr`, `hospital.capture`
and `hospital.fhir`; none of those look at CSVs or models themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID, generate_uid

from cxrlabel.models.predictor import model_id


@dataclass(frozen=True)
class Algorithm:
    """What produced the results, as `/model` and run.json name it."""

    name: str  # the model's name (run folder / checkpoint name)
    version: str  # the cxrlabel package version
    model_id: str  # sha256 over the members' weight hashes, first 16 hex (models.model_id)
    weights_sha256: tuple[str, ...]  # each member checkpoint's weights sha256
    kind: str = "single model"

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any], version: str) -> Algorithm:
        """From a Predictor's model_info() (or run.json's "model")."""
        members = info.get("members", [])
        return cls(
            name=str(info.get("name", "")),
            version=version,
            model_id=model_id(info),
            weights_sha256=tuple(str(m["sha256"]) for m in members if m.get("sha256")),
            kind=str(info.get("kind", "single model")),
        )


@dataclass(frozen=True)
class Finding:
    """One observation's study-level result."""

    observation: str  # a CheXpert observation name (codes.OBSERVATION_CODES)
    probability: float  # in [0, 1]
    value: int  # 1 present, 0 absent, -1 uncertain (inside the stored band)
    threshold: float | None = None  # the decision threshold used, when known


@dataclass(frozen=True)
class SourceFilm:
    """A film the study's results were computed from."""

    path: Path  # where it was read
    display: str  # how the outputs name it (labels.csv's Path)
    is_dicom: bool
    heatmaps: Path | None = None  # its folder of Grad-CAM overlays (PNG), when drawn


@dataclass(frozen=True)
class StudyFindings:
    """One study: ids, its films and one Finding per observation the model predicts."""

    study_id: str  # as study_labels.csv names it (DICOM: the Study Instance UID)
    patient_id: str
    films: tuple[SourceFilm, ...]
    findings: tuple[Finding, ...]
    algorithm: Algorithm

    @property
    def dicom_films(self) -> tuple[SourceFilm, ...]:
        return tuple(f for f in self.films if f.is_dicom)


def derived_study_uid(patient_id: str, study_id: str) -> UID:
    """The Study Instance UID of a study whose films were not DICOM: the same ids always give
    the same UID (so a re-run's SR joins the first run's study)."""
    return generate_uid(entropy_srcs=["cxrlabel study", patient_id, study_id])


__all__ = ["Algorithm", "Finding", "SourceFilm", "StudyFindings", "derived_study_uid"]
