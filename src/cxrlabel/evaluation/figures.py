"""Figures: every plot of an evaluation (ROC, precision-recall, reliability, one panel per
label, one colour per evaluation in every plot) and a run's loss curves, as PNG bytes.

Figures are built on `matplotlib.figure.Figure` directly, not pyplot, so no global backend or
figure registry is touched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrlabel.evaluation.tables import NA, fmt, label_row

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from cxrlabel.evaluation.metrics import Calibration, Evaluation

# Colours per evaluation (matplotlib's tab10), so one evaluation has one colour in every plot.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _label_grid(
    labels: Sequence[str],
    draw: Callable[[Axes, str], None],
    title: str,
    names: Sequence[str],
    ncols: int = 4,
) -> bytes:
    """One small panel per label, drawn by `draw(axes, label)`, under one legend of `names`
    (evaluation i is drawn in COLOURS[i]; each panel's own legend holds only its numbers)."""
    # Figure directly, not pyplot: no global backend or figure registry is touched.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ncols = max(1, min(ncols, len(labels)))
    nrows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(3.1 * ncols, 3.0 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, label in zip(axes, labels, strict=False):
        ax.set_title(label, fontsize=10)
        draw(ax, label)
    for ax in axes[len(labels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=_colour(i), lw=2) for i in range(len(names))]
    fig.legend(
        handles,
        list(names),
        loc="outside upper center",
        ncols=min(len(names), 4),
        frameon=False,
        fontsize=9,
        title=title,  # the title sits above the series names, so the two never overlap
        title_fontsize=12,
    )
    return figure_png(fig)


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def _label_data(evaluation: Evaluation, label: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(y_true, y_score) on the labelled rows of one label; None when not evaluated."""
    pred = evaluation.predictions
    if label not in pred.labels:
        return None
    k = pred.labels.index(label)
    keep = np.asarray(pred.mask[:, k], dtype=bool)
    return np.asarray(pred.y_true[keep, k]), np.asarray(pred.y_score[keep, k])


def _both_classes(y_true: np.ndarray) -> bool:
    return bool(len(np.unique(y_true.astype(bool))) == 2)


def _metric(evaluation: Evaluation, label: str, column: str) -> str:
    row = label_row(evaluation.table, label)
    return NA if row is None or column not in row else fmt(row[column], 2)


def _curves(
    evaluations: Sequence[Evaluation], label: str
) -> Iterator[tuple[int, np.ndarray, dict]]:
    """(i, y_true, curves) for each evaluation that can draw `label` (both classes present)."""
    from cxrlabel.evaluation.metrics import curves

    for i, evaluation in enumerate(evaluations):
        data = _label_data(evaluation, label)
        if data is not None and _both_classes(data[0]):
            yield i, data[0], curves(*data)


@dataclass(frozen=True)
class _CurveKind:
    """What distinguishes the ROC from the precision-recall figure."""

    x: str
    y: str
    metric: str
    xlabel: str
    ylabel: str
    legend_at: str
    title: str
    diagonal: bool  # chance on the ROC plot
    prevalence: bool  # chance on the PR plot: a classifier that guesses scores the prevalence


ROC = _CurveKind(
    "fpr", "tpr", "AUROC", "1 - specificity", "sensitivity", "lower right", "ROC curves",
    diagonal=True, prevalence=False,
)  # fmt: skip
PR = _CurveKind(
    "recall", "precision", "AUPRC", "recall", "precision", "best",
    "Precision-recall curves (dotted: prevalence)", diagonal=False, prevalence=True,
)  # fmt: skip


def curve_figure(
    evaluations: Sequence[Evaluation], names: Sequence[str], labels: Sequence[str], kind: _CurveKind
) -> bytes:
    def draw(ax: Axes, label: str) -> None:
        if kind.diagonal:
            ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=0.8)
        for i, y_true, c in _curves(evaluations, label):
            value = _metric(evaluations[i], label, kind.metric)
            ax.plot(c[kind.x], c[kind.y], color=_colour(i), lw=1.3, label=value)
            if kind.prevalence:
                ax.axhline(float(np.mean(y_true)), color=_colour(i), ls=":", lw=0.8)
        _finish(ax, kind.xlabel, kind.ylabel, kind.metric, kind.legend_at)

    return _label_grid(labels, draw, kind.title, names)


def roc_figure(
    evaluations: Sequence[Evaluation], names: Sequence[str], labels: Sequence[str]
) -> bytes:
    return curve_figure(evaluations, names, labels, ROC)


def pr_figure(
    evaluations: Sequence[Evaluation], names: Sequence[str], labels: Sequence[str]
) -> bytes:
    return curve_figure(evaluations, names, labels, PR)


def reliability_figure(
    evaluations: Sequence[Evaluation], names: Sequence[str], labels: Sequence[str]
) -> bytes:
    def draw(ax: Axes, label: str) -> None:
        ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=0.8)
        for i, evaluation in enumerate(evaluations):
            calibration = calibration_of(evaluation, label)
            if calibration is None:
                continue
            bins = calibration.bins[calibration.bins["Count"] > 0]
            if bins.empty:
                continue
            x, y = bins["Mean score"], bins["Fraction positive"]
            ax.plot(x, y, "-", lw=0.9, color=_colour(i), label=fmt(calibration.ece, 3))
            # Point area by bin count: a bin of three films should not look like one of 300.
            size = 4 + 80 * bins["Count"] / bins["Count"].max()
            ax.scatter(x, y, s=size, color=_colour(i), alpha=0.8, zorder=3, linewidths=0)
        _finish(ax, "mean predicted probability", "fraction positive", "ECE", "best")

    return _label_grid(
        labels, draw, "Reliability diagrams (point area: predictions in the bin)", names
    )


def calibration_of(evaluation: Evaluation, label: str) -> Calibration | None:
    for calibration in evaluation.calibration:
        if calibration.label == label:
            return calibration
    return None


def _finish(ax: Axes, xlabel: str, ylabel: str, legend_title: str, where: str) -> None:
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.label.set_size(8)
    ax.yaxis.label.set_size(8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, lw=0.5)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=where, title=legend_title, title_fontsize=7)
    else:
        ax.text(
            0.5,
            0.5,
            "n/a: one class only",
            ha="center",
            va="center",
            fontsize=9,
            transform=ax.transAxes,
            color="#555555",
        )


def loss_plot_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG: training loss per step (top) and mean training and validation loss per epoch, from
    a run folder's metrics.csv rows (training writes it as plots/loss.png; reports embed it)."""
    from matplotlib.figure import Figure

    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    fig = Figure(figsize=(7, 6), tight_layout=True)
    top, bottom = fig.subplots(2, 1)
    top.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], lw=0.8)
    top.set(xlabel="step", ylabel="training loss", title="Training loss per step")
    x = [r["epoch"] for r in epochs]
    bottom.plot(x, [r["train_loss"] for r in epochs], "o-", label="train")
    bottom.plot(x, [r["val_loss"] for r in epochs], "s-", label="validation")
    bottom.set(xlabel="epoch", ylabel="loss", title="Loss per epoch")
    bottom.legend()
    return figure_png(fig)
