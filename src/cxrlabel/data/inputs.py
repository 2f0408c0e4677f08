"""Input discovery: files, folders (recursive) and CSVs with a `Path` column -> films to label,
and what their paths, CSV columns and DICOM tags say about patient, study and view.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrlabel.csvcells import restore
from cxrlabel.data.csvfiles import PathGuard, not_utf8_error, outside_message
from cxrlabel.data.images import DICOM_SUFFIXES
from cxrlabel.data.labels import OBSERVATIONS, LabelError, chexpert_ids, parse_label_cell

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"}) | DICOM_SUFFIXES

# DICOM ViewPosition values (and CSV view columns) that mean a lateral projection. Decubitus
# views (LLD/RLD) are frontal projections taken lying on one side, so they are not here.
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
FRONTAL_VIEWS = frozenset({"PA", "AP", "APS", "APL", "FRONTAL", "AP SUPINE", "AP ERECT"})
_MIMIC_PATH_RE = re.compile(r"(?:^|/)p\d+/(p\d+)/(s\d+)/")


@dataclass(frozen=True)
class InputItem:
    """One film to label: where it is, how outputs name it, and what a CSV said about it.

    `refused` says why the film must not be read (its CSV path leads outside the CSV's root);
    labelling reports it in errors.csv instead."""

    path: Path
    display: str
    patient_id: str = ""
    study_id: str = ""
    view: str = ""
    refused: str = ""


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _walk_folder(folder: Path, display: str, exclude: Path | None) -> Iterator[InputItem]:
    """Image files under `folder`, sorted, lazily. Hidden entries and `exclude` are skipped."""
    excluded = exclude.resolve() if exclude is not None else None
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (here / d).resolve() != excluded
        )
        for name in sorted(files):
            path = here / name
            if name.startswith("."):
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (not suffix and _is_dicom_file(path)):
                rel = path.relative_to(folder).as_posix()
                yield InputItem(path, f"{display.rstrip('/')}/{rel}" if display else rel)


def _csv_value(row: dict[str, str], *names: str) -> str:
    for name in names:
        value = restore((row.get(name) or "").strip())
        if value:
            return value
    return ""


def _csv_rows(csv_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV input with a `Path` column, lazily; text that is not UTF-8 is a
    NotUtf8Error naming the file and line."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "Path" not in reader.fieldnames:
                raise LabelError(f"{csv_path}: a CSV input needs a 'Path' column")
            try:
                for row in reader:
                    yield reader.line_num, row
            except csv.Error as exc:  # e.g. a cell over csv's field size limit
                raise LabelError(f"{csv_path}: line {reader.line_num}: {exc}") from None
    except UnicodeDecodeError:
        raise not_utf8_error(csv_path) from None


def check_csv_input(csv_path: Path) -> None:
    """Fail now, naming the file, line and column, on a CSV input that is not UTF-8, has no
    `Path` column or holds a label value that stats, prepare and training would reject; one
    streaming pass, so a 200,000-row CSV costs a second, not an hour of labelling first."""
    for line, row in _csv_rows(csv_path):
        for column in OBSERVATIONS:
            cell = row.get(column)
            if cell:  # also None for a short row
                parse_label_cell(restore(cell), column, source=str(csv_path), line=line)


def _walk_csv(csv_path: Path, allow_outside_paths: bool = False) -> Iterator[InputItem]:
    """Rows of a CSV with a `Path` column (relative to the CSV's folder, or its parent for
    CheXpert's own CSVs), lazily. A path that leads outside that root comes back `refused`
    (see cxrlabel.data.csvfiles) unless `allow_outside_paths`."""
    from cxrlabel.data.formats import _dataset_root

    root: Path | None = None
    guard: PathGuard | None = None
    for line, row in _csv_rows(csv_path):
        text = restore((row.get("Path") or "").strip())
        if not text:
            continue
        if root is None or guard is None:
            root = _dataset_root(csv_path, text)
            guard = PathGuard(root)
        path = Path(text) if Path(text).is_absolute() else root / text
        reason = None if allow_outside_paths else guard.reason(text)
        refused = outside_message(csv_path, line, text, reason) if reason else ""
        view = _csv_value(row, "Frontal/Lateral", "View Position", "ViewPosition")
        patient = _csv_value(row, "patient_id", "Patient ID", "subject_id")
        study = _csv_value(row, "study_id", "Study ID", "StudyInstanceUID")
        yield InputItem(path, text, patient, f"{patient}/{study}" if study else "", view, refused)


def check_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Every input must exist (a typo fails now, not after an hour of labelling)."""
    if not inputs:
        raise ValueError("no input given: name image files, folders or a CSV")
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    return paths


def iter_inputs(
    inputs: Sequence[str | Path],
    *,
    exclude: Path | None = None,
    allow_outside_paths: bool = False,
) -> Iterator[InputItem]:
    """Files, folders (recursive) and CSVs -> films to label, in a fixed order, lazily.
    A CSV's rows whose paths leave its root come back `refused` unless `allow_outside_paths`."""
    for path in check_inputs(inputs):
        if path.is_dir():
            yield from _walk_folder(path, str(path) if str(path) != "." else "", exclude)
        elif path.suffix.lower() == ".csv":
            yield from _walk_csv(path, allow_outside_paths)
        else:
            yield InputItem(path, str(path))


def view_from_text(value: str) -> str:
    """'frontal', 'lateral' or '' from a view column or DICOM ViewPosition value."""
    text = value.strip().upper()
    if text in LATERAL_VIEWS:
        return "lateral"
    if text in FRONTAL_VIEWS:
        return "frontal"
    return ""


def view_from_name(path: str) -> str:
    """CheXpert names files view1_frontal.jpg / view2_lateral.jpg."""
    stem = Path(path).stem.lower()
    if "lateral" in stem:
        return "lateral"
    if "frontal" in stem:
        return "frontal"
    return ""


def ids_from_path(path: str) -> tuple[str, str]:
    """(patient, study) from a CheXpert (patientN/studyM/) or MIMIC (pXX/pN/sM/) path."""
    found = chexpert_ids(path)
    if found is not None:
        return found
    match = _MIMIC_PATH_RE.search(path.replace("\\", "/"))
    if match is not None:
        patient, study = match.groups()
        return patient, f"{patient}/{study}"
    return "", ""
