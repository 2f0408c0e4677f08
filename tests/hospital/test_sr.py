"""The study SR: read back with highdicom, every value checked, and validated by dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.hospital import codes
from cxrlabel.hospital.findings import (
    Algorithm,
    Finding,
    SourceFilm,
    StudyFindings,
    derived_study_uid,
)
from cxrlabel.hospital.sr import device_uid, study_sr
from tests.helpers import SHARED_DATA, write_dicom

DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"
DCM = dicom_codes.DCM
DCIODVFY = shutil.which("dciodvfy")
ALGORITHM = Algorithm("tiny-run", "0.9.0", "0123456789abcdef", ("ab" * 32, "cd" * 32), "ensemble")


def dciodvfy_errors(path: Path) -> list[str] | None:
    """dciodvfy's "Error" lines for `path`; None where dicom3tools is not installed."""
    if DCIODVFY is None:
        return None
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def assert_valid_dicom(path: Path) -> None:
    """No dciodvfy error (that part skipped, not the test, where dciodvfy is absent)."""
    errors = dciodvfy_errors(path)
    assert not errors, f"{path}: {errors}"


def _code(concept: codes.Concept) -> tuple[str, str]:
    return concept.scheme, concept.value


def _pair(coded: hd.sr.CodedConcept) -> tuple[str, str]:
    return str(coded.scheme_designator), str(coded.value)


def _texts(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> list[str]:
    return [i.value for i in find_content_items(group[0], name=name, recursive=True)]


def check_sr(path: Path, study: StudyFindings, sources: Sequence[Dataset]) -> hd.sr.ComprehensiveSR:
    """Read the SR at `path` back with highdicom and check every value against `study` and
    its source films' headers; returns it."""
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    refs = {str(s.SOPInstanceUID) for s in sources}
    if sources:
        first = sources[0]
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientSex", "StudyDate"):
            assert str(sr.get(keyword, "")) == str(first.get(keyword, "")), keyword
        assert sr.SeriesInstanceUID not in {str(s.SeriesInstanceUID) for s in sources}
        assert sr.SOPInstanceUID not in refs
        evidence = {
            str(r.ReferencedSOPInstanceUID)
            for item in sr.CurrentRequestedProcedureEvidenceSequence
            for series in item.ReferencedSeriesSequence
            for r in series.ReferencedSOPSequence
        }
        assert evidence == refs
    else:
        assert sr.StudyInstanceUID == derived_study_uid(study.patient_id, study.study_id)
        assert sr.PatientID == study.patient_id
        assert str(sr.PatientName) == "" and sr.PatientBirthDate == ""
        assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    observer = report.get_observer_contexts()[0]
    device = observer.observer_identifying_attributes
    assert device.uid == device_uid(study.algorithm)
    assert device.name == f"cxrlabel {study.algorithm.name}"
    assert device.model_name == study.algorithm.model_id
    assert device.serial_number == ",".join(study.algorithm.weights_sha256)
    assert sr.SoftwareVersions == study.algorithm.version
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [f.observation for f in study.findings]
    for group, finding in zip(groups, study.findings, strict=True):
        code = codes.OBSERVATION_CODES[finding.observation]
        assert _pair(group.finding_type) == _code(code)
        (evaluation,) = group.get_qualitative_evaluations()
        assert _pair(evaluation.name) == _code(code)
        assert _pair(evaluation.value) == _code(codes.VALUE_CONCEPTS[finding.value])
        (measurement,) = group.get_measurements()
        assert _pair(measurement.name) == _code(codes.PROBABILITY)
        assert measurement.value == pytest.approx(finding.probability, abs=1e-6)
        assert _pair(measurement.unit) == ("UCUM", "1")
        assert _texts(group, DCM.AlgorithmName) == [f"cxrlabel {study.algorithm.name}"]
        assert _texts(group, DCM.AlgorithmVersion) == [study.algorithm.version]
        assert f"model id {study.algorithm.model_id}" in _texts(group, DCM.AlgorithmParameters)
        assert {str(s.referenced_sop_instance_uid) for s in group.source_images} == refs
    return sr


def _film(
    path: Path,
    study_uid: str,
    sop_class: str = pydicom.uid.DigitalXRayImageStorageForPresentation,
    **extra: object,
) -> Path:
    return write_dicom(
        path,
        np.full((8, 8), 100, dtype=np.uint16),
        SOPClassUID=sop_class,
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=pydicom.uid.generate_uid(),
        Modality="DX",
        PatientID="PID-4711",
        PatientName="Doe^Jane",
        PatientBirthDate="19700101",
        PatientSex="F",
        StudyDate="20240102",
        StudyTime="101500",
        AccessionNumber="ACC1",
        StudyID="S1",
        **extra,
    )


def _findings() -> tuple[Finding, ...]:
    return tuple(
        Finding(name, (k + 0.5) / len(OBSERVATIONS), (1, 0, -1)[k % 3], 0.5)
        for k, name in enumerate(OBSERVATIONS)
    )


def _write(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def test_sr_of_synthetic_dicom_films_joins_their_study(tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    # Two films of one study; the second lacks the Type 2 attributes highdicom copies.
    paths = [_film(tmp_path / "a.dcm", study_uid), _film(tmp_path / "b.dcm", study_uid)]
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    del sources[1].StudyID
    study = StudyFindings(
        study_uid,
        "PID-4711",
        tuple(SourceFilm(p, p.name, True) for p in paths),
        _findings(),
        ALGORITHM,
    )
    path = _write(study_sr(study, sources=sources), tmp_path / "sr.dcm")
    sr = check_sr(path, study, sources)
    assert str(sr.PatientName) == "Doe^Jane" and sr.PatientBirthDate == "19700101"
    assert sr.ContentQualification == "RESEARCH" and sr.CompletionFlag == "COMPLETE"
    assert any(
        s.CodingSchemeDesignator == codes.PRIVATE_SCHEME
        for s in sr.CodingSchemeIdentificationSequence
    )
    assert_valid_dicom(path)
    # A second SR of the same study: new series and instance, same device.
    again = study_sr(study, sources=sources)
    assert again.SeriesInstanceUID != sr.SeriesInstanceUID
    assert again.SOPInstanceUID != sr.SOPInstanceUID


def test_sr_of_a_non_dicom_study_derives_its_study_and_names_the_films(tmp_path: Path) -> None:
    films = (SourceFilm(tmp_path / "f.png", "patient00001/study1/view1_frontal.png", False),)
    study = StudyFindings("patient00001/study1", "patient00001", films, _findings()[:3], ALGORITHM)
    path = _write(study_sr(study), tmp_path / "sr.dcm")
    sr = check_sr(path, study, [])
    assert study_sr(study).StudyInstanceUID == sr.StudyInstanceUID  # the same on every run
    texts = [
        item.TextValue
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
        for item in item.ContentSequence
    ]
    assert texts == ["source film (not DICOM): patient00001/study1/view1_frontal.png"]
    assert_valid_dicom(path)


def test_a_mixed_study_references_only_its_dicom_films(tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    dicom = _film(tmp_path / "a.dcm", study_uid)
    films = (SourceFilm(dicom, "a.dcm", True), SourceFilm(tmp_path / "b.png", "b.png", False))
    study = StudyFindings("p1/s1", "PID-4711", films, _findings(), ALGORITHM)
    sources = [pydicom.dcmread(dicom, stop_before_pixels=True)]
    path = _write(study_sr(study, sources=sources), tmp_path / "sr.dcm")
    check_sr(path, study, sources)
    assert_valid_dicom(path)


def test_bad_findings_are_clear_errors() -> None:
    study = StudyFindings("s", "p", (), (Finding("Edema", 1.5, 1),), ALGORITHM)
    with pytest.raises(ValueError, match=r"'Edema': probability 1\.5 not in"):
        study_sr(study)
    with pytest.raises(ValueError, match="no findings"):
        study_sr(StudyFindings("s", "p", (), (), ALGORITHM))


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_sr_of_the_real_fixtures_is_valid_and_leaks_nothing(tmp_path: Path, recwarn) -> None:
    for fixture in sorted(DICOM_FIXTURES.glob("*.dcm")):
        source = pydicom.dcmread(fixture, stop_before_pixels=True)
        films = (SourceFilm(fixture, fixture.name, True),)
        study = StudyFindings(
            str(source.StudyInstanceUID), str(source.PatientID), films, _findings(), ALGORITHM
        )
        path = _write(study_sr(study, sources=[source]), tmp_path / f"sr-{fixture.stem}.dcm")
        sr = check_sr(path, study, [source])
        assert_valid_dicom(path)
        # The SIIM films' Patient's Age "62" is no valid AS: left empty, not copied.
        if source.get("PatientAge") == "62":
            assert sr.PatientAge == ""
        # highdicom's warning about a one-component name quotes it: silenced.
        assert not any(str(source.PatientName) in str(w.message) for w in recwarn)
