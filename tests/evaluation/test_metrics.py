"""Metrics against scikit-learn, the vectorised bootstrap, calibration, evaluate_predictions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxrlabel.evaluation import metrics
from cxrlabel.evaluation.metrics import (
    METRIC_NAMES,
    Calibration,
    band_summary,
    binary_metrics,
    bootstrap_auroc,
    calibration,
    calibration_table,
    curves,
    evaluate_predictions,
    metrics_table,
    weighted_auroc,
)
from cxrlabel.evaluation.results import Predictions
from cxrlabel.models.thresholds import Thresholds

LABELS = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion")
TOL = 1e-9


def random_arrays(
    n: int = 300, k: int = 4, seed: int = 0, ties: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets correlated with scores, ~20% masked entries, rounded scores (ties) if asked."""
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, k)) < 0.3).astype(np.float64)
    y_score = np.clip(0.35 * y_true + 0.65 * rng.random((n, k)), 0.0, 1.0)
    if ties:
        y_score = np.round(y_score, 2)
    mask = rng.random((n, k)) > 0.2
    return y_true, y_score, mask


def sklearn_row(truth: np.ndarray, score: np.ndarray, t: float) -> dict[str, float]:
    pred = (score >= t).astype(int)
    return {
        "AUROC": roc_auc_score(truth, score),
        "AUPRC": average_precision_score(truth, score),
        "Accuracy": accuracy_score(truth, pred),
        "Precision": precision_score(truth, pred, zero_division=0),
        "Recall": recall_score(truth, pred),
        "Specificity": recall_score(truth, pred, pos_label=0),
        "F1": f1_score(truth, pred),
    }


# --------------------------------------------------------------------------- point metrics


def test_binary_metrics_equal_sklearn() -> None:
    y_true, y_score, _ = random_arrays(n=500, k=1, seed=1)
    truth, score = y_true[:, 0], y_score[:, 0]
    for t in (0.3, 0.5, 0.62):
        got = binary_metrics(truth, score, t)
        want = sklearn_row(truth, score, t)
        for name in METRIC_NAMES:
            assert got[name] == pytest.approx(want[name], abs=TOL), name
        assert got["Positives"] == int(truth.sum())
        assert got["Negatives"] == int((truth == 0).sum())


def test_metrics_table_equals_sklearn_per_label_with_masks() -> None:
    y_true, y_score, mask = random_arrays(seed=2)
    thresholds = Thresholds(LABELS, (0.5, 0.4, 0.6, 0.55), "fixed")
    table = metrics_table(y_true, y_score, mask, LABELS, thresholds)
    assert list(table.columns) == ["Label", "Threshold", *METRIC_NAMES, "Positives", "Negatives"]
    assert list(table["Label"]) == [*LABELS, "Mean"]
    for k, name in enumerate(LABELS):
        keep = mask[:, k]
        row = table.iloc[k]
        want = sklearn_row(y_true[keep, k], y_score[keep, k], thresholds.values[k])
        assert row["Threshold"] == thresholds.values[k]
        for metric in METRIC_NAMES:
            assert row[metric] == pytest.approx(want[metric], abs=TOL), (name, metric)
        assert row["Positives"] == int(y_true[keep, k].sum())
        assert row["Negatives"] == int(keep.sum() - y_true[keep, k].sum())
    mean = table.iloc[-1]
    for metric in METRIC_NAMES:
        assert mean[metric] == pytest.approx(table[metric].iloc[:-1].mean(), abs=TOL)
    assert mean["Positives"] == table["Positives"].iloc[:-1].sum()
    assert table.attrs["auroc_na"] == []


def test_masked_entries_do_not_count() -> None:
    y_true, y_score, mask = random_arrays(seed=3)
    table = metrics_table(y_true, y_score, mask, LABELS)
    # Garbage where the mask is False (uncertain -1 targets, NaN scores) changes nothing.
    y_true2, y_score2 = y_true.copy(), y_score.copy()
    y_true2[~mask] = -1.0
    y_score2[~mask] = np.nan
    pd.testing.assert_frame_equal(table, metrics_table(y_true2, y_score2, mask, LABELS))


def test_float_threshold_and_subset_of_stored_thresholds() -> None:
    y_true, y_score, mask = random_arrays(seed=4)
    at_float = metrics_table(y_true, y_score, mask, LABELS, 0.45)
    assert (at_float["Threshold"].iloc[:-1] == 0.45).all()
    stored = Thresholds(("X", *LABELS[::-1]), (0.1, 0.2, 0.3, 0.4, 0.5), "fixed")
    table = metrics_table(y_true, y_score, mask, LABELS, stored)
    assert list(table["Threshold"].iloc[:-1]) == [0.5, 0.4, 0.3, 0.2]


def test_one_class_label_has_no_auroc_and_is_left_out_of_the_mean() -> None:
    y_true, y_score, mask = random_arrays(seed=5)
    y_true[:, 1] = 0.0  # Cardiomegaly: negatives only
    table = metrics_table(y_true, y_score, mask, LABELS)
    row = table.set_index("Label").loc["Cardiomegaly"]
    assert math.isnan(row["AUROC"]) and math.isnan(row["AUPRC"])
    assert math.isnan(row["Recall"])  # no positives: recall undefined
    assert row["Positives"] == 0
    assert table.attrs["auroc_na"] == ["Cardiomegaly"]
    others = table["AUROC"].iloc[[0, 2, 3]]
    assert table["AUROC"].iloc[-1] == pytest.approx(others.mean(), abs=TOL)


def test_bad_input_is_named() -> None:
    y_true, y_score, mask = random_arrays(seed=6)
    bad = y_true.copy()
    bad[np.argmax(mask[:, 2]), 2] = 2.0
    with pytest.raises(ValueError, match=r"Edema.*0 or 1"):
        metrics_table(bad, y_score, mask, LABELS)
    with pytest.raises(ValueError, match="y_score has shape"):
        metrics_table(y_true, y_score[:, :3], mask, LABELS)
    with pytest.raises(ValueError, match="boolean"):
        metrics_table(y_true, y_score, mask * 2.0, LABELS)
    as_int = metrics_table(y_true, y_score, mask.astype(np.int8), LABELS)
    pd.testing.assert_frame_equal(as_int, metrics_table(y_true, y_score, mask, LABELS))


def test_curves_match_sklearn_and_are_empty_for_one_class() -> None:
    y_true, y_score, _ = random_arrays(n=200, k=1, seed=7)
    got = curves(y_true[:, 0], y_score[:, 0])
    fpr, tpr, _ = roc_curve(y_true[:, 0], y_score[:, 0])
    precision, recall, _ = precision_recall_curve(y_true[:, 0], y_score[:, 0])
    np.testing.assert_allclose(got["fpr"], fpr)
    np.testing.assert_allclose(got["tpr"], tpr)
    np.testing.assert_allclose(got["precision"], precision)
    np.testing.assert_allclose(got["recall"], recall)
    empty = curves(np.zeros(10), np.linspace(0, 1, 10))
    assert all(len(v) == 0 for v in empty.values())


# --------------------------------------------------------------------------- band


def test_band_summary_counts_and_metrics_outside_the_band() -> None:
    y_true, y_score, mask = random_arrays(n=400, seed=8, ties=False)
    assert band_summary(y_true, y_score, mask, Thresholds.fixed(LABELS)) is None
    thresholds = Thresholds.fixed(LABELS).with_band(0.1)
    table = band_summary(y_true, y_score, mask, thresholds)
    assert table is not None
    assert list(table["Label"]) == [*LABELS, "Mean"]
    total_in, total = 0, 0
    for k in range(len(LABELS)):
        keep = mask[:, k]
        inside = keep & (y_score[:, k] >= 0.4) & (y_score[:, k] < 0.6)
        rest = keep & ~inside
        row = table.iloc[k]
        assert row["In band"] == inside.sum()
        assert row["In band %"] == pytest.approx(100 * inside.sum() / keep.sum())
        want = sklearn_row(y_true[rest, k], y_score[rest, k], 0.5)
        for metric in METRIC_NAMES:
            assert row[metric] == pytest.approx(want[metric], abs=TOL)
        assert row["Positives"] + row["Negatives"] == rest.sum()
        total_in += int(inside.sum())
        total += int(keep.sum())
    assert table["In band"].iloc[-1] == total_in
    assert table["In band %"].iloc[-1] == pytest.approx(100 * total_in / total)


# --------------------------------------------------------------------------- weighted AUROC


@pytest.mark.parametrize("positives_majority", [False, True])
def test_weighted_auroc_equals_sklearn_with_sample_weight_and_ties(
    positives_majority: bool,
) -> None:
    rng = np.random.default_rng(9)
    n = 400
    truth = (rng.random(n) < (0.7 if positives_majority else 0.25)).astype(int)
    score = np.round(0.3 * truth + rng.random(n), 1)  # heavy ties
    assert len(np.unique(score)) < 20
    assert weighted_auroc(truth, score) == pytest.approx(roc_auc_score(truth, score), abs=TOL)
    w_float = rng.random(n) * 3
    want = roc_auc_score(truth, score, sample_weight=w_float)
    assert weighted_auroc(truth, score, w_float) == pytest.approx(want, abs=TOL)
    w_int = rng.integers(0, 4, size=(5, n))
    batch = weighted_auroc(truth, score, w_int)
    assert batch.shape == (5,)
    for b in range(5):
        want = roc_auc_score(truth, score, sample_weight=w_int[b])
        assert batch[b] == pytest.approx(want, abs=TOL)


def test_weighted_auroc_with_a_few_ties() -> None:
    """Continuous scores with a few positives tied to negatives (the sparse-ties path)."""
    rng = np.random.default_rng(19)
    n = 300
    truth = (rng.random(n) < 0.3).astype(int)
    score = rng.random(n) + 0.2 * truth
    pos, neg = np.flatnonzero(truth), np.flatnonzero(truth == 0)
    score[pos[:5]] = score[neg[:5]]
    w = rng.integers(0, 3, size=(4, n))
    got = weighted_auroc(truth, score, w)
    for b in range(4):
        want = roc_auc_score(truth, score, sample_weight=w[b])
        assert got[b] == pytest.approx(want, abs=TOL)


def test_weighted_auroc_is_nan_without_weight_on_a_class() -> None:
    truth = np.array([0, 0, 1, 1])
    score = np.array([0.1, 0.4, 0.35, 0.8])
    assert math.isnan(weighted_auroc(truth, score, np.array([1.0, 2.0, 0.0, 0.0])))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_auroc(truth, score, np.array([1.0, -1.0, 1.0, 1.0]))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_seeded_and_contains_the_point_estimate() -> None:
    y_true, y_score, mask = random_arrays(n=400, seed=10)
    groups = np.repeat(np.arange(200), 2)
    first = bootstrap_auroc(y_true, y_score, mask, groups, LABELS, n_resamples=200, seed=3)
    again = bootstrap_auroc(y_true, y_score, mask, groups, LABELS, n_resamples=200, seed=3)
    other = bootstrap_auroc(y_true, y_score, mask, groups, LABELS, n_resamples=200, seed=4)
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first["Low"], other["Low"])
    assert list(first.columns) == ["Label", "AUROC", "Low", "High", "Resamples"]
    assert list(first["Label"]) == [*LABELS, "Mean"]
    for k in range(len(LABELS)):
        keep = mask[:, k]
        point = roc_auc_score(y_true[keep, k], y_score[keep, k])
        assert first["AUROC"].iloc[k] == pytest.approx(point, abs=TOL)
    assert (first["Low"] < first["AUROC"]).all() and (first["AUROC"] < first["High"]).all()
    assert (first["High"] - first["Low"] < 0.3).all()
    assert (first["Resamples"] == 200).all()
    assert first["AUROC"].iloc[-1] == pytest.approx(first["AUROC"].iloc[:-1].mean())
    # The CI of the mean is narrower than the widest per-label CI.
    widths = first["High"] - first["Low"]
    assert widths.iloc[-1] < widths.iloc[:-1].max()


def test_bootstrap_resamples_match_sklearn_resample_by_resample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vectorised path against a slow loop: the same group counts as sample weights for
    sklearn's roc_auc_score, resample by resample, and the same percentiles. Tiny chunks check
    that chunking changes nothing."""
    y_true, y_score, mask = random_arrays(n=120, seed=11)
    groups = np.repeat([f"s{i}" for i in range(40)], 3)
    n_resamples, seed = 60, 5
    table = bootstrap_auroc(
        y_true, y_score, mask, groups, LABELS, n_resamples=n_resamples, seed=seed
    )
    codes = pd.factorize(pd.Series(groups), sort=False)[0]
    counts = metrics._group_counts(np.random.default_rng(seed), 40, n_resamples, np.int64)
    assert (counts[:, 0] == 0).all() and (counts.sum(axis=1) == 40).all()
    slow = np.empty((len(LABELS), n_resamples))
    for k in range(len(LABELS)):
        keep = mask[:, k]
        for b in range(n_resamples):
            w = counts[b, 1:][codes[keep]]
            truth = y_true[keep, k]
            both = w[truth == 1].sum() > 0 and w[truth == 0].sum() > 0
            slow[k, b] = roc_auc_score(truth, y_score[keep, k], sample_weight=w) if both else np.nan
    for k in range(len(LABELS)):
        low, high = np.quantile(slow[k][~np.isnan(slow[k])], [0.025, 0.975])
        assert table["Low"].iloc[k] == pytest.approx(low, abs=TOL)
        assert table["High"].iloc[k] == pytest.approx(high, abs=TOL)
    low, high = np.quantile(slow.mean(axis=0), [0.025, 0.975])
    assert table["Low"].iloc[-1] == pytest.approx(low, abs=TOL)
    assert table["High"].iloc[-1] == pytest.approx(high, abs=TOL)

    monkeypatch.setattr(metrics, "_CHUNK_BYTES", 1)  # one resample per chunk
    chunked = bootstrap_auroc(
        y_true, y_score, mask, groups, LABELS, n_resamples=n_resamples, seed=seed
    )
    pd.testing.assert_frame_equal(table, chunked)


def test_bootstrap_resamples_studies_not_images() -> None:
    """Two identical rows per study: resampling studies must give exactly the CI of the
    de-duplicated data resampled row by row (AUROC ignores a common weight of 2); resampling
    the duplicated rows independently gives a different, narrower CI."""
    y_true, y_score, mask = random_arrays(n=150, seed=12)
    mask[:] = True
    twice = np.repeat(np.arange(150), 2)
    studies = [f"study{i}" for i in twice]
    by_study = bootstrap_auroc(
        y_true[twice], y_score[twice], mask[twice], studies, LABELS, n_resamples=300, seed=1
    )
    dedup = bootstrap_auroc(y_true, y_score, mask, np.arange(150), LABELS, n_resamples=300, seed=1)
    pd.testing.assert_frame_equal(by_study, dedup.set_axis(by_study.index), check_like=True)
    by_image = bootstrap_auroc(
        y_true[twice], y_score[twice], mask[twice], np.arange(300), LABELS, n_resamples=300, seed=1
    )
    width_study = (by_study["High"] - by_study["Low"]).iloc[-1]
    width_image = (by_image["High"] - by_image["Low"]).iloc[-1]
    assert width_image < width_study


def test_bootstrap_one_class_label_and_bad_arguments() -> None:
    y_true, y_score, mask = random_arrays(n=200, seed=13)
    y_true[:, 0] = 1.0
    table = bootstrap_auroc(y_true, y_score, mask, np.arange(200), LABELS, n_resamples=50)
    first = table.iloc[0]
    assert math.isnan(first["AUROC"]) and math.isnan(first["Low"]) and first["Resamples"] == 0
    assert table["AUROC"].iloc[-1] == pytest.approx(table["AUROC"].iloc[1:4].mean())
    with pytest.raises(ValueError, match="one group id per row"):
        bootstrap_auroc(y_true, y_score, mask, np.arange(10), LABELS)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_auroc(y_true, y_score, mask, np.arange(200), LABELS, n_resamples=0)
    groups = np.arange(200).astype(float)
    groups[7] = np.nan
    with pytest.raises(ValueError, match="missing"):
        bootstrap_auroc(y_true, y_score, mask, groups, LABELS)
    # No label with both classes (here: no rows at all): NaN everywhere, nothing drawn.
    empty = bootstrap_auroc(
        np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4), bool), [], LABELS, n_resamples=5
    )
    assert empty["AUROC"].isna().all() and (empty["Resamples"] == 0).all()


def test_bootstrap_rare_label_counts_resamples_with_both_classes() -> None:
    rng = np.random.default_rng(14)
    n = 60
    y_true = np.zeros((n, 2))
    y_true[:, 0] = rng.random(n) < 0.5
    y_true[[3], 1] = 1.0  # one positive: ~37% of resamples draw no positive
    y_score = rng.random((n, 2))
    mask = np.ones((n, 2), dtype=bool)
    table = bootstrap_auroc(y_true, y_score, mask, np.arange(n), ("A", "B"), n_resamples=400)
    assert table["Resamples"].iloc[0] == 400
    assert 180 < table["Resamples"].iloc[1] < 320
    assert table["Resamples"].iloc[2] == table["Resamples"].iloc[1]


# --------------------------------------------------------------------------- calibration


def test_ece_is_zero_when_perfectly_calibrated_by_construction() -> None:
    # In every bin the score equals the fraction of positives exactly.
    scores, truth = [], []
    for p, n_pos in ((0.05, 1), (0.25, 5), (0.55, 11), (0.95, 19)):
        scores += [p] * 20
        truth += [1] * n_pos + [0] * (20 - n_pos)
    cal = calibration(np.array(truth), np.array(scores), n_bins=10, label="X")
    assert cal.label == "X"
    assert cal.ece == pytest.approx(0.0, abs=1e-12)
    assert list(cal.bins.columns) == ["Low", "High", "Count", "Mean score", "Fraction positive"]
    assert cal.bins["Count"].sum() == 80
    assert cal.bins["Count"].iloc[5] == 20 and cal.bins["Count"].iloc[1] == 0
    assert math.isnan(cal.bins["Mean score"].iloc[1])


def test_ece_small_when_calibrated_and_large_when_overconfident() -> None:
    rng = np.random.default_rng(15)
    p = rng.random(20_000)
    truth = (rng.random(20_000) < p).astype(int)
    assert calibration(truth, p).ece < 0.02
    overconfident = np.where(p >= 0.5, 0.99, 0.01)
    assert calibration(truth, overconfident).ece > 0.2
    # Hand-computed: scores 1.0 (last bin, closed on the right) with half positives.
    cal = calibration(np.array([1, 0, 1, 0]), np.array([1.0, 1.0, 1.0, 1.0]), n_bins=4)
    assert cal.bins["Count"].iloc[-1] == 4
    assert cal.ece == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration(np.array([1, 0]), np.array([0.5, 1.5]))


def test_calibration_table_uses_counted_rows() -> None:
    y_true, y_score, mask = random_arrays(seed=16)
    cals = calibration_table(y_true, y_score, mask, LABELS, n_bins=5)
    assert [c.label for c in cals] == list(LABELS)
    for k, cal in enumerate(cals):
        assert isinstance(cal, Calibration)
        assert cal.bins["Count"].sum() == mask[:, k].sum()
        want = calibration(y_true[mask[:, k], k], y_score[mask[:, k], k], 5).ece
        assert cal.ece == pytest.approx(want)


# --------------------------------------------------------------------------- evaluation


def random_predictions(band: bool) -> Predictions:
    y_true, y_score, mask = random_arrays(n=240, seed=17)
    n = len(y_true)
    thresholds = Thresholds.fixed(LABELS)
    return Predictions(
        labels=LABELS,
        paths=tuple(f"img{i}.png" for i in range(n)),
        patient_ids=tuple(f"p{i // 6}" for i in range(n)),
        study_ids=tuple(f"s{i // 3}" for i in range(n)),
        y_score=y_score,
        y_true=y_true,
        mask=mask,
        thresholds=thresholds.with_band(0.05) if band else thresholds,
        model="random",
        data="random arrays",
    )


@pytest.mark.parametrize("band", [False, True])
def test_evaluate_predictions(band: bool) -> None:
    pred = random_predictions(band)
    ev = evaluate_predictions(pred, n_resamples=100, seed=2, n_bins=5)
    assert ev.predictions is pred
    assert ev.n_resamples == 100 and ev.seed == 2
    want = metrics_table(pred.y_true, pred.y_score, pred.mask, LABELS, pred.thresholds)
    pd.testing.assert_frame_equal(ev.table, want)
    ci = bootstrap_auroc(
        pred.y_true, pred.y_score, pred.mask, pred.study_ids, LABELS, n_resamples=100, seed=2
    )
    pd.testing.assert_frame_equal(ev.ci, ci)
    assert ev.ci.attrs["groups"] == 80
    assert [c.label for c in ev.calibration] == list(LABELS)
    assert len(ev.calibration[0].bins) == 5
    if band:
        assert ev.band is not None
        assert ev.band["In band"].iloc[-1] > 0
    else:
        assert ev.band is None


def test_bootstrap_rates_brackets_the_point_values_and_follows_the_threshold():
    from cxrlabel.evaluation.metrics import bootstrap_rates

    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.3
    score = np.clip(truth * 0.3 + rng.random(400) * 0.7, 0, 1)
    groups = np.arange(400) // 2  # two rows per patient
    table = bootstrap_rates(truth, score, 0.5, groups, n_resamples=300).set_index("Metric")
    pred = score >= 0.5
    assert table.loc["Accuracy", "Value"] == pytest.approx(np.mean(pred == truth))
    assert table.loc["Sensitivity", "Value"] == pytest.approx(pred[truth].mean())
    assert table.loc["Specificity", "Value"] == pytest.approx((~pred[~truth]).mean())
    for _, row in table.iterrows():
        assert row["Low"] < row["Value"] < row["High"]
    # A lower threshold raises sensitivity and lowers specificity.
    low = bootstrap_rates(truth, score, 0.2, groups, n_resamples=50).set_index("Metric")
    assert low.loc["Sensitivity", "Value"] > table.loc["Sensitivity", "Value"]
    assert low.loc["Specificity", "Value"] < table.loc["Specificity", "Value"]
