"""A finished `label` run's studies as `hospital.findings.StudyFindings`, for the DICOM and FHIR
outputs.

Reads the run folder's own files (study_labels.csv, study_probabilities.csv, images.csv,
run.json), never the models: what the SR or FHIR report says is exactly what the CSVs say. The
films' real paths come from walking the run's inputs again (`data.inputs.iter_inputs`, no file is
read), since the CSVs name films as the user gave them.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cxrlabel
from cxrlabel.csvcells import restore
from cxrlabel.data.images import DICOM_SUFFIXES
from cxrlabel.data.inputs import iter_inputs
from cxrlabel.hospital.findings import Algorithm, Finding, SourceFilm, StudyFindings
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)


def _rows(path: Path) -> Iterator[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield {restore(k): restore(v or "") for k, v in row.items()}


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _thresholds(model_info: Mapping[str, Any]) -> dict[str, float]:
    stored = model_info.get("thresholds")
    if not stored:
        return {}
    t = Thresholds.from_dict(stored)
    return dict(zip(t.labels, (float(v) for v in t.values), strict=True))


def _findings(
    labels: Mapping[str, str], probabilities: Mapping[str, str], thresholds: Mapping[str, float]
) -> tuple[Finding, ...]:
    out = []
    for name, p in probabilities.items():
        if not p or not labels.get(name):
            continue  # an observation the model does not predict
        out.append(Finding(name, float(p), int(float(labels[name])), thresholds.get(name)))
    return tuple(out)


def study_findings(
    out_dir: Path,
    inputs: Sequence[str | Path],
    *,
    allow_outside_paths: bool = False,
) -> list[StudyFindings]:
    """The studies of the `label` run in `out_dir`, whose inputs were `inputs`.

    Empty when the run had no study ids (no study files). Films listed in images.csv that the
    walk no longer finds are left out of their study (logged).
    """
    out_dir = Path(out_dir)
    study_labels = out_dir / "study_labels.csv"
    if not study_labels.is_file():
        return []
    run = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    model_info = run["model"]
    algorithm = Algorithm.from_model_info(model_info, cxrlabel.__version__)
    thresholds = _thresholds(model_info)
    where = {
        item.display: item.path
        for item in iter_inputs(inputs, exclude=out_dir, allow_outside_paths=allow_outside_paths)
    }
    films: dict[str, list[SourceFilm]] = {}
    for row in _rows(out_dir / "images.csv"):
        if not row["study_id"] or not row["labelled_by"]:
            continue
        path = where.get(row["Path"])
        if path is None:
            log.warning("a film of a study is no longer among the inputs; left out of its study")
            continue
        heatmaps = out_dir / row["heatmaps"] if row.get("heatmaps") else None
        films.setdefault(row["study_id"], []).append(
            SourceFilm(path, row["Path"], _is_dicom(path), heatmaps)
        )
    probabilities = {r["Path"]: r for r in _rows(out_dir / "study_probabilities.csv")}
    studies = []
    for row in _rows(study_labels):
        study = row.pop("Path")
        probs = probabilities[study]
        patient = probs.pop("patient_id")
        probs.pop("Path"), probs.pop("images")
        studies.append(
            StudyFindings(
                study_id=study,
                patient_id=patient,
                films=tuple(films.get(study, ())),
                findings=_findings(row, probs, thresholds),
                algorithm=algorithm,
            )
        )
    return studies


__all__ = ["study_findings"]
