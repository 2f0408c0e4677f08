"""Metrics as pure functions of (y_true, y_score, mask): per label and averaged.

Masked entries (uncertain or unknown labels) are left out. A label whose certain entries hold
only one class has no AUROC ("n/a"); it is left out of the AUROC mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxrlabel.labels import LabelTable

METRICS = ("Acc", "Prec", "Recall", "F Score", "AUROC")


def _safe_div(a: float, b: float) -> float:
    return a / b if b else 0.0


def label_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 at `threshold`, and AUROC, for one label's certain rows."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_score) >= threshold
    tp = float(np.sum(y_pred & y_true))
    fp = float(np.sum(y_pred & ~y_true))
    fn = float(np.sum(~y_pred & y_true))
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    both = len(np.unique(y_true)) == 2
    return {
        "Acc": float(np.mean(y_pred == y_true)) if len(y_true) else math.nan,
        "Prec": precision,
        "Recall": recall,
        "F Score": _safe_div(2 * precision * recall, precision + recall),
        "AUROC": float(roc_auc_score(y_true, y_score)) if both else math.nan,
        "Positives": int(y_true.sum()),
        "Negatives": int((~y_true).sum()),
    }


def metrics_table(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    threshold: float = 0.5,
) -> pd.DataFrame:
    """One row per label plus a final 'Mean' row (means over labels; NaN AUROCs skipped)."""
    rows = []
    for k, name in enumerate(labels):
        keep = np.asarray(mask[:, k], dtype=bool)
        rows.append({"Label": name, **label_metrics(y_true[keep, k], y_score[keep, k], threshold)})
    table = pd.DataFrame(rows)
    mean = {"Label": "Mean", **{m: table[m].mean(skipna=True) for m in METRICS}}
    mean.update(Positives=int(table["Positives"].sum()), Negatives=int(table["Negatives"].sum()))
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def evaluate_checkpoint(
    checkpoint: Path,
    table: LabelTable,
    *,
    policy: str = "U-Ignore",
    batch_size: int = 64,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Score a saved model on a table's images and return `metrics_table` for its labels."""
    from torch.utils.data import DataLoader

    from cxrlabel.checkpoint import load_checkpoint
    from cxrlabel.data import CXRDataset, collate_skipping
    from cxrlabel.train import choose_execution, predict

    model, _ = load_checkpoint(checkpoint)
    plan = choose_execution("auto", "auto")
    model = model.to(plan.device)
    dataset = CXRDataset(table, model.spec.labels, model.preprocessing, policy=policy)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping)
    scores, targets, masks, _ = predict(model, loader, plan)
    return metrics_table(targets, scores, masks, model.spec.labels, threshold)


def format_metrics(table: pd.DataFrame) -> str:
    """Markdown in the method's layout (Table II/IV): one row per label, then the mean."""
    header = "| Label | Acc | Prec | Recall | F Score | AUROC | Pos | Neg |"
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.to_dict("records"):
        cells = [f"{r[m]:.2f}" for m in METRICS[:4]]
        cells.append("n/a" if math.isnan(r["AUROC"]) else f"{r['AUROC']:.3f}")
        counts = f" | {r['Positives']} | {r['Negatives']} |"
        rows.append(f"| {r['Label']} | " + " | ".join(cells) + counts)
    return "\n".join(rows) + "\n"
