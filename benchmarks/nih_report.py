"""The real-film check: frozen-Xception heads and a reference DenseNet on 497 NIH films, one report.

Xception_1 / Xception_3 / Xception_3_D are the frozen-feature heads of the method's first
approach, scored by patient-level 5-fold cross-validation (splits.patient_folds, in this
script's own fold loop: it predates `cxrlabel cv` / training.cv.run_cv and trains each fold on
all the other folds' patients, without an inner validation split); their out-of-fold
predictions are pooled into one prediction per film. The reference is
`reference_chexnet_repro_preds.csv`: an independent CheXNet reproduction
(DenseNet121 trained on NIH ChestX-ray14, these films in its held-out test fold). All of them are
evaluated by the same command (`cxrlabel evaluate --predictions`, which this script runs after
writing the heads' out-of-fold probabilities as CSVs) on the same films and the same labels:
the ones both the NIH labels and the reference have, under their CheXpert names.

    .venv/bin/python benchmarks/nih_report.py [--out runs/nih-report] [--cache-dir /tmp/nih_kx]

Writes predictions/*.csv, report.md / report.html (+ PNGs) and evaluation.json into --out and
prints the per-label tables with 95% bootstrap CIs. Feature extraction (497 films at 299 px)
takes ~5 minutes on a 2-core CPU; a matching feature cache in --cache-dir is reused, a stale
one is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrlabel import cli
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import OBSERVATIONS, LabelTable
from cxrlabel.data.splits import patient_folds
from cxrlabel.data.transforms import Preprocessing
from cxrlabel.evaluation.external import prediction_columns
from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.factory import HEADS, create_backbone, model_display_name
from cxrlabel.training.features import FeatureSet, extract_features
from cxrlabel.training.heads import predict_head, train_head

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "weights" / "legacy_xception_imagenet_keras.safetensors"
LABELS_CSV = SHARED / "nih-cxr14" / "labels.csv"
REFERENCE_CSV = LABELS_CSV.parent / "reference_chexnet_repro_preds.csv"
REFERENCE_NAME = "CheXNet repro (DenseNet121)"
TITLE = "Real-film check: frozen Xception heads vs a CheXNet reproduction on 497 NIH films"


def labelled_observations(table: LabelTable) -> tuple[str, ...]:
    """Observations this dataset labels (some non-blank value), in CheXpert order."""
    values = table.values(OBSERVATIONS)
    return tuple(o for k, o in enumerate(OBSERVATIONS) if np.any(~np.isnan(values[:, k])))


def fold_masks(table: LabelTable, feats: FeatureSet, k: int, seed: int) -> list[np.ndarray]:
    """For each fold, a boolean over feature rows: True = held-out patient."""
    patients = table.frame["patient_id"].astype(str).to_numpy()[feats.rows]
    return [np.isin(patients, sorted(split.valid)) for split in patient_folds(table, k, seed)]


def reference_observations() -> list[str]:
    """The observations the reference CSV has a probability column for (by evaluate's rules)."""
    columns = pd.read_csv(REFERENCE_CSV, nrows=0).columns
    return list(prediction_columns(list(columns)))


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
        net = train_head(
            feats.features[train], y[train], m[train], head,
            epochs=args.epochs, lr=args.lr, batch_size=64, seed=fold,
        )  # fmt: skip
        scores[valid] = predict_head(net, feats.features[valid])
    if np.isnan(scores).any():
        raise RuntimeError("folds do not cover every film: out-of-fold scores are incomplete")
    return scores


def write_predictions(path: Path, paths: pd.Series, labels: list[str], scores: np.ndarray,
                      about: dict) -> Path:  # fmt: skip
    """A probabilities CSV (Path + one column per label) and the JSON beside it naming it."""
    frame = pd.DataFrame(scores, columns=labels)
    frame.insert(0, "Path", paths.to_numpy())
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6f"))
    atomic_write_text(path.with_suffix(".json"), json.dumps(about, indent=2))
    return path


def main() -> int:
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
    labels = [o for o in trained_on if o in reference_observations()]
    _, native = create_backbone("xception", "none")
    prep = Preprocessing(299, (0.5,) * 3, (0.5,) * 3, "pad", native.interpolation)
    start = time.perf_counter()
    feats = extract_features(
        table, "xception", WEIGHTS, prep, args.cache_dir, batch_size=16, keras_compat=True
    )
    print(f"features {feats.features.shape} ({'reused' if feats.reused else 'extracted'}) "
          f"in {time.perf_counter() - start:.1f} s")  # fmt: skip

    # Tiny matrix products: one thread avoids the intra-op spin-waits that make them 10-50x
    # slower on a busy 2-core machine.
    torch.set_num_threads(1)
    folds = fold_masks(table, feats, args.folds, args.seed)
    y_all, m_all = feats.targets(table, trained_on)
    keep = [trained_on.index(label) for label in labels]
    note = (
        f"Frozen Xception (local Keras ImageNet weights, Keras-exact), 299 px; head trained on "
        f"the {len(trained_on)} labelled observations, {args.epochs} epochs, lr {args.lr}; "
        f"{args.folds}-fold patient-level CV, out-of-fold predictions pooled"
    )
    films = table.frame["Path"].iloc[feats.rows]
    evaluate_args = []
    for head in HEADS:
        start = time.perf_counter()
        scores = out_of_fold(feats, y_all, m_all, folds, head, args)[:, keep]
        name = model_display_name("xception", head)
        print(f"{name}: out-of-fold scores in {time.perf_counter() - start:.1f} s")
        about = {"model": name, "kind": "single model (5-fold out-of-fold)", "notes": [note]}
        csv = write_predictions(args.out / "predictions" / f"{name}.csv", films, labels,
                                scores, about)  # fmt: skip
        evaluate_args += ["--predictions", str(csv)]
    evaluate_args += ["--predictions", f"{REFERENCE_NAME}={REFERENCE_CSV}"]
    # The same command anyone runs on a predictions file: the evaluation is the product's.
    command = ["evaluate", *evaluate_args, "--data", f"NIH ChestX-ray14, 497 real films="
               f"{LABELS_CSV}", "--view", "all", "--bootstrap", str(args.resamples),
               "--out", str(args.out), "--title", TITLE]  # fmt: skip
    print("cxrlabel " + " ".join(f"'{a}'" if " " in a else a for a in command))
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
