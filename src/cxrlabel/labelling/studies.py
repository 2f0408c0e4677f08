"""A finished `label` run's studies as `hospital.findings.StudyFindings`, for the DICOM and FHIR
outputs.

Reads the run folder's own files (study_labels.csv, study_probabilities.csv, images.csv,
run.json), never the models: what the SR or FHIR report says is exactly what the CSVs say. The
films' real paths come from walking the run's inputs again (`data.inputs.iter_inputs`, no file is
read), since the CSVs name films as the user gave them.

`write_dicom_outputs` turns them into DICOM files (`label --dicom-out DIR`):
``DIR/<Study Instance UID>/sr-<SOP Instance UID>.dcm`` (the study's Structured Report,
`hospital.sr`) and, with heatmaps, ``DIR/<Study Instance UID>/sc-<SOP Instance UID>.dcm`` (one
Secondary Capture per heatmap, `hospital.capture`), and records them in run.json's
"dicom_outputs". Films that were not DICOM follow `hospital.sr`'s rule: their study gets an
SR when it has a study id; a film with no study id is in no study and gets none, which the
run says (DicomOutputs.notes, the log and run.json), by count, not by patient.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

import cxrlabel
from cxrlabel.csvcells import restore
from cxrlabel.data.images import DICOM_SUFFIXES
from cxrlabel.data.inputs import iter_inputs
from cxrlabel.fileio import atomic_path, atomic_write_text
from cxrlabel.hospital.capture import heatmap_captures
from cxrlabel.hospital.findings import Algorithm, Finding, SourceFilm, StudyFindings
from cxrlabel.hospital.sr import study_sr
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


@dataclass
class DicomOutputs:
    """What write_dicom_outputs wrote, and why a study or film got no SR."""

    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, dicom_out: Path) -> dict[str, Any]:
        return {
            "dir": str(dicom_out),
            "written": [p.relative_to(dicom_out).as_posix() for p in self.written],
            "notes": list(self.notes),
        }


def _films_without_study(out_dir: Path) -> int:
    """How many labelled films have no study id (so are in no study and get no SR)."""
    images = out_dir / "images.csv"
    if not images.is_file():
        return 0
    return sum(1 for r in _rows(images) if r["labelled_by"] and not r["study_id"])


def _headers(study: StudyFindings) -> tuple[list[Dataset], list[str]]:
    """The headers of the study's DICOM films (pixels not read), and notes on the ones that
    can no longer be read (left out of the study's references)."""
    headers, notes = [], []
    for film in study.dicom_films:
        try:
            headers.append(pydicom.dcmread(film.path, stop_before_pixels=True))
        except (OSError, InvalidDicomError) as e:
            notes.append(
                f"{film.display}: header not readable now ({type(e).__name__}); not referenced"
            )
    return headers, notes


def _save(ds: Dataset, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def write_dicom_outputs(
    out_dir: Path,
    inputs: Sequence[str | Path],
    dicom_out: Path,
    *,
    heatmaps: bool,
    allow_outside_paths: bool = False,
) -> DicomOutputs:
    """Write the SR (and, with `heatmaps`, the heatmap captures) of every study of the finished
    `label` run in `out_dir` (whose inputs were `inputs`) under `dicom_out`; see the module doc."""
    out_dir, dicom_out = Path(out_dir), Path(dicom_out)
    outputs = DicomOutputs()
    studies = study_findings(out_dir, inputs, allow_outside_paths=allow_outside_paths)
    if not studies:
        outputs.notes.append(
            "no SR written: the run has no study ids (no patient/study path layout, DICOM tags "
            "or CSV id columns)"
        )
    missing = _films_without_study(out_dir) if studies else 0
    if missing:
        outputs.notes.append(f"{missing} film(s) have no study id, so are in no SR")
    for study in studies:
        headers, notes = _headers(study)
        outputs.notes.extend(notes)
        if study.dicom_films and not headers:
            # Without a header the SR could only invent the study: it is not written.
            outputs.notes.append("a DICOM study whose films are all unreadable now: no SR")
            continue
        sr = study_sr(study, sources=headers)
        folder = dicom_out / str(sr.StudyInstanceUID)
        outputs.written.append(_save(sr, folder / f"sr-{sr.SOPInstanceUID}.dcm"))
        if heatmaps:
            for sc in heatmap_captures(
                study, headers if len(headers) == len(study.dicom_films) else None
            ):
                outputs.written.append(_save(sc, folder / f"sc-{sc.SOPInstanceUID}.dcm"))
    for note in outputs.notes:
        log.warning("DICOM outputs: %s", note)
    log.info("DICOM outputs: %d file(s) in %s", len(outputs.written), dicom_out)
    _record(out_dir / "run.json", outputs.to_dict(dicom_out))
    return outputs


def _record(run_json: Path, entry: Mapping[str, Any]) -> None:
    """Add the DICOM outputs to run.json (rewritten atomically)."""
    record = json.loads(run_json.read_text(encoding="utf-8"))
    record["dicom_outputs"] = dict(entry)
    atomic_write_text(run_json, json.dumps(record, indent=2, default=str))


__all__ = ["DicomOutputs", "study_findings", "write_dicom_outputs"]
