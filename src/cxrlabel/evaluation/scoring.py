"""Evaluating saved models on labelled data: one model or an ensemble, per image or per study.

`evaluate(models, [(name, table), ...])` loads the checkpoints named by `models` (run folders,
`RUN:bestK`, checkpoint files; several make an ensemble that averages probabilities), scores
every dataset, optionally forms studies (max or mean over a study's views, as the CheXpert
paper scores its validation set) and returns one `metrics.Evaluation` per dataset. Decision
thresholds are the ones stored with the model (`cxrlabel thresholds` / `RunConfig.
threshold_rule`), or chosen here on the first dataset by a named rule.

Each evaluation's `Predictions` say which model and kind ("single model", "ensemble of N
checkpoints"), which data (and whether they are cxrlabel's synthetic films, recognised by the
marker file the generator leaves beside its CSVs, read by `data.formats`), which unit, and
over how many test-time augmentation transforms the probabilities were averaged (`tta`, see
`models.tta`; 1 = none).

External predictions files are read by `external`; tables and JSON records are in `tables`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrlabel.data.formats import is_synthetic_dataset
from cxrlabel.data.images import ImageError, read_image
from cxrlabel.data.labels import LabelTable, ensure_ids, filter_view
from cxrlabel.evaluation.metrics import Evaluation, evaluate_predictions
from cxrlabel.evaluation.results import STUDY_AGGREGATES, UNITS, Predictions
from cxrlabel.models.predictor import Predictor, shared_resize
from cxrlabel.models.thresholds import Thresholds, choose_thresholds
from cxrlabel.models.tta import check_tta, tta_of, with_tta

log = logging.getLogger(__name__)

DEFAULT_DATA_NAMES = ("validation", "test")

ModelSpecs = Sequence[str | Path]


# --------------------------------------------------------------------------------------------
# What the data are
# --------------------------------------------------------------------------------------------


def is_synthetic(table: LabelTable) -> bool:
    """True when the table's CSV came from cxrlabel's generator (`data.formats` marker)."""
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
    model: Predictor,
    data: Sequence[tuple[str, LabelTable]],
    *,
    policy: str = "U-Ignore",
    view: str = "frontal",
    batch_size: int = 32,
) -> list[Predictions]:
    """Image-level predictions of `model` (an Ensemble, or one with TTA) on each (name, table),
    described and marked."""
    out = []
    for name, table in data:
        table = filter_view(table, view)
        if not len(table):
            raise ValueError(f"{table.source}: no {view} images to evaluate ({name})")
        pred = predict_table(model, table, policy=policy, batch_size=batch_size)
        out.append(
            pred.replace(
                model=model.name,
                kind=model.kind,
                data=describe_data(table, view),
                synthetic=is_synthetic(table),
            )
        )
        log.info("%s: scored %d images with %s (%s)", name, len(pred), model.name, pred.kind)
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
        tta=tta_of(model),
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
    tta: int = 1,
) -> list[Evaluation]:
    """Evaluate one model or an ensemble (several specs) on each (name, table) in `data`.

    thresholds_rule None uses the thresholds stored with the model(s); a rule (fixed, youden,
    max_f1) chooses them on the first dataset at `unit` instead (in memory only; `band` adds a
    +/- uncertainty band). tta > 1 averages the probabilities over that many fixed transforms
    of each film (`cxrlabel.models.tta`); the stored thresholds were chosen without TTA.
    Returns one Evaluation per dataset, in order.
    """
    from cxrlabel.models.ensemble import load_ensemble

    if not data:
        raise ValueError("no data to evaluate on")
    check_unit(unit, aggregate)  # argument errors before loading any model
    check_tta(tta)
    model = with_tta(load_ensemble(model_specs, device=device), tta)
    preds = predict_datasets(model, data, policy=policy, view=view, batch_size=batch_size)
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
    "at_unit",
    "check_unit",
    "choose_and_store_thresholds",
    "data_names",
    "describe_data",
    "evaluate",
    "evaluate_checkpoint",
    "is_synthetic",
    "predict_datasets",
    "rechoose_thresholds",
    "score_predictions",
]
