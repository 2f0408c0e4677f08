"""Per-label decision thresholds and the optional uncertainty band, as stored with a model.

A probability p becomes a CheXpert-style label: 1.0 when p >= threshold, else 0.0; with a band
(low, high) per label, low <= p < high becomes -1.0 (uncertain) instead, mirroring the
positive / uncertain / negative labels of the CheXpert labeller. The method uses 0.5 for every
label; `choose_thresholds` picks them on a validation split by a named rule instead.

Thresholds travel in checkpoint metadata under "thresholds" (`to_dict` / `from_dict`), so every
later command (evaluate, label, serve, export) uses the same ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RULES = ("fixed", "youden", "max_f1")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Thresholds:
    """One decision threshold per label, how they were chosen, and an optional band."""

    labels: tuple[str, ...]
    values: tuple[float, ...]
    rule: str = "fixed"
    band: tuple[tuple[float, float], ...] | None = None  # (low, high) per label
    chosen_on: str = ""  # what data chose them, for reports

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown threshold rule {self.rule!r}; choose from {RULES}")
        if len(self.values) != len(self.labels):
            raise ValueError("one threshold per label is needed")
        for label, t in zip(self.labels, self.values, strict=True):
            # A NaN threshold would silently turn every prediction negative.
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"{label}: threshold {t} must lie in [0, 1]")
        if self.band is not None:
            if len(self.band) != len(self.labels):
                raise ValueError("one (low, high) band per label is needed")
            for label, (low, high), t in zip(self.labels, self.band, self.values, strict=True):
                if not 0.0 <= low <= t <= high <= 1.0:
                    raise ValueError(
                        f"{label}: band ({low}, {high}) must satisfy 0 <= low <= "
                        f"threshold ({t}) <= high <= 1"
                    )

    @classmethod
    def fixed(cls, labels: Sequence[str], value: float = DEFAULT_THRESHOLD) -> Thresholds:
        return cls(tuple(labels), tuple(float(value) for _ in labels))

    def with_band(self, width: float) -> Thresholds:
        """A symmetric band of +/- `width` around each threshold, clipped to [0, 1]."""
        band = tuple((max(0.0, t - width), min(1.0, t + width)) for t in self.values)
        return Thresholds(self.labels, self.values, self.rule, band, self.chosen_on)

    def subset(self, labels: Sequence[str]) -> Thresholds:
        """These thresholds for `labels`, in that order (each must be present)."""
        missing = [name for name in labels if name not in self.labels]
        if missing:
            raise KeyError(f"no threshold stored for {missing}")
        idx = [self.labels.index(name) for name in labels]
        band = None if self.band is None else tuple(self.band[i] for i in idx)
        values = tuple(self.values[i] for i in idx)
        return Thresholds(tuple(labels), values, self.rule, band, self.chosen_on)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) probabilities in `labels` order -> (N, K) float labels 1.0 / 0.0 / -1.0."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.labels):
            raise ValueError(f"expected (N, {len(self.labels)}) probabilities, got {probs.shape}")
        out = (probs >= np.asarray(self.values)).astype(np.float64)
        if self.band is not None:
            low, high = np.asarray(self.band, dtype=np.float64).T
            out[(probs >= low) & (probs < high)] = -1.0
        return out

    def in_band(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) bool: which predictions fall inside the uncertainty band (all False without)."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.band is None:
            return np.zeros(probs.shape, dtype=bool)
        low, high = np.asarray(self.band, dtype=np.float64).T
        return (probs >= low) & (probs < high)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "chosen_on": self.chosen_on,
            "values": dict(zip(self.labels, self.values, strict=True)),
            "band": None
            if self.band is None
            else {k: list(b) for k, b in zip(self.labels, self.band, strict=True)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        labels = tuple(data["values"])
        band = data.get("band")
        return cls(
            labels,
            tuple(float(data["values"][k]) for k in labels),
            data.get("rule", "fixed"),
            None if band is None else tuple((float(band[k][0]), float(band[k][1])) for k in labels),
            data.get("chosen_on", ""),
        )


def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, rule: str) -> float:
    """One label's threshold on its certain rows by `rule`.

    youden: maximise sensitivity + specificity - 1; max_f1: maximise F1. Candidates are the
    observed scores (predict positive when score >= candidate). Without both classes the
    default 0.5 is kept, since nothing can be learned from the data.
    """
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {RULES}")
    y_true = np.asarray(y_true, dtype=bool)
    y_score = np.asarray(y_score, dtype=np.float64)
    if rule == "fixed" or y_true.all() or not y_true.any():
        return DEFAULT_THRESHOLD
    order = np.argsort(-y_score, kind="stable")
    scores, truth = y_score[order], y_true[order]
    # Predicting positive for every score >= scores[i]: counts at the last index of each tie.
    tp = np.cumsum(truth)
    fp = np.cumsum(~truth)
    last = np.r_[scores[1:] != scores[:-1], True]
    tp, fp, cand = tp[last], fp[last], scores[last]
    pos, neg = truth.sum(), (~truth).sum()
    youden = tp / pos - fp / neg
    f1 = 2 * tp / (2 * tp + fp + (pos - tp))
    value = youden if rule == "youden" else f1
    best = float(cand[int(np.argmax(value))])
    return min(max(best, 0.0), 1.0)


def choose_thresholds(
    y_true: np.ndarray,
    y_score: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    rule: str,
    *,
    chosen_on: str = "",
    band: float = 0.0,
) -> Thresholds:
    """Per-label thresholds on (N, K) arrays by `rule`; masked entries are left out.

    The one place thresholds are chosen (training, `cxrlabel thresholds`, evaluate --rule,
    approach-1 heads): `chosen_on` describes the data and is dropped for the fixed rule, which
    is not chosen on any data; `band` > 0 adds the +/- uncertainty band.
    """
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {RULES}")
    values = []
    for k in range(len(labels)):
        keep = np.asarray(mask[:, k], dtype=bool)
        t = choose_threshold(y_true[keep, k], y_score[keep, k], rule)
        values.append(DEFAULT_THRESHOLD if math.isnan(t) else t)
    chosen_on = "" if rule == "fixed" else chosen_on
    thresholds = Thresholds(tuple(labels), tuple(values), rule, None, chosen_on)
    return thresholds.with_band(band) if band > 0 else thresholds


COMBINE_RULES = ("mean", "first")


def combine_thresholds(
    parts: Sequence[Thresholds], labels: Sequence[str], *, how: str = "mean"
) -> Thresholds:
    """Several models' thresholds as one set for `labels`: the one place they are combined.

    Per label, the parts that hold it contribute: how='mean' averages their values and bands
    (an ensemble's members), how='first' takes the first part's (the labeller's frontal model
    before its lateral model, over the union of their labels). Identical parts pass through
    unchanged (`cxrlabel thresholds` on an ensemble stores the same ones in every member).

    A label whose contributors all have a band gets theirs; one where only some do gets none
    (averaging a band with no band would invent one), with a warning. The result has a band
    when any label got one; labels without get a zero-width band, which marks nothing uncertain.
    """
    if how not in COMBINE_RULES:
        raise ValueError(f"how must be one of {COMBINE_RULES}, not {how!r}")
    if not parts:
        raise ValueError("no thresholds to combine")
    labels = tuple(labels)
    sources: list[list[Thresholds]] = []
    for name in labels:
        having = [t for t in parts if name in t.labels]
        if not having:
            raise KeyError(f"no threshold stored for {name!r} in any of {len(parts)} models")
        sources.append(having[:1] if how == "first" else having)
    used = list({id(t): t for having in sources for t in having}.values())
    if all(t == used[0] for t in used[1:]):
        return used[0].subset(labels)

    values, bands, has_band, disagree = [], [], False, False
    for name, having in zip(labels, sources, strict=True):
        subsets = [t.subset([name]) for t in having]
        value = float(np.mean([t.values[0] for t in subsets]))
        values.append(value)
        if all(t.band is not None for t in subsets):
            low, high = np.mean([t.band[0] for t in subsets], axis=0)  # type: ignore[index]
            bands.append((float(low), float(high)))
            has_band = True
        else:
            disagree |= any(t.band is not None for t in subsets)
            bands.append((value, value))
    if disagree:
        log.warning(
            "the models disagree on the uncertainty band (some have none): those labels get "
            "no band; run `cxrlabel thresholds` on the ensemble to choose one for it"
        )
    rules = ", ".join(dict.fromkeys(t.rule for t in used))
    if how == "mean":
        note = f"mean of {len(used)} members' thresholds (rules: {rules})"
    else:
        note = f"per label, the first of {len(used)} models' thresholds that has it ({rules})"
    band = tuple(bands) if has_band else None
    return Thresholds(labels, tuple(values), used[0].rule, band, note)
