"""The real-film check: frozen-Xception heads and a reference DenseNet on 497 NIH films, one report.

Xception_1 / Xception_3 / Xception_3_D are the frozen-feature heads of the method's first
approach, scored by patient-level 5-fold cross-validation (the folds and features of
benchmarks/nih_xception_cv.py); their out-of-fold predictions are pooled into one prediction per
film. The reference is `reference_chexnet_repro_preds.csv`: an independent CheXNet reproduction
(DenseNet121 trained on NIH ChestX-ray14, these films in its held-out test fold). All of them are
evaluated by the same code (cxrlabel.metrics) on the same films and the same labels: the ones
both the NIH labels and the reference have, under their CheXpert names.

    .venv/bin/python benchmarks/nih_report.py [--out runs/nih-report] [--cache-dir /tmp/nih_kx]

Writes report.md / report.html (+ PNGs) into --out and prints the per-label AUROC table with 95%
bootstrap CIs. Feature extraction (497 films at 299 px) takes ~5 minutes on a 2-core CPU; a
matching feature cache in --cache-dir is reused, a stale one is refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the CV benchmark beside this file

from nih_xception_cv import LABELS_CSV, WEIGHTS, fold_masks, labelled_observations

from cxrlabel.features import FeatureSet, extract_features, predict_head, train_head
from cxrlabel.formats import load_table
from cxrlabel.labels import OBSERVATIONS, LabelTable
from cxrlabel.metrics import Evaluation, evaluate_predictions
from cxrlabel.models import HEADS, create_backbone, model_display_name
from cxrlabel.report import fmt_ci, write_report
from cxrlabel.results import Predictions
from cxrlabel.stats import label_stats
from cxrlabel.thresholds import Thresholds
from cxrlabel.transforms import Preprocessing

REFERENCE_CSV = LABELS_CSV.parent / "reference_chexnet_repro_preds.csv"
# NIH finding name in the reference CSV -> CheXpert observation (one-to-one mappings only).
REFERENCE_LABELS = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
DATASET = "NIH ChestX-ray14, 497 real films"
DATA_TEXT = (
    "one film per patient, 414 PA / 83 AP, 320 px JPEG; a label-balanced sample; NIH's "
    "text-mined labels under their CheXpert names"
)


def reference_scores(path: Path, table: LabelTable, labels: list[str]) -> np.ndarray:
    """(len(table), K) reference probabilities in table order, matched on the image file stem."""
    frame = pd.read_csv(path)
    if "Image Index" not in frame.columns:
        raise ValueError(f"{path}: no 'Image Index' column")
    by_nih = {chexpert: nih for nih, chexpert in REFERENCE_LABELS.items()}
    columns = [f"prob_{by_nih[label]}" for label in labels]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    stems = frame["Image Index"].map(lambda name: Path(str(name)).stem)
    if stems.duplicated().any():
        raise ValueError(f"{path}: duplicate images, e.g. {stems[stems.duplicated()].iloc[0]}")
    wanted = table.frame["Path"].map(lambda p: Path(str(p)).stem)
    absent = sorted(set(wanted) - set(stems))
    if absent:
        raise ValueError(f"{path}: no predictions for {len(absent)} image(s), e.g. {absent[0]}")
    scores = frame.set_index(stems)[columns].loc[wanted.to_numpy()].to_numpy(np.float64)
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise ValueError(f"{path}: probabilities must be finite and within [0, 1]")
    return scores


def out_of_fold(
    feats: FeatureSet,
    y: np.ndarray,
    m: np.ndarray,
    folds: list[np.ndarray],
    head: str,
    args: argparse.Namespace,
) -> np.ndarray:
    """Each film scored by the head trained on the other folds' patients (same seeds as the CV)."""
    scores = np.full(y.shape, np.nan)
    for fold, valid in enumerate(folds):
        train = ~valid
        # Dropout draws from torch's global RNG (train_head seeds only the init and the order):
        # seeding it here makes Xception_3_D reproducible run to run.
        torch.manual_seed(fold)
        net = train_head(
            feats.features[train], y[train], m[train], head,
            epochs=args.epochs, lr=args.lr, batch_size=64, seed=fold,
        )  # fmt: skip
        scores[valid] = predict_head(net, feats.features[valid])
    if np.isnan(scores).any():
        raise RuntimeError("folds do not cover every film: out-of-fold scores are incomplete")
    return scores


def predictions(
    table: LabelTable,
    rows: np.ndarray,
    labels: list[str],
    scores: np.ndarray,
    targets: tuple[np.ndarray, np.ndarray],
    *,
    model: str,
    kind: str,
    notes: tuple[str, ...],
) -> Predictions:
    frame = table.frame.iloc[rows]
    return Predictions(
        labels=tuple(labels),
        paths=tuple(frame["Path"].astype(str)),
        patient_ids=tuple(frame["patient_id"].astype(str)),
        study_ids=tuple(frame["study_id"].astype(str)),
        y_score=scores,
        y_true=targets[0],
        mask=targets[1].astype(bool),
        thresholds=Thresholds.fixed(labels, 0.5),
        model=model,
        kind=kind,
        data=DATA_TEXT,
        synthetic=False,
        unit="image",
        notes=notes,
    )


def auroc_table(evaluations: list[Evaluation], labels: list[str]) -> str:
    """Markdown: one row per label, one column per model, 'AUROC [low, high]'."""
    names = [e.predictions.model for e in evaluations]
    lines = ["| Label | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label in [*labels, "Mean"]:
        cells = []
        for e in evaluations:
            row = e.ci[e.ci["Label"] == label].iloc[0]
            cells.append(fmt_ci(row["AUROC"], row["Low"], row["High"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/nih-report"))
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/nih_kx"))
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not LABELS_CSV.is_file():
        raise SystemExit(f"{LABELS_CSV} not found: the real-film check needs ../shared/data")

    table = load_table(LABELS_CSV)
    trained_on = list(labelled_observations(table))
    labels = [o for o in OBSERVATIONS if o in trained_on and o in REFERENCE_LABELS.values()]
    _, native = create_backbone("xception", "none")
    prep = Preprocessing(299, (0.5,) * 3, (0.5,) * 3, "pad", native.interpolation)
    start = time.perf_counter()
    feats = extract_features(
        table, "xception", WEIGHTS, prep, args.cache_dir, batch_size=16, keras_compat=True
    )
    print(f"features {feats.features.shape} ({'reused' if feats.reused else 'extracted'}) "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip

    torch.set_num_threads(1)  # tiny matrix products: see nih_xception_cv.py
    folds = fold_masks(table, feats, args.folds, args.seed)
    y_all, m_all = feats.targets(table, trained_on)
    keep = [trained_on.index(label) for label in labels]
    targets = (y_all[:, keep], m_all[:, keep])
    head_note = (
        f"Frozen Xception (local Keras ImageNet weights, Keras-exact), 299 px; head trained on "
        f"the {len(trained_on)} labelled observations, {args.epochs} epochs, lr {args.lr}; "
        f"{args.folds}-fold patient-level CV, out-of-fold predictions pooled"
    )
    preds = []
    for head in HEADS:
        start = time.perf_counter()
        scores = out_of_fold(feats, y_all, m_all, folds, head, args)[:, keep]
        name = model_display_name("xception", head)
        print(f"{name}: out-of-fold scores in {time.perf_counter() - start:.1f} s")
        preds.append(
            predictions(table, feats.rows, labels, scores, targets, model=name,
                        kind="single model (5-fold out-of-fold)", notes=(head_note,))
        )  # fmt: skip
    reference = reference_scores(REFERENCE_CSV, table, labels)[feats.rows]
    reference_note = (
        "Independent CheXNet reproduction (DenseNet121 trained on ~78k NIH ChestX-ray14 films; "
        "these films were in its held-out test fold)"
    )
    preds.append(
        predictions(table, feats.rows, labels, reference, targets,
                    model="CheXNet repro (DenseNet121)", kind="external predictions",
                    notes=(reference_note,))
    )  # fmt: skip
    start = time.perf_counter()
    evaluations = [evaluate_predictions(p, n_resamples=args.resamples) for p in preds]
    md, page = write_report(
        evaluations,
        args.out,
        title="Real-film check: frozen Xception heads vs a CheXNet reproduction on 497 NIH films",
        dataset_names=[DATASET] * len(evaluations),
        label_stats=label_stats(table, unit="image"),
    )
    print(f"evaluation and report in {time.perf_counter() - start:.1f} s: {md}, {page}")
    print(f"\nPer-label AUROC [95% CI, {args.resamples} bootstrap resamples], 497 NIH films:")
    print(auroc_table(evaluations, labels))


if __name__ == "__main__":
    main()
