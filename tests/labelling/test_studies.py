"""A finished run's studies as StudyFindings: ids, films, findings and the algorithm."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from cxrlabel.labelling.batch import label_inputs
from cxrlabel.labelling.studies import study_findings
from cxrlabel.models.predictor import load_model
from tests.helpers import SHARED_DATA
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
