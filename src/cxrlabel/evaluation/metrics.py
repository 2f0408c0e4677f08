"""Evaluation metrics as pure functions of (y_true, y_score, mask), with bootstrap CIs and
calibration.

Conventions, used by every function here:

* Arrays are (N, K): one row per image (or study), one column per label, in `labels` order.
  `mask` is True where the target counts; masked entries (uncertain or unknown labels under
  the uncertainty policy) are left out of every number.
* A prediction is positive when its score is >= the label's threshold.
* A label whose counted entries hold one class only has no AUROC or AUPRC (NaN, shown "n/a");
  it is left out of the means and listed in ``table.attrs["auroc_na"]``.
* Ratios that the data leave undefined are NaN (recall without positives, specificity without
  negatives); precision with no predicted positives is 0, as scikit-learn's zero_division=0.

The bootstrap resamples groups (study ids) with replacement, so the views of one study move
together. All resamples are scored at once: multinomial group counts become row weights and a
weighted Mann-Whitney statistic gives every resample's AUROC from one sort per label.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from cxrlabel.evaluation.results import Predictions
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

METRIC_NAMES = ("AUROC", "AUPRC", "Accuracy", "Precision", "Recall", "Specificity", "F1")
COUNT_NAMES = ("Positives", "Negatives")

# Bound on the (resamples x rows) work arrays of the bootstrap, in bytes.
_CHUNK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- input checks


def _as_1d(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_true.shape != y_score.shape:
        raise ValueError(
            f"y_true and y_score must be 1-D of equal length, got {y_true.shape} and "
            f"{y_score.shape}"
        )
    if not np.isin(y_true, (0.0, 1.0)).all():
        bad = y_true[~np.isin(y_true, (0.0, 1.0))][0]
        raise ValueError(f"targets must be 0 or 1 where counted, found {bad}")
    if not np.isfinite(y_score).all():
        raise ValueError("scores must be finite where counted (found NaN or inf)")
    return y_true.astype(bool), y_score


def _check_2d(
    y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    mask = np.asarray(mask)
    expected = (y_score.shape[0] if y_score.ndim == 2 else -1, len(labels))
    for name, arr in (("y_true", y_true), ("y_score", y_score), ("mask", mask)):
        if arr.shape != expected:
            raise ValueError(
                f"{name} has shape {arr.shape}, expected (N, {len(labels)}) for labels "
                f"{list(labels)}"
            )
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean (or 0/1), found other values")
        mask = mask.astype(bool)
    for k, name in enumerate(labels):
        keep = mask[:, k]
        counted = y_true[keep, k]
        if not np.isin(counted, (0.0, 1.0)).all():
            bad = counted[~np.isin(counted, (0.0, 1.0))][0]
            raise ValueError(f"{name}: targets must be 0 or 1 where the mask is True, found {bad}")
        if not np.isfinite(y_score[keep, k]).all():
            raise ValueError(f"{name}: scores must be finite where the mask is True")
    return y_true, y_score, mask


def _resolve_thresholds(thresholds: Thresholds | float, labels: Sequence[str]) -> Thresholds:
    if isinstance(thresholds, Thresholds):
        if tuple(thresholds.labels) == tuple(labels):
            return thresholds
        return thresholds.subset(labels)
    return Thresholds.fixed(labels, float(thresholds))


# --------------------------------------------------------------------------- point metrics


def _ratio(num: float, den: float, undefined: float) -> float:
    return num / den if den else undefined


def _metrics_1d(truth: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float | int]:
    """The metrics of one label's counted rows (already validated, truth boolean)."""
    pred = score >= threshold
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(np.count_nonzero(~pred & ~truth))
    pos, neg = tp + fn, fp + tn
    both = pos > 0 and neg > 0
    return {
        "AUROC": float(roc_auc_score(truth, score)) if both else math.nan,
        "AUPRC": float(average_precision_score(truth, score)) if both else math.nan,
        "Accuracy": _ratio(tp + tn, pos + neg, math.nan),
        "Precision": _ratio(tp, tp + fp, 0.0),
        "Recall": _ratio(tp, pos, math.nan),
        "Specificity": _ratio(tn, neg, math.nan),
        "F1": _ratio(2 * tp, 2 * tp + fp + fn, math.nan),
        "Positives": pos,
        "Negatives": neg,
    }


def binary_metrics(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5
) -> dict[str, float | int]:
    """AUROC, AUPRC, accuracy, precision, recall, specificity, F1 and the positive / negative
    counts of one label's counted rows; AUROC and AUPRC are NaN when one class only."""
    truth, score = _as_1d(y_true, y_score)
    return _metrics_1d(truth, score, float(threshold))


def _mean_row(table: pd.DataFrame, extra: dict[str, object]) -> pd.DataFrame:
    """Append a 'Mean' row: metric means over labels (NaN skipped), counts summed."""
    mean: dict[str, object] = {"Label": "Mean", **extra}
    for name in METRIC_NAMES:
        mean[name] = float(table[name].mean(skipna=True)) if len(table) else math.nan
    for name in COUNT_NAMES:
        mean[name] = int(table[name].sum())
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def metrics_table(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    thresholds: Thresholds | float = 0.5,
) -> pd.DataFrame:
    """One row per label (Label, Threshold, METRIC_NAMES, Positives, Negatives), then 'Mean'.

    ``attrs["auroc_na"]`` lists the labels without an AUROC (one class among counted rows);
    they are left out of the AUROC and AUPRC means.
    """
    y_true, y_score, mask = _check_2d(y_true, y_score, mask, labels)
    chosen = _resolve_thresholds(thresholds, labels)
    rows = []
    for k, name in enumerate(labels):
        keep = mask[:, k]
        t = chosen.values[k]
        row = _metrics_1d(y_true[keep, k].astype(bool), y_score[keep, k], t)
        rows.append({"Label": name, "Threshold": t, **row})
    columns = ["Label", "Threshold", *METRIC_NAMES, *COUNT_NAMES]
    table = _mean_row(pd.DataFrame(rows, columns=columns), {"Threshold": math.nan})
    table.attrs["auroc_na"] = [r["Label"] for r in rows if math.isnan(r["AUROC"])]
    return table


def band_summary(
    y_true: np.ndarray, y_score: np.ndarray, mask: np.ndarray, thresholds: Thresholds
) -> pd.DataFrame | None:
    """How many counted predictions fall in each label's uncertainty band, and the metrics on
    the counted rows outside it; None when the thresholds have no band.

    Columns: Label, Low, High, In band, In band % (of counted rows), METRIC_NAMES, Positives,
    Negatives (of the rows outside the band); then a 'Mean' row (In band summed).
    """
    if thresholds.band is None:
        return None
    labels = thresholds.labels
    y_true, y_score, mask = _check_2d(y_true, y_score, mask, labels)
    inside = thresholds.in_band(y_score)
    rows = []
    for k, name in enumerate(labels):
        keep = mask[:, k]
        n_in = int(np.count_nonzero(inside[keep, k]))
        rest = keep & ~inside[:, k]
        low, high = thresholds.band[k]
        row = _metrics_1d(y_true[rest, k].astype(bool), y_score[rest, k], thresholds.values[k])
        share = 100.0 * n_in / int(keep.sum()) if keep.any() else math.nan
        rows.append({"Label": name, "Low": low, "High": high, "In band": n_in,
                     "In band %": share, **row})  # fmt: skip
    columns = ["Label", "Low", "High", "In band", "In band %", *METRIC_NAMES, *COUNT_NAMES]
    table = pd.DataFrame(rows, columns=columns)
    counted = int(mask.sum())
    total_in = int(table["In band"].sum())
    extra = {
        "Low": math.nan,
        "High": math.nan,
        "In band": total_in,
        "In band %": 100.0 * total_in / counted if counted else math.nan,
    }
    return _mean_row(table, extra)


def curves(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall (precision, recall) curves of one label's counted
    rows, from scikit-learn; all four are empty when the rows hold one class only."""
    truth, score = _as_1d(y_true, y_score)
    if truth.all() or not truth.any():
        empty = np.zeros(0)
        return {"fpr": empty, "tpr": empty.copy(), "precision": empty.copy(), "recall": empty}
    fpr, tpr, _ = roc_curve(truth, score)
    precision, recall, _ = precision_recall_curve(truth, score)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


# --------------------------------------------------------------------------- weighted AUROC


@dataclass(frozen=True)
class _RankPlan:
    """What one label's AUROC needs from any weighting of its rows, computed once.

    A weight source is (B, 1 + M): column 0 is all zeros, column 1 + c the weight of source
    item c (a row, or a group in the bootstrap). `neg_cols` are the source columns of the
    negatives sorted by score, preceded by the zero column, so their cumulative sum `cum` has
    cum[p] = weight of the p lowest-scored negatives. For each positive, `lo` / `hi` count the
    negatives scored strictly below / at most its score; it beats cum[lo] negatives plus half
    of the tied ones, cum[hi] - cum[lo]. Where many positives have tied negatives, `hi` is
    kept for all of them (twice the pairs won = cum[lo] + cum[hi]); otherwise only for the
    `tied` ones, the rest needing cum[lo] alone.
    """

    neg_cols: np.ndarray
    pos_cols: np.ndarray
    lo: np.ndarray
    hi: np.ndarray | None
    tied: np.ndarray
    tied_lo: np.ndarray
    tied_hi: np.ndarray


def _rank_plan(truth: np.ndarray, score: np.ndarray, cols: np.ndarray) -> _RankPlan:
    if np.count_nonzero(truth) > len(truth) // 2:
        # AUROC(y, s) = AUROC(1 - y, -s); the work is least with the positives the minority.
        truth, score = ~truth, -score
    neg_idx = np.flatnonzero(~truth)
    neg_idx = neg_idx[np.argsort(score[neg_idx], kind="stable")]
    neg_sorted = score[neg_idx]
    pos_idx = np.flatnonzero(truth)
    # Positives in score order make the gathers from `cum` walk forward through memory.
    pos_idx = pos_idx[np.argsort(score[pos_idx], kind="stable")]
    pos_score = score[pos_idx]
    lo = np.searchsorted(neg_sorted, pos_score, side="left")
    hi = np.searchsorted(neg_sorted, pos_score, side="right")
    tied = np.flatnonzero(hi > lo)
    # Three gathers per tied positive against one more per positive: pick the cheaper.
    many_ties = 3 * len(tied) > len(lo)
    if many_ties:
        tied = tied[:0]
    return _RankPlan(
        neg_cols=np.r_[0, cols[neg_idx] + 1].astype(np.intp),
        pos_cols=(cols[pos_idx] + 1).astype(np.intp),
        lo=lo.astype(np.intp),
        hi=hi.astype(np.intp) if many_ties else None,
        tied=tied,
        tied_lo=lo[tied].astype(np.intp),
        tied_hi=hi[tied].astype(np.intp),
    )


def _with_zero_column(weights: np.ndarray) -> np.ndarray:
    """(B, M) -> (B, 1 + M) with a leading zero column (see `_RankPlan`)."""
    out = np.zeros((weights.shape[0], weights.shape[1] + 1), dtype=weights.dtype)
    out[:, 1:] = weights
    return out


def _auroc_from_weights(
    source: np.ndarray, plan: _RankPlan, cum_dtype: np.dtype | type | None = None
) -> np.ndarray:
    """(B,) AUROCs for the (B, 1 + M) weight source; NaN where a class has no weight.

    The (B, rows) work arrays are laid out resample-major so that the gathers and the running
    sum walk contiguous memory. Integer sources (bootstrap counts) are summed exactly, the
    running sum in `cum_dtype` (default: the source's), which may be wider than a compact
    source.
    """
    acc = np.int64 if np.issubdtype(source.dtype, np.integer) else np.float64
    cum = np.take(source, plan.neg_cols, axis=1)
    if cum_dtype is not None and cum.dtype != cum_dtype:
        cum = cum.astype(cum_dtype)
    np.cumsum(cum, axis=1, out=cum)
    w_pos = np.take(source, plan.pos_cols, axis=1)
    # Twice the weighted count of (positive, negative) pairs won, ties counting one half.
    twice_won = np.einsum("ij,ij->i", w_pos, np.take(cum, plan.lo, axis=1), dtype=acc)
    if plan.hi is not None:
        twice_won += np.einsum("ij,ij->i", w_pos, np.take(cum, plan.hi, axis=1), dtype=acc)
    else:
        twice_won *= 2
    if len(plan.tied):
        ties = np.take(cum, plan.tied_hi, axis=1) - np.take(cum, plan.tied_lo, axis=1)
        twice_won += np.einsum("ij,ij->i", np.take(w_pos, plan.tied, axis=1), ties, dtype=acc)
    pos_total = w_pos.sum(axis=1, dtype=acc).astype(np.float64)
    neg_total = cum[:, -1].astype(np.float64)
    auc = np.full(len(source), math.nan)
    ok = (pos_total > 0) & (neg_total > 0)
    auc[ok] = twice_won[ok] / (2.0 * pos_total[ok] * neg_total[ok])
    return auc


def weighted_auroc(
    y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray | None = None
) -> float | np.ndarray:
    """AUROC with non-negative per-row weights (ties count one half), as scikit-learn's
    roc_auc_score(sample_weight=...). `weights` (N,) gives a float; (B, N) gives B AUROCs at
    once. NaN where one class has no weight."""
    truth, score = _as_1d(y_true, y_score)
    w = np.ones(len(truth)) if weights is None else np.asarray(weights)
    if not np.issubdtype(w.dtype, np.integer):
        w = w.astype(np.float64)
    single = w.ndim == 1
    w2 = w[None, :] if single else w
    if w2.ndim != 2 or w2.shape[1] != len(truth):
        raise ValueError(f"weights must be (N,) or (B, N) with N = {len(truth)}, got {w.shape}")
    if not np.isfinite(w2).all() or (w2 < 0).any():
        raise ValueError("weights must be finite and non-negative")
    plan = _rank_plan(truth, score, np.arange(len(truth)))
    auc = _auroc_from_weights(_with_zero_column(w2), plan)
    return float(auc[0]) if single else auc


# --------------------------------------------------------------------------- bootstrap


def _group_counts(rng: np.random.Generator, n_groups: int, n_draws: int, dtype: type) -> np.ndarray:
    """(n_draws, 1 + n_groups) weight source (see `_RankPlan`): column 1 + g counts how often
    group g is drawn in a resample of n_groups draws with replacement (a multinomial draw, done
    as uniform integers plus one bincount)."""
    width = n_groups + 1
    picks = rng.integers(0, n_groups, size=(n_draws, n_groups))
    picks += np.arange(n_draws)[:, None] * width + 1
    counts = np.bincount(picks.ravel(), minlength=n_draws * width)
    return counts.reshape(n_draws, width).astype(dtype, copy=False)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float, int]:
    valid = values[~np.isnan(values)]
    if not len(valid):
        return math.nan, math.nan, 0
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(valid, [tail, 1.0 - tail])
    return float(low), float(high), len(valid)


def bootstrap_auroc(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray,
    groups: Sequence[Hashable] | np.ndarray,
    labels: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Percentile bootstrap CIs of every label's AUROC and of the mean AUROC.

    Each resample draws as many groups (study ids) as there are, with replacement; a row
    counts as often as its group was drawn. Columns: Label, AUROC (on the full data), Low,
    High, Resamples (how many resamples had both classes). The final 'Mean' row is the CI of
    the per-resample mean over the labels that have an AUROC on the full data, from the
    resamples in which all of them had both classes. Deterministic for a seed.
    """
    y_true, y_score, mask = _check_2d(y_true, y_score, mask, labels)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    group_arr = np.asarray(groups, dtype=object) if not isinstance(groups, np.ndarray) else groups
    if group_arr.shape != (len(y_true),):
        raise ValueError(f"one group id per row is needed: {len(group_arr)} for {len(y_true)}")
    codes, uniques = pd.factorize(pd.Series(group_arr), sort=False)
    if (codes < 0).any():
        raise ValueError(f"group ids must not be missing (row {int(np.argmax(codes < 0))})")
    n_groups = len(uniques)

    plans: dict[int, _RankPlan] = {}
    points = np.full(len(labels), math.nan)
    for k in range(len(labels)):
        keep = mask[:, k]
        truth = y_true[keep, k].astype(bool)
        if truth.any() and not truth.all():
            points[k] = roc_auc_score(truth, y_score[keep, k])
            plans[k] = _rank_plan(truth, y_score[keep, k], codes[keep])

    # Exact integer sums; int32 halves memory traffic while no sum can overflow it. A weight
    # sum is at most n_groups draws times the rows of the largest group.
    max_rows = int(np.bincount(codes).max()) if len(codes) else 1
    cum_dtype = np.int32 if n_groups * max_rows * 2 < 2**31 else np.int64
    per_resample = max(len(codes), n_groups) * np.dtype(np.int64).itemsize
    chunk = int(max(1, min(n_resamples, _CHUNK_BYTES // max(per_resample, 1))))
    rng = np.random.default_rng(seed)
    aucs = np.full((len(labels), n_resamples), math.nan)
    for start in range(0, n_resamples if plans else 0, chunk):
        stop = min(start + chunk, n_resamples)
        counts = _group_counts(rng, n_groups, stop - start, np.int64)
        # Counts are small (a group is rarely drawn more than ~10 times): as int8 a resample's
        # counts fit the CPU's L1 cache, which makes the random-access gathers cheap.
        compact = np.int8 if counts.max() <= np.iinfo(np.int8).max else cum_dtype
        source = counts.astype(compact)
        for k, plan in plans.items():
            aucs[k, start:stop] = _auroc_from_weights(source, plan, cum_dtype)

    rows = []
    for k, name in enumerate(labels):
        low, high, used = _percentiles(aucs[k], level) if k in plans else (math.nan, math.nan, 0)
        rows.append({"Label": name, "AUROC": points[k], "Low": low, "High": high,
                     "Resamples": used})  # fmt: skip
    have = sorted(plans)
    if have:
        per_resample_mean = aucs[have].mean(axis=0)  # NaN if any label lacked a class
        low, high, used = _percentiles(per_resample_mean, level)
        mean_point = float(points[have].mean())
    else:
        low, high, used, mean_point = math.nan, math.nan, 0, math.nan
    rows.append({"Label": "Mean", "AUROC": mean_point, "Low": low, "High": high,
                 "Resamples": used})  # fmt: skip
    table = pd.DataFrame(rows, columns=["Label", "AUROC", "Low", "High", "Resamples"])
    table.attrs.update(n_resamples=n_resamples, seed=seed, level=level, groups=n_groups)
    return table


RATE_NAMES = ("Accuracy", "Sensitivity", "Specificity")


def bootstrap_rates(
    y_true: np.ndarray,
    y_score: np.ndarray,
    threshold: float,
    groups: Sequence[Hashable] | np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Percentile bootstrap CIs of one label's accuracy, sensitivity and specificity at a
    threshold, resampling groups (patients or studies) as `bootstrap_auroc` does.

    Rows are already the label's counted ones. Columns: Metric, Value (on the full data), Low,
    High. A resample without positives (negatives) has no sensitivity (specificity) and is left
    out of that metric's interval.
    """
    truth, score = _as_1d(y_true, y_score)
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups, dtype=object)), sort=False)
    if codes.shape != truth.shape:
        raise ValueError(f"one group id per row is needed: {len(codes)} for {len(truth)}")
    pred = score >= float(threshold)
    # Per group: counts of true positives, positives, true negatives, negatives.
    per_group = np.stack(
        [np.bincount(codes, weights=w, minlength=len(uniques))
         for w in (pred & truth, truth, ~pred & ~truth, ~truth)],
        axis=1,
    )  # fmt: skip
    counts = _group_counts(np.random.default_rng(seed), len(uniques), n_resamples, np.int64)
    tp, pos, tn, neg = (counts[:, 1:] @ per_group).T
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = {
            "Accuracy": (tp + tn) / (pos + neg),
            "Sensitivity": np.where(pos > 0, tp / pos, math.nan),
            "Specificity": np.where(neg > 0, tn / neg, math.nan),
        }
    point = _metrics_1d(truth, score, float(threshold))
    values = {"Accuracy": point["Accuracy"], "Sensitivity": point["Recall"],
              "Specificity": point["Specificity"]}  # fmt: skip
    rows = []
    for name in RATE_NAMES:
        low, high, _ = _percentiles(draws[name], level)
        rows.append({"Metric": name, "Value": values[name], "Low": low, "High": high})
    return pd.DataFrame(rows, columns=["Metric", "Value", "Low", "High"])


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error of one label and its reliability-diagram bins."""

    label: str
    ece: float
    bins: pd.DataFrame  # Low, High, Count, Mean score, Fraction positive (equal-width bins)


def calibration(
    y_true: np.ndarray, y_score: np.ndarray, n_bins: int = 10, label: str = ""
) -> Calibration:
    """ECE over `n_bins` equal-width bins of [0, 1]: the count-weighted mean of
    |mean score - fraction positive|. Empty bins are kept in `bins` (Count 0, NaN means);
    the ECE of no rows is NaN."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    truth, score = _as_1d(y_true, y_score)
    if ((score < 0.0) | (score > 1.0)).any():
        where = f" ({label})" if label else ""
        raise ValueError(f"calibration needs probabilities in [0, 1]{where}")
    # A score of exactly 1.0 belongs to the last bin, which is closed on the right.
    idx = np.minimum((score * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    score_sum = np.bincount(idx, weights=score, minlength=n_bins)
    pos_sum = np.bincount(idx, weights=truth.astype(np.float64), minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_score = np.where(count > 0, score_sum / count, math.nan)
        frac_pos = np.where(count > 0, pos_sum / count, math.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = pd.DataFrame(
        {
            "Low": edges[:-1],
            "High": edges[1:],
            "Count": count,
            "Mean score": mean_score,
            "Fraction positive": frac_pos,
        }
    )
    filled = count > 0
    n = int(count.sum())
    gap = np.abs(mean_score[filled] - frac_pos[filled])
    ece = float((count[filled] * gap).sum() / n) if n else math.nan
    return Calibration(label, ece, bins)


def calibration_table(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    n_bins: int = 10,
) -> list[Calibration]:
    """`calibration` of each label's counted rows."""
    y_true, y_score, mask = _check_2d(y_true, y_score, mask, labels)
    return [
        calibration(y_true[mask[:, k], k], y_score[mask[:, k], k], n_bins, name)
        for k, name in enumerate(labels)
    ]


# --------------------------------------------------------------------------- one call


@dataclass(frozen=True)
class Evaluation:
    """Everything a report shows about one set of predictions."""

    predictions: Predictions
    table: pd.DataFrame  # metrics_table at predictions.thresholds
    ci: pd.DataFrame  # bootstrap_auroc, resampling predictions.study_ids
    calibration: tuple[Calibration, ...]
    band: pd.DataFrame | None  # band_summary (None without a band)
    n_resamples: int
    seed: int


def evaluate_predictions(
    pred: Predictions, *, n_resamples: int = 1000, seed: int = 0, n_bins: int = 10
) -> Evaluation:
    """Metrics, bootstrap CIs (resampling studies), calibration and band summary of `pred`."""
    labels = pred.labels
    table = metrics_table(pred.y_true, pred.y_score, pred.mask, labels, pred.thresholds)
    if table.attrs["auroc_na"]:
        log.info("no AUROC (one class only) for %s", ", ".join(table.attrs["auroc_na"]))
    ci = bootstrap_auroc(
        pred.y_true,
        pred.y_score,
        pred.mask,
        pred.study_ids,
        labels,
        n_resamples=n_resamples,
        seed=seed,
    )
    cals = calibration_table(pred.y_true, pred.y_score, pred.mask, labels, n_bins)
    band = band_summary(pred.y_true, pred.y_score, pred.mask, pred.thresholds)
    return Evaluation(pred, table, ci, tuple(cals), band, n_resamples, seed)
