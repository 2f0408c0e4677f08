"""Dataset adapters: each public label format mapped onto one LabelTable (CheXpert layout).

One function per format; `load_table` picks one by looking at the CSV's columns.

- CheXpert (`train.csv`/`valid.csv`): Path, Sex, Age, Frontal/Lateral, AP/PA and the 14
  observations valued 1.0, 0.0, -1.0 or blank. Blank = not mentioned in the report (negative).
  Patient and study ids come from the `patientXXXXX/studyN/` path components.
- MIMIC-CXR-JPG: the metadata CSV (dicom_id, subject_id, study_id, ViewPosition) joined on
  (subject_id, study_id) with a label CSV (`mimic-cxr-2.0.0-chexpert.csv` or `-negbio.csv`:
  the same 14 columns and values as CheXpert). Path is
  `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`. Blank = not mentioned (negative). Sex and Age are
  not in these files and stay blank.
- NIH ChestX-ray14 (`Data_Entry_2017*.csv`): `Finding Labels` like `Atelectasis|Effusion`
  mapped by NIH_TO_CHEXPERT; observations NIH never labels are blank = unknown (masked).
  Path is `<image_dir>/<Image Index>`; study = patient + follow-up number.
- Generic: a CSV with `Path` and any subset of the 14 columns (the layout of
  `shared/data/nih-cxr14/labels.csv`). Blank means unknown unless told otherwise. Patient ids
  come from a `Patient ID`/`patient_id` column (studies from `Study ID`/`study_id`), else from a
  CheXpert-style path, else each image is its own patient (logged, because a patient-level
  split is then only an image-level one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlabel.csvcells import restore_frame
from cxrlabel.data.csvfiles import PathGuard, check_path, not_utf8_error
from cxrlabel.data.labels import (
    OBSERVATIONS,
    BlankMeaning,
    LabelError,
    LabelTable,
    ensure_ids,
    parse_label_column,
    table_from_columns,
)
from cxrlabel.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

FORMATS = ("auto", "chexpert", "mimic", "nih", "generic")

# NIH finding name -> CheXpert observation. Mass and Nodule both mean Lung Lesion; NIH's
# Pleural_Thickening is the nearest thing to Pleural Other. Infiltration, Emphysema, Fibrosis
# and Hernia have no CheXpert column and are dropped.
NIH_TO_CHEXPERT: dict[str, str] = {
    "No Finding": "No Finding",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}

_NIH_UNMAPPED = frozenset({"Infiltration", "Emphysema", "Fibrosis", "Hernia"})

# Id columns a generic CSV may carry, by the names common datasets use.
_GENERIC_ID_COLUMNS = {
    "patient_id": ("patient_id", "Patient ID", "subject_id", "Subject ID"),
    "study_id": ("study_id", "Study ID", "StudyInstanceUID"),
}

_MIMIC_VIEWS = {"PA": "Frontal", "AP": "Frontal", "LATERAL": "Lateral", "LL": "Lateral"}


def read_csv_text(path: Path, *, nrows: int | None = None) -> pd.DataFrame:
    """Read a CSV keeping every cell as text, so blank and '0' are never confused. Cells the
    project's writers escaped against spreadsheet formulas are restored (cxrlabel.csvcells),
    so its own outputs read back as they were."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: label file not found")
    try:
        frame = pd.read_csv(
            path, dtype=str, keep_default_na=False, nrows=nrows, encoding="utf-8-sig"
        )
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
        raise LabelError(f"{path}: not a readable CSV ({exc})") from exc
    return restore_frame(frame)


def check_table_paths(
    table: LabelTable,
    *,
    allow_outside: bool,
    source: str | Path | None = None,
    lines: Sequence[int] | None = None,
) -> LabelTable:
    """The table, once every `Path` is known to stay inside its root (cxrlabel.data.csvfiles);
    else OutsidePathError naming the CSV, the line (`lines[i]`, default row + 2) and the path."""
    if allow_outside:
        return table
    guard = PathGuard(table.root)
    for i, text in enumerate(table.frame["Path"].astype(str)):
        line = lines[i] if lines is not None else i + 2
        check_path(guard, text, source=source or table.source, line=line, allow_outside=False)
    return table


def _parse_observations(
    frame: pd.DataFrame, source: str, *, required: bool
) -> dict[str, np.ndarray]:
    present = [o for o in OBSERVATIONS if o in frame.columns]
    if required and len(present) != len(OBSERVATIONS):
        missing = [o for o in OBSERVATIONS if o not in frame.columns]
        raise LabelError(f"{source}: missing observation columns {missing}")
    if not present:
        raise LabelError(f"{source}: no CheXpert observation columns found")
    return {o: parse_label_column(frame[o], o, source=source) for o in present}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a NUL in the name, a name too long: the path rule reports it
        return False


def _dataset_root(csv_path: Path, first_path: str) -> Path:
    """Folder that `Path` entries are relative to.

    CheXpert's CSVs sit inside `CheXpert-v1.0-small/` yet their paths start with that folder's
    name, so the root is then the CSV folder's parent.
    """
    folder = csv_path.resolve().parent
    head = Path(first_path).parts[0] if first_path else ""
    if head != folder.name or _exists(folder / first_path):
        # A dataset written into a folder that happens to share its first path component's
        # name (e.g. `train/`) keeps its own folder as root when the file is found there.
        return folder
    return folder.parent


def read_chexpert(csv_path: Path, *, allow_outside_paths: bool = False) -> LabelTable:
    """A CheXpert `train.csv` / `valid.csv`."""
    csv_path = Path(csv_path)
    frame = read_csv_text(csv_path)
    missing = [c for c in ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") if c not in frame]
    if missing:
        raise LabelError(f"{csv_path}: not a CheXpert CSV, missing columns {missing}")
    values = _parse_observations(frame, str(csv_path), required=True)
    root = _dataset_root(csv_path, frame["Path"].iloc[0] if len(frame) else "")
    table = table_from_columns(
        frame, root=root, source=str(csv_path), blank=BlankMeaning.NEGATIVE, label_values=values
    )
    check_table_paths(table, allow_outside=allow_outside_paths)
    return ensure_ids(table, fallback="error")


def read_mimic(
    metadata_csv: Path, labels_csv: Path, *, allow_outside_paths: bool = False
) -> LabelTable:
    """MIMIC-CXR-JPG: metadata (one row per image) joined with study-level labels."""
    metadata_csv, labels_csv = Path(metadata_csv), Path(labels_csv)
    meta = read_csv_text(metadata_csv)
    labels = read_csv_text(labels_csv)
    for name, frame, need in (
        (metadata_csv, meta, ("dicom_id", "subject_id", "study_id")),
        (labels_csv, labels, ("subject_id", "study_id")),
    ):
        missing = [c for c in need if c not in frame]
        if missing:
            raise LabelError(f"{name}: not a MIMIC-CXR CSV, missing columns {missing}")
    # Parse before joining so an error names the label file's own line.
    values = _parse_observations(labels, str(labels_csv), required=True)
    parsed = labels[["subject_id", "study_id"]].assign(**values)
    meta = meta.assign(_line=range(2, len(meta) + 2))  # the metadata line a path comes from
    joined = meta.merge(parsed, on=["subject_id", "study_id"], how="inner", validate="m:1")
    dropped = len(meta) - len(joined)
    if dropped:
        log.info(
            "%s: %d images have no row in %s and are left out",
            metadata_csv,
            dropped,
            labels_csv.name,
        )
    subject = joined["subject_id"]
    frame = pd.DataFrame(
        {
            "Path": "files/p"
            + subject.str[:2]
            + "/p"
            + subject
            + "/s"
            + joined["study_id"]
            + "/"
            + joined["dicom_id"]
            + ".jpg",
            "patient_id": subject,
            "study_id": subject + "/" + joined["study_id"],
        }
    )
    if "ViewPosition" in joined:
        view = joined["ViewPosition"].str.upper()
        frame["Frontal/Lateral"] = view.map(_MIMIC_VIEWS).fillna("")
        frame["AP/PA"] = view.where(view.isin(["AP", "PA"]), "")
    table = table_from_columns(
        frame,
        root=metadata_csv.resolve().parent,
        source=str(labels_csv),
        blank=BlankMeaning.NEGATIVE,
        label_values={o: joined[o].to_numpy() for o in values},
    )
    return check_table_paths(
        table, allow_outside=allow_outside_paths, source=metadata_csv, lines=list(joined["_line"])
    )


def read_nih(
    csv_path: Path, image_dir: str = "images", *, allow_outside_paths: bool = False
) -> LabelTable:
    """NIH ChestX-ray14 `Data_Entry_2017*.csv`."""
    csv_path = Path(csv_path)
    frame = read_csv_text(csv_path)
    missing = [c for c in ("Image Index", "Finding Labels", "Patient ID") if c not in frame]
    if missing:
        raise LabelError(f"{csv_path}: not an NIH Data_Entry CSV, missing columns {missing}")
    findings = frame["Finding Labels"].str.split("|")
    known = set(NIH_TO_CHEXPERT)
    for line, names in enumerate(findings, start=2):
        unknown = [n for n in names if n not in known and n not in _NIH_UNMAPPED]
        if unknown:
            raise LabelError(f"{csv_path}: line {line}: unknown NIH finding(s) {unknown}")
    values: dict[str, np.ndarray] = {}
    for nih, chexpert in NIH_TO_CHEXPERT.items():
        hit = findings.map(lambda names, n=nih: n in names).to_numpy(dtype=np.float64)
        values[chexpert] = np.maximum(values.get(chexpert, 0.0), hit)

    def column(name: str, default: str = "") -> pd.Series:
        return frame[name] if name in frame else pd.Series(default, index=frame.index)

    follow_up = column("Follow-up #", "0")
    view = column("View Position").str.upper()
    canonical = pd.DataFrame(
        {
            "Path": image_dir.rstrip("/") + "/" + frame["Image Index"],
            "Sex": column("Patient Gender").map({"M": "Male", "F": "Female"}).fillna(""),
            "Age": column("Patient Age"),
            # NIH holds frontal films only.
            "Frontal/Lateral": "Frontal",
            "AP/PA": view.where(view.isin(["AP", "PA"]), ""),
            "patient_id": frame["Patient ID"],
            "study_id": frame["Patient ID"] + "/" + follow_up,
        }
    )
    table = table_from_columns(
        canonical,
        root=csv_path.resolve().parent,
        source=str(csv_path),
        blank=BlankMeaning.UNKNOWN,
        label_values=values,
    )
    return check_table_paths(table, allow_outside=allow_outside_paths)


def read_generic(
    csv_path: Path,
    blank: BlankMeaning | str = BlankMeaning.UNKNOWN,
    *,
    allow_outside_paths: bool = False,
) -> LabelTable:
    """A CSV with `Path` and any subset of the 14 observation columns."""
    csv_path = Path(csv_path)
    frame = read_csv_text(csv_path)
    if "Path" not in frame:
        raise LabelError(f"{csv_path}: no 'Path' column")
    values = _parse_observations(frame, str(csv_path), required=False)
    canonical = frame.copy()
    for target, names in _GENERIC_ID_COLUMNS.items():
        found = next((c for c in names if c in frame), None)
        if found is not None:
            canonical[target] = frame[found]
    if "Frontal/Lateral" not in frame and "View Position" in frame:
        view = frame["View Position"].str.upper()
        canonical["Frontal/Lateral"] = view.map(_MIMIC_VIEWS).fillna("")
        canonical["AP/PA"] = view.where(view.isin(["AP", "PA"]), "")
    if "Sex" not in frame and "Patient Gender" in frame:
        canonical["Sex"] = frame["Patient Gender"].map({"M": "Male", "F": "Female"}).fillna("")
    if "Age" not in frame and "Patient Age" in frame:
        canonical["Age"] = frame["Patient Age"]
    table = table_from_columns(
        canonical,
        root=_dataset_root(csv_path, frame["Path"].iloc[0] if len(frame) else ""),
        source=str(csv_path),
        blank=BlankMeaning(blank),
        label_values=values,
    )
    check_table_paths(table, allow_outside=allow_outside_paths)
    table = ensure_ids(table, fallback="path")
    if (table.frame["patient_id"] == table.frame["Path"]).any():
        log.warning(
            "%s: some images have no patient id; each counts as its own patient, so a "
            "patient-level split cannot be guaranteed for them",
            csv_path,
        )
    return table


def detect_format(columns: Mapping[str, object] | list[str]) -> str:
    """Guess a CSV's format from its header."""
    cols = set(columns)
    if {"Image Index", "Finding Labels"} <= cols:
        return "nih"
    if {"subject_id", "study_id"} <= cols and "Path" not in cols:
        return "mimic"
    if {"Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"} <= cols and set(OBSERVATIONS) <= cols:
        return "chexpert"
    if "Path" in cols:
        return "generic"
    raise LabelError(f"cannot tell the label format from columns {sorted(cols)[:8]}...")


def _detect_file_format(csv_path: Path) -> str:
    """detect_format on a file's header; the error names the file."""
    if not csv_path.is_file():
        return "generic"  # read_generic reports the missing file
    header = read_csv_text(csv_path, nrows=0).columns
    try:
        return detect_format(list(header))
    except LabelError as exc:
        raise LabelError(f"{csv_path}: {exc}") from None


def load_table(
    csv_path: Path,
    fmt: str = "auto",
    *,
    mimic_metadata: Path | None = None,
    nih_image_dir: str = "images",
    blank: BlankMeaning | str | None = None,
    allow_outside_paths: bool = False,
) -> LabelTable:
    """Load any supported label file as a LabelTable.

    `blank` overrides the format's blank meaning (e.g. a generic CSV from a dataset where
    blank means negative). A `Path` that leads outside the CSV's root is an OutsidePathError
    unless `allow_outside_paths` (cxrlabel.data.csvfiles).
    """
    csv_path = Path(csv_path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "auto":
        fmt = _detect_file_format(csv_path)
    allow = allow_outside_paths
    if fmt == "chexpert":
        table = read_chexpert(csv_path, allow_outside_paths=allow)
    elif fmt == "mimic":
        if mimic_metadata is None:
            raise LabelError(f"{csv_path}: MIMIC-CXR labels need the metadata CSV as well")
        table = read_mimic(mimic_metadata, csv_path, allow_outside_paths=allow)
    elif fmt == "nih":
        table = read_nih(csv_path, image_dir=nih_image_dir, allow_outside_paths=allow)
    else:
        table = read_generic(
            csv_path, blank=blank or BlankMeaning.UNKNOWN, allow_outside_paths=allow
        )
    if blank is not None and BlankMeaning(blank) is not table.blank:
        table = replace(table, blank=BlankMeaning(blank))
    return table


# Written beside train.csv / valid.csv by the synthetic generator so that any later reader
# (evaluation reports) can tell that the films are synthetic: `is_synthetic_dataset(csv_path)`
# looks for it in the CSV's folder. The data layer owns it because it is what a dataset folder
# says about itself; readers need not import the generator.
SYNTHETIC_MARKER = "synthetic.json"
_SYNTHETIC_GENERATOR = "cxrlabel.synth"


def write_synthetic_marker(out: Path, *, patients: int, size: int, seed: int) -> Path:
    """Write `out`/synthetic.json, which marks the folder's CSVs as drawn by cxrlabel.synth."""
    marker = {
        "generator": _SYNTHETIC_GENERATOR,
        "synthetic": True,
        "note": "synthetic chest radiographs drawn by cxrlabel, not patients",
        "patients": patients,
        "size": size,
        "seed": seed,
    }
    path = Path(out) / SYNTHETIC_MARKER
    atomic_write_bytes(path, (json.dumps(marker, indent=2) + "\n").encode("utf-8"))
    return path


def is_synthetic_dataset(csv_path: Path) -> bool:
    """True when `csv_path` lies in a folder written by `write_dataset` (its marker file)."""
    marker = Path(csv_path).parent / SYNTHETIC_MARKER
    if not marker.is_file():
        return False
    try:
        generator = json.loads(marker.read_text(encoding="utf-8")).get("generator")
    except (ValueError, AttributeError):
        return False
    return generator == _SYNTHETIC_GENERATOR
