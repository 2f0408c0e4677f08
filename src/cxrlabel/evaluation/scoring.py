"""Evaluating saved models on labelled data: one model or an ensemble, per image or per study.

`evaluate(models, [(name, table), ...])` loads the checkpoints named by `models` (run folders,
`RUN:bestK`, checkpoint files; several make an ensemble that averages probabilities), scores
every dataset, optionally forms studies (max or mean over a study's views, as the CheXpert
paper scores its validation set) and returns one `metrics.Evaluation` per dataset. Decision
thresholds are the ones stored with the model (`cxrlabel thresholds` / `RunConfig.
threshold_rule`), or chosen here on the first dataset by a named rule.

Each evaluation's `Predictions` say which model and kind ("single model", "ensemble of N
checkpoints"), which data (and whether they are cxrlabel's synthetic films, recognised by the
marker file `synth.write_dataset` leaves beside its CSVs), and which unit.

`evaluation_record` / `save_evaluations` write the JSON that `compare_runs` reads beside a
report; `markdown_table` is the one formatter for the command-line tables (evaluate, compare
and the sweep).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxrlabel.data.formats import is_synthetic_dataset
from cxrlabel.data.images import ImageError, read_image
from cxrlabel.data.labels import OBSERVATIONS, LabelTable, ensure_ids, filter_view
from cxrlabel.evaluation.metrics import METRIC_NAMES, Evaluation, evaluate_predictions
from cxrlabel.evaluation.results import STUDY_AGGREGATES, UNITS, Predictions
from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.predictor import Predictor, shared_resize
from cxrlabel.models.thresholds import Thresholds, choose_thresholds

if TYPE_CHECKING:
    from cxrlabel.models.ensemble import Ensemble

log = logging.getLogger(__name__)

DEFAULT_DATA_NAMES = ("validation", "test")
EVALUATION_FILE = "evaluation.json"
# The method's summary columns (Table I / II: Acc, Prec, Recall, F Score, AUROC).
SUMMARY_METRICS = ("Accuracy", "Precision", "Recall", "F1", "AUROC")

ModelSpecs = Sequence[str | Path]


# --------------------------------------------------------------------------------------------
# What the data are
# --------------------------------------------------------------------------------------------


def is_synthetic(table: LabelTable) -> bool:
    """True when the table's CSV came from cxrlabel's generator (see `synth.SYNTHETIC_MARKER`)."""
    return is_synthetic_dataset(Path(table.source))


def describe_data(table: LabelTable, view: str) -> str:
    """E.g. "synthetic valid.csv (cxrlabel generator), frontal views: 58 images, 50 studies"."""
    name = Path(table.source).name
    what = f"synthetic {name} (cxrlabel generator)" if is_synthetic(table) else name
    views = "all views" if view == "all" else f"{view} views"
    frame = table.frame
    studies = frame["study_id"].nunique() if "study_id" in frame else len(frame)
    return f"{what}, {views}: {len(frame)} images, {studies} studies"


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def predict_datasets(
    ensemble: Ensemble,
    data: Sequence[tuple[str, LabelTable]],
    *,
    policy: str = "U-Ignore",
    view: str = "frontal",
    batch_size: int = 32,
) -> list[Predictions]:
    """Image-level predictions of `ensemble` on each (name, table), described and marked."""
    out = []
    for name, table in data:
        table = filter_view(table, view)
        if not len(table):
            raise ValueError(f"{table.source}: no {view} images to evaluate ({name})")
        pred = predict_table(ensemble, table, policy=policy, batch_size=batch_size)
        out.append(
            pred.replace(
                model=ensemble.name,
                kind=ensemble.kind,
                data=describe_data(table, view),
                synthetic=is_synthetic(table),
            )
        )
        log.info("%s: scored %d images with %s (%s)", name, len(pred), ensemble.name, pred.kind)
    return out


def predict_table(
    model: Predictor,
    table: LabelTable,
    *,
    policy: str = "U-Ignore",
    batch_size: int = 32,
) -> Predictions:
    """Score every readable image of a labelled table with any model (an Ensemble or an
    OnnxModel); unreadable images are skipped and logged. Targets and mask follow `policy`
    for the model's labels.

    Each film is decoded once and goes through `predict_images`, as `cxrlabel label` scores
    it, so both give the same probabilities. When every member resizes alike, the film is
    resized as soon as it is read (`predict_images` then leaves it as it is) and only
    model-sized films are held; otherwise a batch holds the films as read.
    """
    table = ensure_ids(table)
    paths = table.image_paths()
    geometry = shared_resize([model])
    rows: list[int] = []
    scores: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        films, batch_rows = [], []
        for row in range(start, min(start + batch_size, len(paths))):
            try:
                image = read_image(paths[row])
            except ImageError as exc:
                log.warning("skipping: %s", exc)
                continue
            films.append(image if geometry is None else geometry.apply(image))
            batch_rows.append(row)
        if films:
            scores.append(np.asarray(model.predict_images(films), dtype=np.float64))
            rows.extend(batch_rows)
    if not rows:
        raise ValueError(f"{table.source}: no readable image to score")
    targets, mask = table.targets(model.labels, policy)
    frame = table.frame.iloc[rows]
    return Predictions(
        labels=tuple(model.labels),
        paths=tuple(str(p) for p in frame["Path"]),
        patient_ids=tuple(str(p) for p in frame["patient_id"]),
        study_ids=tuple(str(s) for s in frame["study_id"]),
        y_score=np.concatenate(scores),
        y_true=np.asarray(targets[rows], dtype=np.float64),
        mask=np.asarray(mask[rows], dtype=bool),
        thresholds=model.thresholds,
        model=model.name,
        kind=model.kind,
        data=table.source,
    )


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
    frame = pd.read_csv(path)
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


def check_unit(unit: str, aggregate: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
    if aggregate not in STUDY_AGGREGATES:
        raise ValueError(f"aggregate must be one of {STUDY_AGGREGATES}, not {aggregate!r}")


def at_unit(pred: Predictions, unit: str, aggregate: str) -> Predictions:
    """`pred` per image, or per study with the study's max (or mean) probability."""
    check_unit(unit, aggregate)
    return pred.to_study_level(aggregate) if unit == "study" else pred


def rechoose_thresholds(
    preds: Sequence[Predictions], rule: str, *, band: float = 0.0, chosen_on: str = ""
) -> list[Predictions]:
    """All `preds` with thresholds chosen by `rule` on the first one (e.g. the validation set)."""
    first = preds[0]
    thresholds = choose_thresholds(
        first.y_true,
        first.y_score,
        first.mask,
        first.labels,
        rule,
        chosen_on=chosen_on or f"{first.data} ({first.unit} level)",
        band=band,
    )
    return [p.replace(thresholds=thresholds) for p in preds]


def score_predictions(
    preds: Sequence[Predictions],
    *,
    unit: str = "image",
    aggregate: str = "max",
    n_resamples: int = 1000,
    seed: int = 0,
    thresholds_rule: str | None = None,
    band: float = 0.0,
) -> list[Evaluation]:
    """Metrics, bootstrap CIs and calibration of image-level predictions at `unit`."""
    at = [at_unit(p, unit, aggregate) for p in preds]
    if thresholds_rule is not None:
        at = rechoose_thresholds(at, thresholds_rule, band=band)
    return [evaluate_predictions(p, n_resamples=n_resamples, seed=seed) for p in at]


def evaluate(
    model_specs: ModelSpecs,
    data: Sequence[tuple[str, LabelTable]],
    *,
    unit: str = "image",
    aggregate: str = "max",
    policy: str = "U-Ignore",
    view: str = "frontal",
    n_resamples: int = 1000,
    seed: int = 0,
    thresholds_rule: str | None = None,
    band: float = 0.0,
    device: str = "auto",
    batch_size: int = 32,
) -> list[Evaluation]:
    """Evaluate one model or an ensemble (several specs) on each (name, table) in `data`.

    thresholds_rule None uses the thresholds stored with the model(s); a rule (fixed, youden,
    max_f1) chooses them on the first dataset at `unit` instead (in memory only; `band` adds a
    +/- uncertainty band). Returns one Evaluation per dataset, in order.
    """
    from cxrlabel.models.ensemble import load_ensemble

    if not data:
        raise ValueError("no data to evaluate on")
    check_unit(unit, aggregate)  # argument errors before loading any model
    ensemble = load_ensemble(model_specs, device=device)
    preds = predict_datasets(ensemble, data, policy=policy, view=view, batch_size=batch_size)
    return score_predictions(
        preds,
        unit=unit,
        aggregate=aggregate,
        n_resamples=n_resamples,
        seed=seed,
        thresholds_rule=thresholds_rule,
        band=band,
    )


def evaluate_checkpoint(
    checkpoint: str | Path, table: LabelTable, *, name: str = "validation", **kwargs: Any
) -> Evaluation:
    """`evaluate` for one model on one table (keyword arguments as for `evaluate`)."""
    return evaluate([checkpoint], [(name, table)], **kwargs)[0]


def choose_and_store_thresholds(
    model_specs: ModelSpecs,
    table: LabelTable,
    *,
    rule: str,
    band: float = 0.0,
    unit: str = "image",
    aggregate: str = "max",
    policy: str = "U-Ignore",
    view: str = "frontal",
    device: str = "auto",
) -> tuple[list[Path], Thresholds]:
    """Choose thresholds by `rule` on the model's (or ensemble's averaged) predictions on
    `table`, and store them in every member checkpoint's metadata.

    Every later command (evaluate, label, serve, export) then uses them; an ensemble's members
    carry identical thresholds, so the ensemble uses exactly the ones chosen for its average.
    Returns the checkpoints' weights paths and the thresholds stored.
    """
    from cxrlabel.models.checkpoint import set_thresholds
    from cxrlabel.models.ensemble import load_ensemble

    ensemble = load_ensemble(model_specs, device=device)
    pred = predict_datasets(ensemble, [("thresholds", table)], policy=policy, view=view)[0]
    pred = at_unit(pred, unit, aggregate)
    (pred,) = rechoose_thresholds([pred], rule, band=band)
    paths = [member.path for member in ensemble.members]
    for path in paths:
        set_thresholds(path, pred.thresholds)
    log.info("stored %s thresholds in %d checkpoint(s)", rule, len(paths))
    return paths, pred.thresholds


# --------------------------------------------------------------------------------------------
# Tables for the terminal and JSON beside the report
# --------------------------------------------------------------------------------------------


def _number(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    number = float(value)
    return "n/a" if math.isnan(number) else f"{number:.{digits}f}"


def markdown_table(
    frame: pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    digits: int | Mapping[str, int] = 2,
) -> str:
    """A markdown table: text columns left-aligned, numeric ones right-aligned, NaN as n/a.

    `digits` is one number of decimals for every float, or one per column (default 2).
    """
    columns = list(frame.columns if columns is None else columns)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    # Records, not iterrows: a row Series of numbers only would turn every int into a float.
    for row in frame.to_dict("records"):
        cells = []
        for column, is_number in zip(columns, numeric, strict=True):
            value = row[column]
            places = digits.get(column, 2) if isinstance(digits, Mapping) else digits
            cells.append(_number(value, places) if is_number else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_row(evaluation: Evaluation) -> pd.Series:
    return evaluation.table.set_index("Label").loc["Mean"]


def _ci_row(evaluation: Evaluation, label: str) -> pd.Series | None:
    ci = evaluation.ci.set_index("Label")
    return ci.loc[label] if label in ci.index else None


def summary_frame(evaluations: Sequence[Evaluation], names: Sequence[str]) -> pd.DataFrame:
    """One row per evaluation: dataset, model, kind, unit, N and the method's mean metrics."""
    rows = []
    for name, ev in zip(names, evaluations, strict=True):
        pred, mean, ci = ev.predictions, _mean_row(ev), _ci_row(ev, "Mean")
        unit = pred.unit if pred.unit == "image" else f"study ({pred.aggregate})"
        row: dict[str, Any] = {
            "Dataset": name,
            "Model": pred.model,
            "Kind": pred.kind,
            "Unit": unit,
            "N": len(pred),
            **{m: float(mean[m]) for m in SUMMARY_METRICS},
        }
        row["AUROC 95% CI"] = _ci_text(ci)
        rows.append(row)
    return pd.DataFrame(rows)


def _ci_text(ci: pd.Series | None) -> str:
    if ci is None or not all(math.isfinite(float(ci[c])) for c in ("Low", "High")):
        return "n/a"
    return f"{float(ci['Low']):.3f}-{float(ci['High']):.3f}"


def per_label_frame(evaluation: Evaluation) -> pd.DataFrame:
    """The metrics table with each label's AUROC CI beside it."""
    table = evaluation.table.copy()
    table.insert(table.columns.get_loc("AUROC") + 1, "AUROC 95% CI", "n/a")
    for i, label in enumerate(table["Label"]):
        table.loc[i, "AUROC 95% CI"] = _ci_text(_ci_row(evaluation, label))
    return table


def format_evaluations(evaluations: Sequence[Evaluation], names: Sequence[str]) -> str:
    """Summary table, then per-label tables: what `cxrlabel evaluate` prints."""
    digits = {"AUROC": 3, "AUPRC": 3, "Threshold": 3}
    parts = [markdown_table(summary_frame(evaluations, names), digits=digits)]
    for name, ev in zip(names, evaluations, strict=True):
        pred = ev.predictions
        t = pred.thresholds
        band = "" if t.band is None else ", with an uncertainty band"
        parts.append(
            f"\n{name}: {pred.data}; {pred.model} ({pred.kind}), {pred.unit} level; "
            f"thresholds {t.rule}{band}"
            + (f" (chosen on {t.chosen_on})" if t.chosen_on else "")
            + f"; AUROC CIs from {ev.n_resamples} bootstrap resamples of studies\n"
        )
        parts.append(markdown_table(per_label_frame(ev), digits=digits))
        missing = ev.table.attrs.get("auroc_na") or []
        if missing:
            parts.append(
                f"AUROC n/a (one class only), left out of the mean: {', '.join(missing)}\n"
            )
    return "".join(parts)


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict("records")]


def evaluation_record(evaluation: Evaluation, name: str) -> dict[str, Any]:
    """One evaluation as JSON-able data: what, how, and the numbers (NaN as null)."""
    pred, mean, ci = evaluation.predictions, _mean_row(evaluation), _ci_row(evaluation, "Mean")
    return {
        "dataset": name,
        "data": pred.data,
        "synthetic": pred.synthetic,
        "model": pred.model,
        "kind": pred.kind,
        "unit": pred.unit,
        "aggregate": pred.aggregate,
        "n": len(pred),
        "thresholds": pred.thresholds.to_dict(),
        "mean": {m: _json_value(mean[m]) for m in METRIC_NAMES},
        "auroc_ci": None if ci is None else [_json_value(ci["Low"]), _json_value(ci["High"])],
        "auroc_na": list(evaluation.table.attrs.get("auroc_na") or []),
        "labels": _records(evaluation.table),
        "ci": _records(evaluation.ci),
        "n_resamples": evaluation.n_resamples,
        "seed": evaluation.seed,
    }


def save_evaluations(
    path: Path,
    evaluations: Sequence[Evaluation],
    names: Sequence[str],
    *,
    models: Sequence[str | Path] = (),
) -> Path:
    """Write `evaluation.json` (read by `compare_runs`) atomically; return its path."""
    data = {
        "models": [str(m) for m in models],
        "evaluations": [
            evaluation_record(ev, name) for ev, name in zip(evaluations, names, strict=True)
        ],
    }
    atomic_write_text(Path(path), json.dumps(data, indent=2))
    return Path(path)


def data_names(count: int, given: Sequence[str | None] = ()) -> list[str]:
    """Names for `count` datasets: given ones, else validation, test, data3, ..."""
    names = []
    for i in range(count):
        name = given[i] if i < len(given) else None
        default = DEFAULT_DATA_NAMES[i] if i < len(DEFAULT_DATA_NAMES) else f"data{i + 1}"
        names.append(name or default)
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must differ: {names}")
    return names


__all__ = [
    "DEFAULT_DATA_NAMES",
    "EVALUATION_FILE",
    "SUMMARY_METRICS",
    "at_unit",
    "check_unit",
    "choose_and_store_thresholds",
    "data_names",
    "describe_data",
    "evaluate",
    "evaluate_checkpoint",
    "evaluation_record",
    "format_evaluations",
    "is_synthetic",
    "markdown_table",
    "per_label_frame",
    "predict_datasets",
    "rechoose_thresholds",
    "save_evaluations",
    "score_predictions",
    "summary_frame",
]
