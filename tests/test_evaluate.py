import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from cxrlabel.evaluate import label_metrics, metrics_table


def test_matches_scikit_learn_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500).astype(bool)
    score = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    m = label_metrics(y, score)
    pred = score >= 0.5
    assert math.isclose(m["AUROC"], roc_auc_score(y, score), abs_tol=1e-9)
    assert math.isclose(m["Acc"], accuracy_score(y, pred), abs_tol=1e-9)
    assert math.isclose(m["Prec"], precision_score(y, pred), abs_tol=1e-9)
    assert math.isclose(m["Recall"], recall_score(y, pred), abs_tol=1e-9)
    assert math.isclose(m["F Score"], f1_score(y, pred), abs_tol=1e-9)


def test_mask_and_single_class_labels():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 1]], dtype=float)
    s = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1], [0.7, 0.9]])
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=bool)
    table = metrics_table(y, s, mask, ["A", "B"]).set_index("Label")
    assert table.loc["A", "AUROC"] == 1.0
    assert math.isnan(table.loc["B", "AUROC"])  # only negatives left once masked
    assert table.loc["Mean", "AUROC"] == 1.0  # n/a labels are left out of the mean
    assert table.loc["B", "Negatives"] == 3 and table.loc["B", "Positives"] == 0
