"""`cxrlabel label --fhir-out DIR`: one FHIR Bundle per study, saying what the study CSVs say."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from cxrlabel.cli import main
from cxrlabel.hospital.fhir import STUDY_ID_SYSTEM, report_name
from cxrlabel.hospital.findings import derived_study_uid
from tests.helpers import SHARED_DATA
from tests.labelling.test_batch import LABELS, make_checkpoint

DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {r["Path"]: r for r in csv.DictReader(f)}


def _label(inputs: list[Path], tmp_path: Path) -> tuple[Path, Path]:
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors")
    out, fhir_out = tmp_path / "out", tmp_path / "fhir"
    args = ["label", *map(str, inputs), "--model", str(checkpoint), "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--no-progress",
            "--fhir-out", str(fhir_out)]  # fmt: skip
    assert main(args) == 0
    return out, fhir_out


def _check_reports(out: Path, fhir_out: Path) -> dict[str, Bundle]:
    """Every study of the run has its Bundle, whose Observations are the study CSVs' values."""
    labels = _rows(out / "study_labels.csv")
    probabilities = _rows(out / "study_probabilities.csv")
    assert sorted(p.name for p in fhir_out.iterdir()) == sorted(map(report_name, labels))
    bundles = {}
    for study, row in labels.items():
        bundle = Bundle.model_validate_json((fhir_out / report_name(study)).read_bytes())
        observations = [e.resource for e in bundle.entry[1:-1]]
        assert [o.code.text for o in observations] == list(LABELS)
        interpretation = {1: "POS", 0: "NEG", -1: "IND"}
        for obs in observations:
            name = obs.code.text
            assert obs.interpretation[0].coding[0].code == interpretation[int(float(row[name]))]
            probability = float(obs.component[0].valueQuantity.value)
            assert probability == pytest.approx(float(probabilities[study][name]), abs=1e-6)
        report = bundle.entry[0].resource
        patient = probabilities[study]["patient_id"]
        assert (report.subject.identifier.value if report.subject else "") == patient
        bundles[study] = bundle
    return bundles


def test_synthetic_studies_get_reports_named_by_their_study_ids(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "valid"
    shutil.copytree(tiny_dataset / "valid", folder)
    out, fhir_out = _label([folder], tmp_path)
    bundles = _check_reports(out, fhir_out)
    assert len(bundles) >= 2
    for study, bundle in bundles.items():
        report = bundle.entry[0].resource
        assert [(i.system, i.value) for i in report.identifier] == [(STUDY_ID_SYSTEM, study)]
        # As the DICOM SR output names the study.
        derived = derived_study_uid(report.subject.identifier.value, study)
        assert report.imagingStudy[0].identifier.value == f"urn:oid:{derived}"


def test_no_study_ids_no_reports_and_the_run_says_why(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    single = tmp_path / "one.jpg"
    shutil.copy(next((tiny_dataset / "valid").rglob("*.jpg")), single)
    with caplog.at_level(logging.WARNING):
        _, fhir_out = _label([single], tmp_path)
    assert not fhir_out.exists()
    assert "no FHIR report written" in caplog.text


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_dicom_fixtures_reports_point_at_their_studies_and_name_no_patient(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "dicom"
    shutil.copytree(DICOM_FIXTURES, folder)
    with caplog.at_level(logging.DEBUG):
        out, fhir_out = _label([folder], tmp_path)
    bundles = _check_reports(out, fhir_out)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    assert set(bundles) == {str(h.StudyInstanceUID) for h in headers}
    for header in headers:
        bundle = bundles[str(header.StudyInstanceUID)]
        report = bundle.entry[0].resource
        assert report.imagingStudy[0].identifier.value == f"urn:oid:{header.StudyInstanceUID}"
        assert report.identifier is None  # the study id is the UID
        text = (fhir_out / report_name(str(header.StudyInstanceUID))).read_text()
        patient_id = str(header.PatientID)
        names = [n for n in str(header.PatientName).split("^") if n and n not in patient_id]
        secrets = [
            *names,
            *([str(header.PatientBirthDate)] if header.get("PatientBirthDate") else []),
        ]
        assert not [s for s in secrets if s in text]
        # Nor does anything the run logged name the patient, by name or by id.
        assert not [s for s in [*secrets, patient_id] if s in caplog.text]
