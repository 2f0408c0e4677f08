"""A study's heatmaps as DICOM Secondary Captures (highdicom), beside the films in the PACS.

Each PNG of each film's heatmap folder (one Grad-CAM overlay per label and the contact sheet,
as `cxrlabel label --heatmaps` draws them) becomes one RGB Secondary Capture Image; all of a
study's captures form ONE new series ("cxrlabel heatmaps") of the same study, with patient
and study modules copied from the films (they are patient data) or, for films that were not
DICOM, made by the SR's rule (`sr.study_header`). A capture of a DICOM film references it in
its Source Image Sequence and says what it shows in Derivation Description; overlays keep the
film's Patient Orientation (they are the film, resized), the contact sheet has none (it is a
grid of tiles) and is marked Burned In Annotation YES (its captions are drawn in).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.hospital import codes
from cxrlabel.hospital.findings import SourceFilm, StudyFindings
from cxrlabel.hospital.sr import (
    MANUFACTURER,
    blank_invalid_values,
    coded,
    quiet_patient_data,
    study_header,
)

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "cxrlabel heatmaps"
CONTACT_SHEET = "contact_sheet.png"
_ORIENTATIONS = {"A", "P", "R", "L", "H", "F"}


def _label_of(stem: str) -> str:
    """The observation an overlay file is named after (batch names it with unsafe characters
    replaced by "_"), else the file's stem."""
    safe = {re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_"): name for name in OBSERVATIONS}
    return safe.get(stem, stem)


def _orientation(header: Dataset | None) -> tuple[str, str] | None:
    """The film's Patient Orientation when highdicom can carry it (one letter per axis)."""
    value = list(header.get("PatientOrientation") or []) if header is not None else []
    if len(value) == 2 and all(str(v) in _ORIENTATIONS for v in value):
        return str(value[0]), str(value[1])
    return None


def _rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable heatmap PNG ({e})") from e


def _source_reference(header: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [coded(codes.SOURCE_FOR_PROCESSING)]
    return item


def _films_with_headers(
    study: StudyFindings, sources: Sequence[Dataset] | None
) -> list[tuple[SourceFilm, Dataset | None]]:
    """Each film with heatmaps and its header: `sources` are the headers of
    `study.dicom_films`, in that order (when the counts differ, no film is matched)."""
    dicom = study.dicom_films
    matched = (
        dict(zip(dicom, sources, strict=True)) if sources and len(sources) == len(dicom) else {}
    )
    return [(f, matched.get(f)) for f in study.films if f.heatmaps is not None]


def heatmap_captures(
    study: StudyFindings, sources: Sequence[Dataset] | None = None
) -> list[Dataset]:
    """One RGB Secondary Capture per heatmap PNG of `study`'s films, in one new series.

    `sources`: the headers of `study.dicom_films` in that order (as for `sr.study_sr`). Empty
    when no film has heatmaps. A heatmap folder that is missing is an error naming it.
    """
    header = study_header(study, list(sources or ()))
    series_uid = generate_uid()
    captures: list[Dataset] = []
    with quiet_patient_data():
        for film, film_header in _films_with_headers(study, sources):
            folder = film.heatmaps
            assert folder is not None  # _films_with_headers keeps films with heatmaps only
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder}: the heatmap folder of {film.display} is missing"
                )
            pngs = sorted(folder.glob("*.png"), key=lambda p: (p.name == CONTACT_SHEET, p.name))
            for png in pngs:
                captures.append(
                    _capture(study, png, film, film_header or header, film_header is not None,
                             series_uid, len(captures) + 1)
                )  # fmt: skip
    return captures


def _capture(
    study: StudyFindings,
    png: Path,
    film: SourceFilm,
    ref: Dataset,
    ref_is_film: bool,
    series_uid: str,
    number: int,
) -> Dataset:
    sheet = png.name == CONTACT_SHEET
    orientation = None if sheet else _orientation(ref if ref_is_film else None)
    algorithm = study.algorithm
    what = (
        "contact sheet of the Grad-CAM heatmaps"
        if sheet
        else f"Grad-CAM heatmap of {_label_of(png.stem)}"
    )
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=_rgb(png),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=number,
        manufacturer=MANUFACTURER,
        # highdicom needs an orientation in the patient coordinate system; replaced below
        # where the image has none.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm.name[:64] or None,
        software_versions=algorithm.version,
        device_serial_number=algorithm.model_id,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )
    if orientation is None:
        sc.PatientOrientation = ""  # Type 2C: known to be none (a sheet, or no film header)
    sc.DerivationDescription = f"{what} by cxrlabel {algorithm.name} (model {algorithm.model_id})"
    sc.BurnedInAnnotation = "YES" if sheet else "NO"
    if "Laterality" not in sc:
        # Type 2C (dciodvfy asks for it): the film's, else empty (a chest is not paired).
        sc.Laterality = str(ref.get("Laterality", "")) if ref_is_film else ""
    if not ref_is_film:
        sc.ImageComments = f"heatmap of {film.display} (not DICOM)"
    else:
        sc.SourceImageSequence = [_source_reference(ref)]
    blank_invalid_values(sc)
    return sc


__all__ = ["CONTACT_SHEET", "SC_SERIES_DESCRIPTION", "heatmap_captures"]
