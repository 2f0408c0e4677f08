"""Tests for cxrlabel.evaluation.figures: every plot comes back as a PNG of the expected size."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cxrlabel.evaluation.figures import loss_plot_png, pr_figure, reliability_figure, roc_figure
from cxrlabel.evaluation.metrics import evaluate_predictions
from cxrlabel.evaluation.results import Predictions
from cxrlabel.models.thresholds import Thresholds

LABELS = ("Cardiomegaly", "Edema")


def _evaluation(seed: int, *, one_class: bool = False):
    rng = np.random.default_rng(seed)
    n = 40
    y_true = rng.integers(0, 2, size=(n, 2)).astype(np.float64)
    if one_class:
        y_true[:, 1] = 1.0
    y_score = np.clip(0.6 * y_true + 0.4 * rng.random((n, 2)), 0, 1)
    pred = Predictions(
        labels=LABELS,
        paths=tuple(f"f{i}.png" for i in range(n)),
        patient_ids=tuple(f"p{i}" for i in range(n)),
        study_ids=tuple(f"p{i}/s1" for i in range(n)),
        y_score=y_score,
        y_true=y_true,
        mask=np.ones((n, 2), dtype=bool),
        thresholds=Thresholds.fixed(LABELS),
    )
    return evaluate_predictions(pred, n_resamples=10)


def _size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png)).size


def test_curve_figures_have_one_panel_per_label() -> None:
    evaluations = [_evaluation(0), _evaluation(1, one_class=True)]
    names = ["a", "b"]
    for draw in (roc_figure, pr_figure, reliability_figure):
        one = _size(draw(evaluations, names, LABELS[:1]))
        two = _size(draw(evaluations, names, LABELS))
        assert two[0] > one[0], draw.__name__  # a second panel widens the grid


def test_loss_plot_draws_steps_and_epochs() -> None:
    rows = [{"kind": "step", "epoch": 0, "step": s, "train_loss": 1.0 / (s + 1)} for s in range(5)]
    rows.append({"kind": "epoch", "epoch": 0, "step": 4, "train_loss": 0.5, "val_loss": 0.6})
    assert _size(loss_plot_png(rows)) == (700, 600)
