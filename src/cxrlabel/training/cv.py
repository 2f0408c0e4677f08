"""Patient-level k-fold cross-validation of either approach: `run_cv(config, folds=5)`.

The config's `train_csv` is read and filtered as training filters it (view, require_certain),
and its patients are dealt into K folds (`splits.patient_folds`, seeded by `config.seed`).
For fold k the other folds' patients are split again (`splits.patient_split`,
`config.valid_fraction`, same seed) into an inner training and an inner validation part: the
model trains on the first, and model selection (best epoch) and its stored thresholds use the
second. The held-out fold is only ever predicted, so the pooled out-of-fold (OOF) scores are
honest estimates of a model trained on the rest. Patients are asserted disjoint between every
fold's held-out part and its training and validation parts.

Approach 2 (a `RunConfig`): one ordinary `train()` run folder per fold. Approach 1 (a
`HeadConfig`, `kind: heads`): each backbone's features are extracted ONCE for all the filtered
images (the feature cache, `features/all-<backbone>-<fingerprint>`) and every fold and head
trains on its rows of that matrix. Run folder (default `<runs_dir>/<name>-cv`)::

    config.yaml                  the config (kind: heads for approach 1)
    splits/folds.csv             patient_id,fold (1-based)
    splits/fold-K.csv            fold K's inner patient_id,split (train / valid)
    fold-K/                      approach 2: fold K's run folder (checkpoints/best.* ...)
    oof_predictions.csv          approach 2: Path, fold, ids, one probability column per label
    <Model>/fold-K/checkpoints/best.*   approach 1: fold K's checkpoint of each model
    <Model>/oof_predictions.csv  approach 1: that model's OOF predictions
    cv_metrics.csv               model, fold (1..K or "pooled"), label (and "Mean"): AUROC with
                                 a bootstrap CI (study resampling), accuracy / sensitivity /
                                 specificity at the stored thresholds (pooled: each image at
                                 its own fold's thresholds)
    cv_summary.json              folds, sizes, per-model pooled mean AUROC and files
    report/report.md, .html      evaluation.write_report on every model's pooled OOF scores
    report/folds.md              the per-fold table
    report/evaluation.json       the report's numbers (as `cxrlabel evaluate` writes them)

Each OOF CSV is what `cxrlabel evaluate --predictions` reads (a JSON beside it names the model).
`RUN:folds` (approach 2) and `RUN/<Model>:folds` (approach 1) name the fold ensemble for
label / serve / export / evaluate (models.run_folder). A fold's own config.yaml (approach 2)
is the cross-validation's config: its tables came from the fold, not from that config alone.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlabel.config import HeadConfig, RunConfig
from cxrlabel.csvcells import frame_csv
from cxrlabel.data.labels import LabelTable, resolve_labels
from cxrlabel.data.splits import Split, assert_disjoint, patient_folds, patient_split, save_split
from cxrlabel.data.stats import label_stats
from cxrlabel.evaluation.metrics import Evaluation, binary_metrics, evaluate_predictions
from cxrlabel.evaluation.report import write_report
from cxrlabel.evaluation.results import Predictions
from cxrlabel.evaluation.scoring import describe_data, is_synthetic, predict_table
from cxrlabel.evaluation.tables import fmt_ci, markdown_table, save_evaluations
from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.checkpoint import checkpoint_paths
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.run_folder import FOLDS_SUFFIX, RunFolder, fold_dir
from cxrlabel.models.thresholds import Thresholds
from cxrlabel.training.features import features_for
from cxrlabel.training.finetune import filtered_table, train
from cxrlabel.training.heads import (
    FEATURES_DIR,
    BackboneData,
    HeadRun,
    backbone_source,
    fit_model,
    frozen_network,
    predict_head,
    preprocessing_of,
    save_model,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
OOF_FILE = "oof_predictions.csv"
METRICS_FILE = "cv_metrics.csv"
SUMMARY_FILE = "cv_summary.json"
SPLITS_DIR = "splits"
FOLDS_FILE = "folds.csv"
FOLDS_TABLE = "folds.md"
POOLED = "pooled"
DATASET_NAME = "out-of-fold"
METRIC_COLUMNS = (
    "model", "fold", "label", "images", "positives", "negatives", "AUROC", "AUROC_low",
    "AUROC_high", "threshold", "accuracy", "sensitivity", "specificity",
)  # fmt: skip

AnyConfig = RunConfig | HeadConfig


@dataclass(frozen=True)
class Fold:
    """One fold: positions in the filtered table of its three disjoint patient groups."""

    number: int  # 1-based, as in fold-K
    train: np.ndarray  # inner training part (what the model is fitted on)
    valid: np.ndarray  # inner validation part (best epoch, thresholds)
    held_out: np.ndarray  # only predicted: the out-of-fold scores
    inner: Split  # the inner split of the fold's training patients
    valid_source: str  # what `valid` is, in words (thresholds' chosen_on)


@dataclass(frozen=True)
class CVResult:
    """A finished cross-validation: its tables, per-model files and the report."""

    run_dir: Path
    kind: str  # "finetune" or "heads"
    folds: int
    metrics: pd.DataFrame  # cv_metrics.csv: every model x (fold 1..K, "pooled") x label
    oof: dict[str, pd.DataFrame]  # model -> its OOF predictions (as written)
    oof_paths: dict[str, Path]
    checkpoints: dict[str, list[Path]]  # model -> each fold's best checkpoint, in fold order
    model_specs: dict[str, str]  # model -> the spec naming its fold ensemble (RUN:folds)
    evaluations: list[Evaluation]  # the report's: each model's pooled OOF predictions
    report: Path  # report.md
    summary: dict[str, Any] = field(default_factory=dict)  # cv_summary.json's contents

    @property
    def pooled(self) -> pd.DataFrame:
        """cv_metrics rows of the pooled OOF predictions."""
        return self.metrics[self.metrics["fold"] == POOLED].reset_index(drop=True)

    @property
    def per_fold(self) -> pd.DataFrame:
        """cv_metrics rows of each fold's held-out predictions."""
        return self.metrics[self.metrics["fold"] != POOLED].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Folds


def _patients(table: LabelTable, positions: np.ndarray) -> set[str]:
    return set(table.frame["patient_id"].astype(str).iloc[positions])


def make_folds(table: LabelTable, k: int, config: AnyConfig) -> list[Fold]:
    """K patient-level folds of `table`, each with an inner validation split of the rest."""
    patients = table.frame["patient_id"].astype(str)
    folds = []
    for number, split in enumerate(patient_folds(table, k, config.seed), start=1):
        held_out = np.flatnonzero(patients.isin(split.valid).to_numpy())
        rest = np.flatnonzero(patients.isin(split.train).to_numpy())
        inner = patient_split(table.subset(rest), config.valid_fraction, config.seed)
        in_train = patients.iloc[rest].isin(inner.train).to_numpy()
        train_pos, valid_pos = rest[in_train], rest[~in_train]
        # What every OOF score rests on: no held-out patient was trained or selected on.
        assert_disjoint(_patients(table, held_out), _patients(table, rest))
        assert_disjoint(_patients(table, train_pos), _patients(table, valid_pos))
        if len(held_out) + len(train_pos) + len(valid_pos) != len(table):
            raise AssertionError(f"fold {number} does not cover the table once")
        source = (
            f"{config.valid_fraction:.0%} patient split of fold {number}'s training patients "
            f"of {Path(config.train_csv).name}"
        )
        folds.append(Fold(number, train_pos, valid_pos, held_out, inner, source))
    return folds


def _save_folds(table: LabelTable, folds: Sequence[Fold], run_dir: Path) -> None:
    patients = table.frame["patient_id"].astype(str)
    rows = sorted({(p, f.number) for f in folds for p in patients.iloc[f.held_out]})
    frame = pd.DataFrame(rows, columns=["patient_id", "fold"])
    atomic_write_text(run_dir / SPLITS_DIR / FOLDS_FILE, frame_csv(frame, index=False))
    for fold in folds:
        save_split(fold.inner, run_dir / SPLITS_DIR / f"fold-{fold.number}.csv")


# ---------------------------------------------------------------------------------------------
# Approach 2: one train() run per fold


def _finetune_folds(
    config: RunConfig, table: LabelTable, folds: Sequence[Fold], run_dir: Path, resume: bool
) -> tuple[str, list[Predictions], list[Path]]:
    """Train every fold's run folder and predict its held-out part with its best checkpoint."""
    preds, checkpoints, name = [], [], ""
    for fold in folds:
        folder = fold_dir(run_dir, fold.number)
        valid = replace(table.subset(fold.valid), source=fold.valid_source)
        log.info("fold %d/%d: training %s", fold.number, len(folds), folder)
        result = train(
            config, run_dir=folder, resume=resume, tables=(table.subset(fold.train), valid)
        )
        if not result.completed:
            raise RuntimeError(f"{folder}: fold {fold.number} did not finish training")
        save_split(fold.inner, RunFolder(folder).split)
        # The checkpoint as `cxrlabel evaluate` / `label` load and score it.
        ensemble = load_ensemble([result.best_checkpoint], device=config.device)
        name = name or ensemble.name
        held_out = table.subset(fold.held_out)
        preds.append(
            predict_table(ensemble, held_out, policy=config.policy, batch_size=config.batch_size)
        )
        checkpoints.append(result.best_checkpoint)
    return name, preds, checkpoints


# ---------------------------------------------------------------------------------------------
# Approach 1: features once per backbone, every fold x head on their rows


def _heads_folds(
    config: HeadConfig, table: LabelTable, folds: Sequence[Fold], run_dir: Path, progress: bool
) -> dict[str, tuple[list[Predictions], list[Path]]]:
    """model -> (each fold's held-out predictions, each fold's checkpoint)."""
    labels = resolve_labels(config.labels)
    out: dict[str, tuple[list[Predictions], list[Path]]] = {}
    for backbone in config.backbones:
        prep = preprocessing_of(config, backbone)
        features = features_for(
            table, backbone, config.weights, prep, run_dir / FEATURES_DIR, "all",
            batch_size=config.extract_batch_size, progress=progress,
            keras_compat=config.keras_compat, resize_mode=config.resize_mode,
        )  # fmt: skip
        network, source = frozen_network(config, backbone), backbone_source(config, backbone)
        for fold in folds:
            run = HeadRun(config, table.subset(fold.train), table.subset(fold.valid), run_dir,
                          valid_source=fold.valid_source)  # fmt: skip
            data = BackboneData(backbone, prep, features.subset(fold.train),
                                features.subset(fold.valid), network, source)  # fmt: skip
            held_table, held = table.subset(fold.held_out), features.subset(fold.held_out)
            targets, mask = held_table.targets(labels, config.policy)
            rows = held_table.frame.iloc[held.rows]
            for head in config.heads:
                fitted = fit_model(run, data, head)
                about = {"cv": {"fold": fold.number, "folds": len(folds),
                                "held_out_images": len(held)}}  # fmt: skip
                folder = fold_dir(run_dir / fitted.name, fold.number)
                checkpoint = save_model(run, data, fitted, folder, extra=about)
                pred = Predictions(
                    labels=tuple(labels),
                    paths=tuple(rows["Path"].astype(str)),
                    patient_ids=tuple(rows["patient_id"].astype(str)),
                    study_ids=tuple(rows["study_id"].astype(str)),
                    y_score=predict_head(fitted.model.head, held.features).astype(np.float64),
                    y_true=np.asarray(targets[held.rows], dtype=np.float64),
                    mask=np.asarray(mask[held.rows], dtype=bool),
                    thresholds=fitted.thresholds,
                    model=fitted.name,
                )
                preds, checkpoints = out.setdefault(fitted.name, ([], []))
                preds.append(pred)
                checkpoints.append(checkpoint_paths(checkpoint)[0])  # the weights file
                log.info("fold %d/%d: %s on %d held-out images", fold.number, len(folds),
                         fitted.name, len(held))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Pooling and metrics


def _same_thresholds(preds: Sequence[Predictions]) -> bool:
    first = preds[0].thresholds
    return all(
        p.thresholds.values == first.values and p.thresholds.band == first.band for p in preds
    )


def pool(
    preds: Sequence[Predictions], *, model: str, folds: int, data: str, synthetic: bool
) -> Predictions:
    """The folds' held-out predictions as one out-of-fold set (in fold order).

    Its thresholds are the folds' when they all agree; otherwise the report's threshold
    metrics use the fixed 0.5 and a note says so (cv_metrics has each fold's own).
    """
    labels = preds[0].labels
    notes = [
        f"Out-of-fold: each image scored by the model of the one fold of {folds} that held its "
        "patient out; each fold's best epoch and thresholds were chosen on an inner patient "
        "split of its training patients"
    ]
    if _same_thresholds(preds):
        first = preds[0].thresholds
        thresholds = replace(first, chosen_on="each fold's inner validation split")
    else:
        thresholds = Thresholds.fixed(labels)
        notes.append(
            "The folds' thresholds differ, so this report's threshold metrics use a fixed 0.5; "
            f"{METRICS_FILE} has them at each fold's own thresholds"
        )
    return Predictions(
        labels=labels,
        paths=sum((p.paths for p in preds), ()),
        patient_ids=sum((p.patient_ids for p in preds), ()),
        study_ids=sum((p.study_ids for p in preds), ()),
        y_score=np.concatenate([p.y_score for p in preds]),
        y_true=np.concatenate([p.y_true for p in preds]),
        mask=np.concatenate([p.mask for p in preds]),
        thresholds=thresholds,
        model=model,
        kind=f"out-of-fold predictions ({folds} folds)",
        data=data,
        synthetic=synthetic,
        notes=tuple(notes),
    )


def _cuts(preds: Sequence[Predictions]) -> np.ndarray:
    """Each row's decision thresholds (N, K): those of the fold that predicted it."""
    return np.concatenate(
        [np.broadcast_to(np.asarray(p.thresholds.values), p.y_score.shape) for p in preds]
    )


def metric_rows(
    model: str, fold: str, pred: Predictions, cuts: np.ndarray, evaluation: Evaluation
) -> list[dict[str, Any]]:
    """cv_metrics rows of one set of predictions: per label, then "Mean" (means over labels,
    counts summed; the Mean AUROC CI is the bootstrap's CI of the mean)."""
    decided = (pred.y_score >= cuts).astype(np.float64)
    ci = evaluation.ci.set_index("Label")
    rows = []
    for k, label in enumerate(pred.labels):
        keep = pred.mask[:, k]
        # AUROC from the scores (the bootstrap's); accuracy etc. from the per-row decisions.
        counts = binary_metrics(pred.y_true[keep, k], decided[keep, k], 0.5)
        values = np.unique(cuts[:, k])
        rows.append({
            "model": model, "fold": fold, "label": label, "images": len(pred),
            "positives": counts["Positives"], "negatives": counts["Negatives"],
            "AUROC": ci.loc[label, "AUROC"], "AUROC_low": ci.loc[label, "Low"],
            "AUROC_high": ci.loc[label, "High"],
            "threshold": float(values[0]) if len(values) == 1 else math.nan,
            "accuracy": counts["Accuracy"], "sensitivity": counts["Recall"],
            "specificity": counts["Specificity"],
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    rows.append({
        "model": model, "fold": fold, "label": "Mean", "images": len(pred),
        "positives": int(frame["positives"].sum()), "negatives": int(frame["negatives"].sum()),
        "AUROC": ci.loc["Mean", "AUROC"], "AUROC_low": ci.loc["Mean", "Low"],
        "AUROC_high": ci.loc["Mean", "High"], "threshold": math.nan,
        **{m: float(frame[m].mean(skipna=True)) for m in ("accuracy", "sensitivity",
                                                            "specificity")},
    })  # fmt: skip
    return rows


def _oof_frame(
    pred: Predictions, preds: Sequence[Predictions], folds: Sequence[Fold]
) -> pd.DataFrame:
    """The OOF CSV's rows: Path, fold (1-based), ids, one probability column per label."""
    frame = pred.frame()
    numbers = np.concatenate([np.full(len(p), f.number) for p, f in zip(preds, folds, strict=True)])
    frame.insert(1, "fold", numbers)
    return frame


def format_cv_table(result: CVResult) -> str:
    """The compact table printed at the end: pooled mean AUROC per model with its CI."""
    rows = []
    for model in result.oof:
        pooled = result.pooled
        mean = pooled[(pooled["model"] == model) & (pooled["label"] == "Mean")].iloc[0]
        per_fold = result.per_fold
        fold_means = per_fold[(per_fold["model"] == model) & (per_fold["label"] == "Mean")]
        rows.append({
            "Model": model, "Folds": result.folds, "Images": int(mean["images"]),
            "Pooled mean AUROC [95% CI]": fmt_ci(mean["AUROC"], mean["AUROC_low"],
                                                 mean["AUROC_high"]),
            "Fold mean AUROCs": ", ".join(f"{v:.3f}" for v in fold_means["AUROC"]),
            "Accuracy": float(mean["accuracy"]),
        })  # fmt: skip
    return markdown_table(pd.DataFrame(rows), digits=3)


def _folds_markdown(metrics: pd.DataFrame) -> str:
    means = metrics[metrics["label"] == "Mean"].copy()
    means["AUROC [95% CI]"] = [
        fmt_ci(r["AUROC"], r["AUROC_low"], r["AUROC_high"]) for _, r in means.iterrows()
    ]
    columns = ["model", "fold", "images", "AUROC [95% CI]", "accuracy", "sensitivity",
               "specificity"]  # fmt: skip
    per_label = metrics[metrics["fold"] == POOLED]
    return (
        "# Cross-validation: mean over labels per fold and pooled\n\n"
        "Accuracy, sensitivity and specificity at each fold's stored thresholds (pooled: each "
        "image at its own fold's).\n\n"
        + markdown_table(means, columns, digits=3)
        + "\n# Pooled out-of-fold predictions, per label\n\n"
        + markdown_table(per_label, list(METRIC_COLUMNS), digits=3)
    )


# ---------------------------------------------------------------------------------------------
# The entry point


def default_run_dir(config: AnyConfig) -> Path:
    return Path(config.runs_dir) / f"{config.name}-cv"


def _load(config: AnyConfig, folds: int) -> LabelTable:
    if not config.train_csv:
        raise ValueError("config.train_csv is empty: nothing to cross-validate")
    if config.valid_csv:
        raise ValueError(
            f"cross-validation splits train_csv itself; valid_csv must be empty (it is "
            f"{config.valid_csv!r}): drop it, or evaluate on it afterwards with RUN:folds"
        )
    table = filtered_table(config, config.train_csv)
    if not len(table):
        raise ValueError(f"{config.train_csv}: no images left after filtering")
    log.info("cross-validating %d images in %d folds", len(table), folds)
    return table


def run_cv(
    config: AnyConfig,
    folds: int = 5,
    run_dir: Path | None = None,
    *,
    n_resamples: int = 1000,
    bootstrap_seed: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> CVResult:
    """K-fold patient-level cross-validation of `config` (see the module docstring).

    A `RunConfig` fine-tunes one run per fold (`resume` continues unfinished fold runs; without
    it a fold folder that holds a run is an error); a `HeadConfig` trains every backbone x head
    per fold on features extracted once (re-running reuses them and retrains the heads).
    n_resamples / bootstrap_seed: the AUROC CIs (study resampling), as `cxrlabel evaluate`.
    """
    table = _load(config, folds)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / CONFIG_FILE)
    fold_list = make_folds(table, folds, config)
    _save_folds(table, fold_list, run_dir)

    per_model: dict[str, tuple[list[Predictions], list[Path], Path, str]] = {}
    if isinstance(config, HeadConfig):
        for model, (preds, checkpoints) in _heads_folds(
            config, table, fold_list, run_dir, progress
        ).items():
            spec = f"{run_dir / model}{FOLDS_SUFFIX}"
            per_model[model] = (preds, checkpoints, run_dir / model / OOF_FILE, spec)
        loss_runs: list[Path] = []
    else:
        model, preds, checkpoints = _finetune_folds(config, table, fold_list, run_dir, resume)
        per_model[model] = (preds, checkpoints, run_dir / OOF_FILE, f"{run_dir}{FOLDS_SUFFIX}")
        loss_runs = [fold_dir(run_dir, f.number) for f in fold_list]

    data = f"{describe_data(table, config.view)}, out of fold"
    synthetic = is_synthetic(table)
    rows: list[dict[str, Any]] = []
    oof, oof_paths, evaluations = {}, {}, []
    for model, (preds, _, path, _) in per_model.items():
        for fold, pred in zip(fold_list, preds, strict=True):
            ev = evaluate_predictions(pred, n_resamples=n_resamples, seed=bootstrap_seed)
            rows += metric_rows(model, str(fold.number), pred, _cuts([pred]), ev)
        pooled = pool(preds, model=model, folds=folds, data=data, synthetic=synthetic)
        evaluation = evaluate_predictions(pooled, n_resamples=n_resamples, seed=bootstrap_seed)
        rows += metric_rows(model, POOLED, pooled, _cuts(preds), evaluation)
        evaluations.append(evaluation)
        oof[model] = _oof_frame(pooled, preds, fold_list)
        oof_paths[model] = _write_oof(path, oof[model], pooled)
    metrics = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    atomic_write_text(run_dir / METRICS_FILE, frame_csv(metrics, index=False))

    report_dir = RunFolder(run_dir).report
    names = [DATASET_NAME] * len(evaluations)
    report_md, _ = write_report(
        evaluations, report_dir,
        title=f"Cross-validation of {config.name}: {folds} patient-level folds, out-of-fold",
        dataset_names=names, run_dirs=loss_runs,
        label_stats=label_stats(table, unit="image", view=config.view),
    )  # fmt: skip
    atomic_write_text(report_dir / FOLDS_TABLE, _folds_markdown(metrics))
    specs = {model: entry[3] for model, entry in per_model.items()}
    save_evaluations(
        report_dir / "evaluation.json", evaluations, names, models=list(specs.values())
    )

    result = CVResult(
        run_dir=run_dir,
        kind=config.KIND,
        folds=folds,
        metrics=metrics,
        oof=oof,
        oof_paths=oof_paths,
        checkpoints={model: entry[1] for model, entry in per_model.items()},
        model_specs=specs,
        evaluations=evaluations,
        report=report_md,
    )
    summary = _summary(result, table, fold_list)
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return replace(result, summary=summary)


def _write_oof(path: Path, frame: pd.DataFrame, pooled: Predictions) -> Path:
    """The OOF CSV and, beside it, the JSON `read_predictions` takes the model's name from."""
    atomic_write_text(path, frame_csv(frame, index=False))
    about = {"model": pooled.model, "kind": pooled.kind, "notes": list(pooled.notes)}
    atomic_write_text(path.with_suffix(".json"), json.dumps(about, indent=2))
    return path


def _json_number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _summary(result: CVResult, table: LabelTable, folds: Sequence[Fold]) -> dict[str, Any]:
    run_dir = result.run_dir
    models = {}
    for model in result.oof:
        mean = result.metrics[(result.metrics["model"] == model)
                              & (result.metrics["label"] == "Mean")]  # fmt: skip
        pooled = mean[mean["fold"] == POOLED].iloc[0]
        models[model] = {
            "spec": result.model_specs[model],
            "oof_predictions": str(result.oof_paths[model].relative_to(run_dir)),
            "checkpoints": [str(p.relative_to(run_dir)) for p in result.checkpoints[model]],
            "pooled_auroc_mean": _json_number(pooled["AUROC"]),
            "pooled_auroc_ci": [
                _json_number(pooled["AUROC_low"]),
                _json_number(pooled["AUROC_high"]),
            ],
            "fold_auroc_mean": [_json_number(v) for v in mean[mean["fold"] != POOLED]["AUROC"]],
        }
    patients = table.frame["patient_id"].astype(str)
    return {
        "kind": result.kind,
        "folds": result.folds,
        "images": len(table),
        "patients": int(patients.nunique()),
        "fold_sizes": [
            {
                "fold": f.number,
                "held_out_patients": int(patients.iloc[f.held_out].nunique()),
                "held_out_images": len(f.held_out),
                "train_images": len(f.train),
                "valid_images": len(f.valid),
            }
            for f in folds
        ],
        "models": models,
        "metrics": METRICS_FILE,
        "report": str(result.report.relative_to(run_dir)),
    }


__all__ = [
    "CVResult",
    "Fold",
    "default_run_dir",
    "format_cv_table",
    "make_folds",
    "metric_rows",
    "pool",
    "run_cv",
]
