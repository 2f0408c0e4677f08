"""Heatmap PNGs as RGB Secondary Captures in one new series of the film's study."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from cxrlabel.hospital.capture import SC_SERIES_DESCRIPTION, heatmap_captures
from cxrlabel.hospital.findings import SourceFilm, StudyFindings, derived_study_uid
from tests.hospital.test_sr import ALGORITHM, _film, _findings, assert_valid_dicom


def check_captures(paths: list[Path], study: StudyFindings, sources: list[pydicom.Dataset]) -> None:
    """Read the captures back with highdicom: one series, the study's, RGB, sources referenced."""
    captures = [hd.imread(p) for p in paths]
    assert len({c.SeriesInstanceUID for c in captures}) == 1
    assert {c.SeriesDescription for c in captures} == {SC_SERIES_DESCRIPTION}
    for c in captures:
        assert c.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert c.PhotometricInterpretation == "RGB" and c.SamplesPerPixel == 3
        if sources:
            assert c.StudyInstanceUID == sources[0].StudyInstanceUID
            assert c.PatientID == sources[0].PatientID
            assert c.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
            refs = {r.ReferencedSOPInstanceUID for r in c.SourceImageSequence}
            assert refs <= {s.SOPInstanceUID for s in sources} and refs
        else:
            assert c.StudyInstanceUID == derived_study_uid(study.patient_id, study.study_id)


def _heatmaps(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("Pleural_Effusion", "Edema", "contact_sheet"):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    return folder


def test_each_heatmap_is_an_rgb_capture_of_the_films_study(tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    film = _film(tmp_path / "a.dcm", study_uid, PatientOrientation=["P", "F"])
    source = pydicom.dcmread(film, stop_before_pixels=True)
    films = (SourceFilm(film, "a.dcm", True, _heatmaps(tmp_path / "heatmaps" / "000000_a")),)
    study = StudyFindings(study_uid, "PID-4711", films, _findings(), ALGORITHM)
    captures = heatmap_captures(study, [source])
    paths = []
    for k, sc in enumerate(captures):
        paths.append(tmp_path / f"sc{k}.dcm")
        sc.save_as(paths[-1], enforce_file_format=True)
        assert_valid_dicom(paths[-1])
    check_captures(paths, study, [source])
    by_text = {sc.DerivationDescription.split(" by ")[0]: sc for sc in captures}
    assert set(by_text) == {
        "Grad-CAM heatmap of Edema",
        "Grad-CAM heatmap of Pleural Effusion",
        "contact sheet of the Grad-CAM heatmaps",
    }
    sheet = by_text["contact sheet of the Grad-CAM heatmaps"]
    assert sheet.BurnedInAnnotation == "YES" and sheet.PatientOrientation == ""
    overlay = by_text["Grad-CAM heatmap of Edema"]
    assert list(overlay.PatientOrientation) == ["P", "F"]
    assert [sc.InstanceNumber for sc in captures] == [1, 2, 3]
    pixels = np.asarray(Image.open(films[0].heatmaps / "Edema.png").convert("RGB"))
    assert np.array_equal(overlay.pixel_array, pixels)


def test_a_non_dicom_films_heatmaps_join_the_derived_study(tmp_path: Path) -> None:
    folder = _heatmaps(tmp_path / "h")
    films = (SourceFilm(tmp_path / "f.png", "patient1/study1/f.png", False, folder),)
    study = StudyFindings("patient1/study1", "patient1", films, _findings(), ALGORITHM)
    paths = []
    for k, sc in enumerate(heatmap_captures(study)):
        assert sc.ImageComments == "heatmap of patient1/study1/f.png (not DICOM)"
        paths.append(tmp_path / f"sc{k}.dcm")
        sc.save_as(paths[-1], enforce_file_format=True)
        assert_valid_dicom(paths[-1])
    assert len(paths) == 3
    check_captures(paths, study, [])


def test_no_heatmaps_no_captures_and_a_missing_folder_is_named(tmp_path: Path) -> None:
    films = (SourceFilm(tmp_path / "f.png", "f.png", False),)
    assert heatmap_captures(StudyFindings("s", "p", films, _findings(), ALGORITHM)) == []
    gone = (SourceFilm(tmp_path / "f.png", "f.png", False, tmp_path / "gone"),)
    with pytest.raises(FileNotFoundError, match=r"gone: the heatmap folder of f\.png"):
        heatmap_captures(StudyFindings("s", "p", gone, _findings(), ALGORITHM))
