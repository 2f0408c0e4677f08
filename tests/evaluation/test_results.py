"""Predictions: shape checks, label subsets, and study-level max / mean aggregation with masks."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlabel.evaluation.results import Predictions
from cxrlabel.models.thresholds import Thresholds

LABELS = ("Cardiomegaly", "Edema")


def predictions() -> Predictions:
    """Two studies of patient p1 (s1: 3 views, s2: 1 view) and one of p2 (s3: 2 views), with
    the study rows interleaved to check grouping by id rather than by position."""
    study_ids = ("s1", "s2", "s1", "s3", "s1", "s3")
    patient_ids = ("p1", "p1", "p1", "p2", "p1", "p2")
    y_score = np.array(
        [[0.1, 0.9], [0.4, 0.2], [0.7, 0.3], [0.2, 0.6], [0.4, 0.6], [0.8, 0.1]], dtype=np.float32
    )
    y_true = np.array([[0, 1], [1, 0], [1, 0], [0, 0], [1, 0], [1, 1]], dtype=np.float64)
    mask = np.array(
        [[True, True], [True, False], [False, True], [True, False], [True, True], [True, False]]
    )
    return Predictions(
        labels=LABELS,
        paths=tuple(f"img{i}.png" for i in range(6)),
        patient_ids=patient_ids,
        study_ids=study_ids,
        y_score=y_score,
        y_true=y_true,
        mask=mask,
        thresholds=Thresholds.fixed(LABELS),
        model="m",
        data="toy",
    )


def test_study_level_max_and_masks() -> None:
    pred = predictions()
    study = pred.to_study_level("max")
    assert study.unit == "study" and study.aggregate == "max"
    assert study.study_ids == ("s1", "s2", "s3") and study.paths == ("s1", "s2", "s3")
    assert study.patient_ids == ("p1", "p1", "p2")
    np.testing.assert_allclose(study.y_score, [[0.7, 0.9], [0.4, 0.2], [0.8, 0.6]], rtol=1e-6)
    # Counted where any view counts: s2 Edema and s3 Edema have no counted view.
    np.testing.assert_array_equal(study.mask, [[True, True], [True, False], [True, False]])
    # s1 Cardiomegaly: the positive view 2 is masked, view 4 (counted) is positive -> 1.
    # s3 Edema: its only positive view is masked -> the study target stays 0 (and masked).
    np.testing.assert_array_equal(study.y_true, [[1, 1], [1, 0], [1, 0]])
    assert study.model == "m" and study.thresholds == pred.thresholds
    assert study.to_study_level("mean") is study  # already studies


def test_masked_positive_view_does_not_make_the_study_positive() -> None:
    pred = predictions()
    y_true = pred.y_true.copy()
    y_true[4, 0] = 0.0  # s1 Cardiomegaly: counted views 0 and 4 negative, masked view 2 positive
    study = pred.replace(y_true=y_true).to_study_level("max")
    assert study.y_true[0, 0] == 0.0 and study.mask[0, 0]


def test_study_level_mean() -> None:
    study = predictions().to_study_level("mean")
    assert study.aggregate == "mean"
    want = [[(0.1 + 0.7 + 0.4) / 3, (0.9 + 0.3 + 0.6) / 3], [0.4, 0.2], [0.5, 0.35]]
    np.testing.assert_allclose(study.y_score, want, rtol=1e-6)
    with pytest.raises(ValueError, match="aggregate"):
        predictions().to_study_level("median")


def test_subset_labels_and_frame() -> None:
    pred = predictions()
    sub = pred.subset_labels(["Edema"])
    assert sub.labels == ("Edema",) and sub.thresholds.labels == ("Edema",)
    np.testing.assert_array_equal(sub.y_score[:, 0], pred.y_score[:, 1])
    np.testing.assert_array_equal(sub.mask[:, 0], pred.mask[:, 1])
    frame = pred.frame()
    assert list(frame.columns) == ["Path", "patient_id", "study_id", *LABELS]
    assert len(frame) == len(pred) == 6
    assert frame["Edema"].iloc[0] == pytest.approx(0.9)


def test_shape_and_label_checks() -> None:
    pred = predictions()
    with pytest.raises(ValueError, match="y_score has shape"):
        pred.replace(y_score=pred.y_score[:, :1])
    with pytest.raises(ValueError, match="one patient id and one study id"):
        pred.replace(study_ids=pred.study_ids[:-1])
    with pytest.raises(ValueError, match="unit"):
        pred.replace(unit="series")
    with pytest.raises(ValueError, match="thresholds"):
        pred.replace(thresholds=Thresholds.fixed(("Edema", "Cardiomegaly")))
