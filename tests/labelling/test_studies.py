"""A finished run's studies as StudyFindings: ids, films, findings and the algorithm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrlabel.hospital.findings import derived_study_uid
from cxrlabel.hospital.sr import unique_sources
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.labelling.studies import study_findings, write_dicom_outputs
from cxrlabel.models.predictor import load_model
from tests.helpers import SHARED_DATA, write_dicom
from tests.hospital.test_capture import check_captures
from tests.hospital.test_sr import assert_valid_dicom, check_sr
from tests.labelling.test_batch import LABELS, make_checkpoint, read_rows

DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_dicom_study_findings_match_the_study_csvs(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    shutil.copytree(DICOM_FIXTURES, folder)
    model = load_model(
        [make_checkpoint(tmp_path / "r" / "checkpoints" / "best.safetensors")],
        backend="torch",
        device="cpu",
    )
    out = tmp_path / "out"
    label_inputs([folder], model, out, progress=False)
    studies = {s.study_id: s for s in study_findings(out, [folder])}
    siim = pydicom.dcmread(next(folder.glob("siim_*.dcm")), stop_before_pixels=True)
    study = studies[str(siim.StudyInstanceUID)]
    # The SIIM film and its MONOCHROME1 twin.
    assert {f.path.name for f in study.films} == {
        next(folder.glob("siim_*.dcm")).name,
        "txv_fake_MONOCHROME1_same_pixels.dcm",
    }
    assert all(f.is_dicom for f in study.films)
    probs = {r["Path"]: r for r in read_rows(out / "study_probabilities.csv")}[study.study_id]
    labels = {r["Path"]: r for r in read_rows(out / "study_labels.csv")}[study.study_id]
    assert [f.observation for f in study.findings] == list(LABELS)
    for f in study.findings:
        assert f.probability == pytest.approx(float(probs[f.observation]), abs=1e-6)
        assert f.value == int(float(labels[f.observation]))
        assert f.threshold == 0.5
    assert len(study.algorithm.model_id) == 16 and study.algorithm.weights_sha256


def test_a_run_without_study_ids_has_no_studies(tiny_dataset: Path, tmp_path: Path) -> None:
    model = load_model(
        [make_checkpoint(tmp_path / "r" / "checkpoints" / "best.safetensors")],
        backend="torch",
        device="cpu",
    )
    film = next((tiny_dataset / "valid").rglob("*.jpg"))
    single = tmp_path / "one.jpg"
    shutil.copy(film, single)
    label_inputs([single], model, tmp_path / "out", progress=False)
    assert study_findings(tmp_path / "out", [single]) == []


def _model(tmp_path: Path):
    return load_model(
        [make_checkpoint(tmp_path / "r" / "checkpoints" / "best.safetensors")],
        backend="torch",
        device="cpu",
    )


def _check_outputs(out: Path, inputs: list[Path], dicom_out: Path, written) -> None:
    """Every SR and capture written is read back and checked against the run's studies and
    the films' headers, validated by dciodvfy, and listed in run.json."""
    studies = study_findings(out, inputs)
    srs = [p for p in written.written if p.name.startswith("sr-")]
    assert len(srs) == len(studies) > 0
    for study in studies:
        headers = [pydicom.dcmread(f.path, stop_before_pixels=True) for f in study.dicom_films]
        uid = str(headers[0].StudyInstanceUID) if headers else None
        uid = uid or str(derived_study_uid(study.patient_id, study.study_id))
        (sr,) = (dicom_out / uid).glob("sr-*.dcm")
        check_sr(sr, study, unique_sources(headers))
        assert_valid_dicom(sr)
        captures = sorted((dicom_out / uid).glob("sc-*.dcm"))
        if any(f.heatmaps for f in study.films):
            check_captures(captures, study, headers)
            for capture in captures:
                assert_valid_dicom(capture)
        else:
            assert not captures
    run = json.loads((out / "run.json").read_text())
    assert run["dicom_outputs"] == written.to_dict(dicom_out)
    assert sorted(run["dicom_outputs"]["written"]) == sorted(
        p.relative_to(dicom_out).as_posix() for p in dicom_out.rglob("*.dcm")
    )


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_dicom_outputs_of_the_real_fixtures(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    shutil.copytree(DICOM_FIXTURES, folder)
    out, dicom_out = tmp_path / "out", tmp_path / "dicom-out"
    label_inputs([folder], _model(tmp_path), out, heatmaps=True, progress=False)
    written = write_dicom_outputs(out, [folder], dicom_out, heatmaps=True)
    assert written.notes == []
    # Two studies: SIIM + its twin, and the JPEG 2000 film.
    assert len([p for p in written.written if p.name.startswith("sr-")]) == 2
    assert any(p.name.startswith("sc-") for p in written.written)
    _check_outputs(out, [folder], dicom_out, written)


def test_dicom_outputs_of_synthetic_dicom_films(tmp_path: Path) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    study_uid = pydicom.uid.generate_uid()
    rng = np.random.default_rng(1)
    for k in range(2):
        write_dicom(
            folder / f"film{k}.dcm",
            rng.integers(0, 4000, (64, 64), dtype=np.uint16),
            bits_stored=12,
            SOPClassUID=pydicom.uid.ComputedRadiographyImageStorage,
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=pydicom.uid.generate_uid(),
            Modality="CR",
            BodyPartExamined="CHEST",
            ViewPosition="PA",
            PatientID="PID-0042",
            PatientName="Roe^Richard",
            PatientBirthDate="19600229",
        )
    out, dicom_out = tmp_path / "out", tmp_path / "dicom-out"
    label_inputs([folder], _model(tmp_path), out, heatmaps=True, progress=False)
    written = write_dicom_outputs(out, [folder], dicom_out, heatmaps=True)
    assert [p.parent.name for p in written.written if p.name.startswith("sr-")] == [study_uid]
    _check_outputs(out, [folder], dicom_out, written)


def test_dicom_outputs_of_non_dicom_studies_and_a_film_without_study(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    valid = tiny_dataset / "valid"
    loose = tmp_path / "loose.jpg"
    shutil.copy(next(valid.rglob("*.jpg")), loose)
    out, dicom_out = tmp_path / "out", tmp_path / "dicom-out"
    label_inputs([valid, loose], _model(tmp_path), out, progress=False)
    written = write_dicom_outputs(out, [valid, loose], dicom_out, heatmaps=False)
    assert written.notes == ["1 film(s) have no study id, so are in no SR"]
    _check_outputs(out, [valid, loose], dicom_out, written)
    # Re-run: the same derived study UIDs (so a PACS files them in the same studies).
    again = write_dicom_outputs(out, [valid, loose], tmp_path / "again", heatmaps=False)
    assert sorted(p.parent.name for p in again.written) == sorted(
        p.parent.name for p in written.written
    )


def test_a_run_without_study_ids_writes_no_sr_and_says_why(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    single = tmp_path / "one.jpg"
    shutil.copy(next((tiny_dataset / "valid").rglob("*.jpg")), single)
    out = tmp_path / "out"
    label_inputs([single], _model(tmp_path), out, progress=False)
    written = write_dicom_outputs(out, [single], tmp_path / "dicom-out", heatmaps=True)
    assert written.written == [] and len(written.notes) == 1
    assert "no SR written: the run has no study ids" in written.notes[0]
    assert written.notes[0] in caplog.text
    run = json.loads((out / "run.json").read_text())
    assert run["dicom_outputs"]["notes"] == written.notes
