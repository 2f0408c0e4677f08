"""External predictions: another model's probabilities file (cxrlabel label output, out-of-fold
scores, a published model's predictions) read as `Predictions` against a labelled table, its
rows matched on path suffix or file stem and its columns on observation names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlabel.csvcells import restore_frame
from cxrlabel.data.labels import OBSERVATIONS, LabelTable, ensure_ids, filter_view
from cxrlabel.evaluation.results import Predictions
from cxrlabel.evaluation.scoring import describe_data, is_synthetic
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)


def prediction_columns(columns: Sequence[str]) -> dict[str, str]:
    """Probability columns -> observations: the observation's own name, optionally prefixed
    `prob_`, or an NIH name (`prob_Effusion`) that maps to exactly one observation."""
    from cxrlabel.data.formats import NIH_TO_CHEXPERT

    targets: dict[str, list[str]] = {}
    for column in columns:
        raw = column.removeprefix("prob_")
        spaced = raw.replace("_", " ")
        observation = spaced if spaced in OBSERVATIONS else NIH_TO_CHEXPERT.get(raw)
        if observation is not None:
            targets.setdefault(observation, []).append(column)
    # Several columns for one observation (NIH Mass and Nodule -> Lung Lesion) are ambiguous.
    return {obs: cols[0] for obs, cols in targets.items() if len(cols) == 1}


def _unique_index(values: Sequence[str]) -> dict[str, int]:
    """value -> row for values that occur exactly once (a repeated value matches nothing)."""
    seen: dict[str, int] = {}
    repeated: set[str] = set()
    for i, v in enumerate(values):
        if v in seen:
            repeated.add(v)
        seen[v] = i
    return {v: i for v, i in seen.items() if v not in repeated}


def _match_rows(keys: pd.Series, table: LabelTable, source: Path) -> np.ndarray:
    """For each table row, the index of its prediction row (-1 if none).

    A prediction path matches a label path when it ends with it (`cxrlabel label` writes the
    paths it was given, e.g. absolute or `data/valid/patient1/...` for `valid/patient1/...`),
    else when their file stems are equal and unique on both sides (a film may have been
    converted: NIH's PNGs are shared as JPEGs).
    """
    keys = keys.astype(str).str.replace("\\", "/", regex=False).str.lstrip("./")
    table_paths = table.frame["Path"].astype(str).str.replace("\\", "/", regex=False)
    # Every trailing run of path components of a prediction path, as a lookup key.
    suffixes: list[tuple[str, int]] = []
    for i, key in enumerate(keys):
        parts = key.split("/")
        suffixes += [("/".join(parts[-n:]), i) for n in range(1, len(parts) + 1)]
    by_suffix = _unique_index([s for s, _ in suffixes])
    row_of = {s: i for s, i in suffixes}
    by_stem = _unique_index([Path(k).stem for k in keys])
    table_stems = [Path(p).stem for p in table_paths]
    unique_stems = _unique_index(table_stems)
    rows = []
    for path, stem in zip(table_paths, table_stems, strict=True):
        path = path.lstrip("./")
        if path in by_suffix:
            rows.append(row_of[path])
        elif stem in unique_stems and stem in by_stem:
            rows.append(by_stem[stem])
        else:
            rows.append(-1)
    if all(r < 0 for r in rows):
        raise ValueError(f"{source}: no prediction row matches an image of {table.source}")
    return np.asarray(rows)


def read_predictions(
    path: Path,
    table: LabelTable,
    *,
    model: str | None = None,
    policy: str = "U-Ignore",
    view: str = "all",
) -> Predictions:
    """Probabilities from a CSV scored against a label table's labels.

    The CSV has a `Path` (or NIH `Image Index`) column and one probability column per
    observation (`cxrlabel label`'s probabilities.csv, or another model's output such as the
    NIH reference predictions). Rows are matched on the path, else on the file stem. A JSON
    file beside it (same name, .json) may give "model", "kind" and "notes" for the report.
    Labelled images without a prediction are left out, and the Predictions' notes say so.
    """
    path = Path(path)
    frame = restore_frame(pd.read_csv(path))  # cells escaped by cxrlabel's writers
    key = next((c for c in ("Path", "Image Index") if c in frame.columns), None)
    if key is None:
        raise ValueError(f"{path}: predictions need a 'Path' or 'Image Index' column")
    table = ensure_ids(filter_view(table, view))
    columns = prediction_columns(list(frame.columns))
    predicted = [o for o in OBSERVATIONS if o in columns]
    no_match = f"{path}: no probability column matches an observation {table.source} labels"
    if not predicted:
        raise ValueError(no_match)
    targets, mask = table.targets(predicted, policy)
    labelled = mask.any(axis=0)  # only observations the label file actually labels
    labels = [o for o, keep in zip(predicted, labelled, strict=True) if keep]
    if not labels:
        raise ValueError(no_match)
    targets, mask = targets[:, labelled], mask[:, labelled]
    rows = _match_rows(frame[key], table, path)
    found = rows >= 0
    scores = frame[[columns[o] for o in labels]].to_numpy(np.float64)[rows[found]]
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise ValueError(f"{path}: probabilities must be finite and within [0, 1]")
    side = path.with_suffix(".json")
    about = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
    notes = list(about.get("notes", []))
    if not found.all():
        notes.append(f"{int((~found).sum())} labelled image(s) had no prediction in {path.name}")
        log.warning("%s: %s", path, notes[-1])
    kept = table.frame[found]
    return Predictions(
        labels=tuple(labels),
        paths=tuple(kept["Path"].astype(str)),
        patient_ids=tuple(kept["patient_id"].astype(str)),
        study_ids=tuple(kept["study_id"].astype(str)),
        y_score=scores,
        y_true=np.asarray(targets[found], dtype=np.float64),
        mask=np.asarray(mask[found], dtype=bool),
        thresholds=Thresholds.fixed(labels),
        model=model or about.get("model") or path.stem,
        kind=about.get("kind", "external predictions"),
        data=describe_data(table, view),
        synthetic=is_synthetic(table),
        notes=tuple(notes),
    )
