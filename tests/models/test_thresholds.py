"""Per-label thresholds: the youden / max_f1 rules, the uncertainty band, (de)serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_curve

from cxrlabel.models.thresholds import (
    DEFAULT_THRESHOLD,
    Thresholds,
    choose_threshold,
    choose_thresholds,
)

LABELS = ("Atelectasis", "Cardiomegaly", "Edema")


def scored(seed: int, n: int = 300, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < 0.3).astype(int)
    score = np.clip(0.3 * truth + 0.7 * rng.random(n), 0, 1)
    return truth, np.round(score, 2) if ties else score


def youden_at(truth: np.ndarray, score: np.ndarray, t: float) -> float:
    pred = score >= t
    tpr = (pred & (truth == 1)).sum() / (truth == 1).sum()
    fpr = (pred & (truth == 0)).sum() / (truth == 0).sum()
    return float(tpr - fpr)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_youden_is_optimal_over_the_roc_curve(seed: int, ties: bool) -> None:
    truth, score = scored(seed, ties=ties)
    t = choose_threshold(truth, score, "youden")
    fpr, tpr, _ = roc_curve(truth, score)
    best = float(np.max(tpr - fpr))
    assert youden_at(truth, score, t) == pytest.approx(best, abs=1e-12)
    assert t in set(score.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_max_f1_is_optimal_over_every_candidate(seed: int, ties: bool) -> None:
    truth, score = scored(seed, ties=ties)
    t = choose_threshold(truth, score, "max_f1")
    best = max(f1_score(truth, score >= c) for c in np.unique(score))
    assert f1_score(truth, score >= t) == pytest.approx(best, abs=1e-12)


def test_fixed_rule_and_one_class_keep_the_default() -> None:
    truth, score = scored(3)
    assert choose_threshold(truth, score, "fixed") == DEFAULT_THRESHOLD
    assert choose_threshold(np.zeros(10), np.linspace(0, 1, 10), "youden") == DEFAULT_THRESHOLD
    assert choose_threshold(np.ones(10), np.linspace(0, 1, 10), "max_f1") == DEFAULT_THRESHOLD
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(truth, score, "median")


def test_choose_thresholds_ignores_masked_entries() -> None:
    rng = np.random.default_rng(4)
    n = 200
    y_true = (rng.random((n, 3)) < 0.3).astype(float)
    y_score = np.clip(0.3 * y_true + 0.7 * rng.random((n, 3)), 0, 1)
    mask = rng.random((n, 3)) > 0.25
    chosen = choose_thresholds(y_true, y_score, mask, LABELS, "youden", chosen_on="valid")
    assert chosen.labels == LABELS and chosen.rule == "youden" and chosen.chosen_on == "valid"
    for k in range(3):
        keep = mask[:, k]
        assert chosen.values[k] == choose_threshold(y_true[keep, k], y_score[keep, k], "youden")
    garbage_true, garbage_score = y_true.copy(), y_score.copy()
    garbage_true[~mask] = 1.0
    garbage_score[~mask] = 0.0
    again = choose_thresholds(garbage_true, garbage_score, mask, LABELS, "youden")
    assert again.values == chosen.values


def test_apply_without_band_gives_zero_and_one() -> None:
    t = Thresholds(LABELS, (0.5, 0.3, 0.7))
    probs = np.array([[0.5, 0.29, 0.7], [0.49, 0.3, 0.69]])
    np.testing.assert_array_equal(t.apply(probs), [[1, 0, 1], [0, 1, 0]])
    assert not t.in_band(probs).any()
    with pytest.raises(ValueError, match="expected"):
        t.apply(probs[:, :2])


def test_band_gives_minus_one_inside() -> None:
    t = Thresholds(LABELS, (0.5, 0.5, 0.5), band=((0.4, 0.6), (0.5, 0.5), (0.2, 0.9)))
    probs = np.array(
        [
            [0.39, 0.49, 0.19],
            [0.40, 0.50, 0.20],  # low edge: inside (low <= p)
            [0.55, 0.51, 0.89],
            [0.60, 0.99, 0.90],  # high edge: outside (p < high), positive
        ]
    )
    want = np.array([[0, 0, 0], [-1, 1, -1], [-1, 1, -1], [1, 1, 1]], dtype=float)
    np.testing.assert_array_equal(t.apply(probs), want)
    np.testing.assert_array_equal(t.in_band(probs), want == -1)


def test_with_band_is_symmetric_and_clipped() -> None:
    t = Thresholds(LABELS, (0.5, 0.05, 0.97)).with_band(0.1)
    np.testing.assert_allclose(t.band, [(0.4, 0.6), (0.0, 0.15), (0.87, 1.0)])


@pytest.mark.parametrize("with_band", [False, True])
def test_to_dict_from_dict_round_trip_through_json(with_band: bool) -> None:
    t = Thresholds(LABELS, (0.31, 0.5, 0.77), "max_f1", chosen_on="valid.csv, 40 studies")
    if with_band:
        t = t.with_band(0.05)
    data = json.loads(json.dumps(t.to_dict()))
    assert Thresholds.from_dict(data) == t
    assert data["values"]["Cardiomegaly"] == 0.5


def test_subset_reorders_and_refuses_missing_labels() -> None:
    t = Thresholds(LABELS, (0.1, 0.2, 0.3)).with_band(0.05)
    sub = t.subset(["Edema", "Atelectasis"])
    assert sub.values == (0.3, 0.1)
    assert sub.band == (t.band[2], t.band[0])
    with pytest.raises(KeyError, match="Fracture"):
        t.subset(["Fracture"])


@pytest.mark.parametrize(
    ("values", "band", "rule", "match"),
    [
        ((0.5, 0.5, 0.5), ((0.6, 0.7), (0.4, 0.6), (0.4, 0.6)), "fixed", "band"),  # low > t
        ((0.5, 0.5, 0.5), ((0.4, 1.2), (0.4, 0.6), (0.4, 0.6)), "fixed", "band"),  # high > 1
        ((0.5, 0.5, 0.5), ((0.4, 0.6),), "fixed", "one"),  # wrong length
        ((0.5, 0.5), None, "fixed", "one threshold per label"),
        ((0.5, 0.5, 0.5), None, "median", "unknown threshold rule"),
        ((0.5, float("nan"), 0.5), None, "fixed", "Cardiomegaly"),
        ((0.5, 0.5, 1.5), None, "fixed", r"\[0, 1\]"),
    ],
)
def test_invalid_thresholds_raise(values, band, rule, match) -> None:
    with pytest.raises(ValueError, match=match):
        Thresholds(LABELS, values, rule, band)
