"""FHIR Bundles from StudyFindings: codes, values, probabilities, references, JSON round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import generate_uid

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.hospital import fhir
from cxrlabel.hospital.codes import OBSERVATION_CODES, PROBABILITY, THRESHOLD, VALUE_CONCEPTS
from cxrlabel.hospital.findings import (
    Algorithm,
    Finding,
    SourceFilm,
    StudyFindings,
    derived_study_uid,
)
from tests.helpers import write_dicom

ISSUED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
ALGORITHM = Algorithm("tiny-run", "9.9.9", "0123456789abcdef", ("a" * 64, "b" * 64), "ensemble")
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def _findings() -> tuple[Finding, ...]:
    """All 14 observations, each value, with and without a threshold."""
    values = (1, 0, -1)
    return tuple(
        Finding(name, round(0.05 + 0.9 * k / 13, 6), values[k % 3], None if k == 4 else 0.5)
        for k, name in enumerate(OBSERVATIONS)
    )


def _study(patient: str = "P0042", study_id: str = STUDY_UID, **kw: Any) -> StudyFindings:
    films = kw.pop("films", (SourceFilm(Path("a.dcm"), "a.dcm", True),))
    return StudyFindings(study_id, patient, films, _findings(), ALGORITHM)


def _resources(bundle: Bundle, kind: str) -> list[tuple[str, Any]]:
    return [(e.fullUrl, e.resource) for e in bundle.entry if e.resource.get_resource_type() == kind]


def _component(obs: Any, concept: Any) -> float | None:
    for c in obs.component or []:
        if c.code.coding[0].code == concept.value:
            assert c.valueQuantity.unit == "1" and c.valueQuantity.code == "1"
            assert c.valueQuantity.system == fhir.UCUM
            return float(c.valueQuantity.value)
    return None


def test_every_observation_says_what_its_finding_says() -> None:
    study = _study()
    bundle = fhir.diagnostic_report(study, study_uid=STUDY_UID, issued=ISSUED)
    observations = [o for _, o in _resources(bundle, "Observation")]
    assert len(observations) == len(OBSERVATIONS)
    for finding, obs in zip(study.findings, observations, strict=True):
        concept = OBSERVATION_CODES[finding.observation]
        code = obs.code.coding[0]
        assert (code.system, code.code, code.display) == (
            concept.fhir_system,
            concept.value,
            concept.meaning,
        )
        assert obs.code.text == finding.observation
        assert obs.status == "final"
        assert obs.category[0].coding[0].code == "imaging"
        value = obs.valueCodeableConcept.coding[0]
        assert value.code == VALUE_CONCEPTS[finding.value].value
        assert value.system == "http://snomed.info/sct"
        expected = {1: "POS", 0: "NEG", -1: "IND"}[finding.value]
        assert obs.interpretation[0].coding[0].code == expected
        assert _component(obs, PROBABILITY) == finding.probability
        assert _component(obs, THRESHOLD) == finding.threshold
        assert obs.issued == ISSUED
        assert obs.derivedFrom[0].identifier.value == f"urn:oid:{STUDY_UID}"


def test_report_device_and_references_resolve_inside_the_bundle() -> None:
    bundle = fhir.diagnostic_report(_study(), study_uid=STUDY_UID, issued=ISSUED)
    assert bundle.type == "transaction"
    urls = [e.fullUrl for e in bundle.entry]
    assert len(set(urls)) == len(urls) and all(u.startswith("urn:uuid:") for u in urls)
    ((_, report),) = _resources(bundle, "DiagnosticReport")
    ((device_url, device),) = _resources(bundle, "Device")
    observation_urls = [u for u, _ in _resources(bundle, "Observation")]
    assert [r.reference for r in report.result] == observation_urls
    assert {o.device.reference for _, o in _resources(bundle, "Observation")} == {device_url}
    assert report.status == "final"
    assert (report.code.coding[0].system, report.code.coding[0].code) == (
        "http://loinc.org",
        "18748-4",
    )
    study_ref = report.imagingStudy[0]
    assert (study_ref.type, study_ref.identifier.system, study_ref.identifier.value) == (
        "ImagingStudy",
        "urn:dicom:uid",
        f"urn:oid:{STUDY_UID}",
    )
    assert report.identifier is None  # the UID names the study
    assert report.subject.identifier.value == "P0042" and report.subject.reference is None
    assert {(i.system, i.value) for i in device.identifier} == {
        (fhir.MODEL_ID_SYSTEM, ALGORITHM.model_id),
        (fhir.WEIGHTS_SYSTEM, "a" * 64),
        (fhir.WEIGHTS_SYSTEM, "b" * 64),
    }
    assert device.deviceName[0].name == "tiny-run" and device.version[0].value == "9.9.9"
    # Every entry can be POSTed; the Device only when no Device has this model id yet.
    requests = {e.resource.get_resource_type(): e.request for e in bundle.entry}
    assert all(e.request.method == "POST" for e in bundle.entry)
    assert (
        requests["Device"].ifNoneExist == f"identifier={fhir.MODEL_ID_SYSTEM}|{ALGORITHM.model_id}"
    )
    assert "uncertain: " in report.conclusion and "present: " in report.conclusion


def test_json_round_trip_through_fhir_resources() -> None:
    bundle = fhir.diagnostic_report(_study(), study_uid=STUDY_UID, issued=ISSUED)
    text = bundle.model_dump_json()
    again = Bundle.model_validate_json(text)
    assert again.model_dump_json() == text
    assert json.loads(text)["entry"][0]["resource"]["resourceType"] == "DiagnosticReport"
    # The same results give the same file (fullUrls derive from the model and study ids).
    assert fhir.diagnostic_report(_study(), study_uid=STUDY_UID, issued=ISSUED) == bundle


def test_collection_bundles_have_no_requests() -> None:
    bundle = fhir.diagnostic_report(
        _study(), study_uid=STUDY_UID, issued=ISSUED, bundle_type="collection"
    )
    assert bundle.type == "collection" and all(e.request is None for e in bundle.entry)


def test_without_patient_id_or_study_uid() -> None:
    study = _study(patient="", study_id="patient7/study2")
    bundle = fhir.diagnostic_report(study, study_uid=None, issued=ISSUED)
    ((_, report),) = _resources(bundle, "DiagnosticReport")
    assert report.subject is None and report.imagingStudy is None
    assert [(i.system, i.value) for i in report.identifier] == [
        (fhir.STUDY_ID_SYSTEM, "patient7/study2")
    ]
    assert all(
        o.subject is None and o.derivedFrom is None for _, o in _resources(bundle, "Observation")
    )
    # Nothing at all names an uploaded PNG's study: no identifier, fresh uuids.
    anonymous = fhir.diagnostic_report(_study(patient="", study_id=""), study_uid=None)
    assert _resources(anonymous, "DiagnosticReport")[0][1].identifier is None


def test_issued_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone"):
        fhir.diagnostic_report(_study(), study_uid=None, issued=datetime(2024, 1, 1))


def test_report_names_are_safe_and_distinct() -> None:
    assert fhir.report_name(STUDY_UID) == f"{STUDY_UID}.json"
    names = {fhir.report_name(s) for s in ("patient1/study1", "patient1_study1", "../x", "")}
    assert len(names) == 4
    assert all("/" not in n and not n.startswith(".") for n in names)


def test_written_reports_name_the_dicom_study_and_no_patient_name(tmp_path: Path) -> None:
    uid = generate_uid()
    film = write_dicom(
        tmp_path / "f.dcm",
        np.zeros((8, 8), np.uint8),
        StudyInstanceUID=uid,
        PatientID="MRN-991",
        PatientName="Doe^Jane",
        PatientBirthDate="19500102",
    )
    dicom = _study(patient="MRN-991", study_id=uid, films=(SourceFilm(film, "f.dcm", True),))
    other = _study(
        patient="patient3",
        study_id="patient3/study1",
        films=(SourceFilm(tmp_path / "v.jpg", "v.jpg", False),),
    )
    paths = fhir.write_reports([dicom, other], tmp_path / "fhir", issued=ISSUED)
    assert [p.name for p in paths] == [f"{uid}.json", fhir.report_name("patient3/study1")]
    text = paths[0].read_text(encoding="utf-8")
    assert "Doe" not in text and "Jane" not in text and "19500102" not in text
    first = Bundle.model_validate_json(text)
    assert _resources(first, "DiagnosticReport")[0][1].imagingStudy[0].identifier.value == (
        f"urn:oid:{uid}"
    )
    # A study of other films: the UID the DICOM SR output derives from its study id.
    second = Bundle.model_validate_json(paths[1].read_text(encoding="utf-8"))
    derived = derived_study_uid("patient3", "patient3/study1")
    report = _resources(second, "DiagnosticReport")[0][1]
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{derived}"
    assert [i.value for i in report.identifier] == ["patient3/study1"]
    assert not list((tmp_path / "fhir").glob("*.tmp*"))  # written atomically, nothing left
