"""Evaluation reports: `report.md` and a self-contained `report.html` from `Evaluation`s.

One report holds one or more evaluations. They may be one model on several datasets (validation
and test rows of the summary, as in the method's Tables II and IV) or several models on the
same data (side by side, as in benchmarks/real_nih.py). Every table has one row or one column
group per evaluation, and every plot one line per evaluation, so both read the same way.

The report is built once as a list of sections made of a few plain parts (text, bullet lists,
tables, figures) and then rendered twice: to Markdown, which links the PNG files written beside
it, and to HTML, which embeds the same PNGs as base64 data so the file stands alone (no external
references at all). All text that goes into HTML is escaped.

Contents: what the data are (synthetic or real) and which unit (image/study) was scored; the
summary in the method's layout; per-label AUROC with bootstrap CIs; the comparison with the
CheXpert paper's five competition labels (marked as a different dataset unless the data are
CheXpert's validation set); all per-label metrics; the uncertainty band when one is set; ROC and
precision-recall curves; the reliability diagram; the run's loss curves; and the label
statistics (Table 1 layout) of the evaluated data.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cxrlabel.data.labels import LABEL_SETS, OBSERVATIONS
from cxrlabel.evaluation.figures import (
    calibration_of,
    loss_plot_png,
    pr_figure,
    reliability_figure,
    roc_figure,
)
from cxrlabel.evaluation.tables import NA, fmt, fmt_ci, label_row, markdown_lines
from cxrlabel.fileio import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from cxrlabel.data.stats import LabelStats
    from cxrlabel.evaluation.metrics import Evaluation
    from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

# The CheXpert paper (Irvin et al., AAAI 2019), Table 2, U-Ignore: validation AUROCs of an
# ensemble of 30 checkpoints, scored per study (max over its views).
PAPER_AUROC: dict[str, float] = {
    "Atelectasis": 0.818,
    "Cardiomegaly": 0.828,
    "Consolidation": 0.938,
    "Edema": 0.934,
    "Pleural Effusion": 0.928,
}
PAPER_SETTING = (
    "CheXpert paper (Irvin et al., 2019), U-Ignore: CheXpert validation set (200 studies), "
    "ensemble of 30 checkpoints, study level"
)


# ---------------------------------------------------------------------------------------------
# Document parts, rendered to Markdown and to HTML


@dataclass(frozen=True)
class Text:
    text: str
    style: str = ""  # "" | "note" | "warning" | "banner"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    title: str = ""
    style: str = "box"


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str = ""  # one "l" or "r" per column; default: first left, rest right
    groups: tuple[tuple[str, int], ...] = ()  # header groups over the columns: (name, span)
    caption: str = ""

    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.columns) - 1)


@dataclass(frozen=True)
class Picture:
    file: str  # PNG file name beside report.md
    png: bytes
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Heading:
    text: str  # a sub-heading inside a section


Part = Text | Bullets | Table | Picture | Heading


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    parts: tuple[Part, ...]


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def _unit_text(evaluation: Evaluation) -> str:
    pred = evaluation.predictions
    if pred.unit == "study":
        how = f" ({pred.aggregate} over its images)" if pred.aggregate else ""
        return f"study{how}"
    return "image"


def _count_text(evaluation: Evaluation) -> str:
    pred = evaluation.predictions
    return f"{len(pred)} {'studies' if pred.unit == 'study' else 'images'}"


def _na_labels(evaluation: Evaluation) -> list[str]:
    """Labels whose AUROC is undefined (one class only, or no certain rows)."""
    listed = evaluation.table.attrs.get("auroc_na")
    if listed is not None:
        return list(listed)
    rows = evaluation.table[evaluation.table["Label"] != "Mean"]
    return [str(r["Label"]) for _, r in rows.iterrows() if math.isnan(float(r["AUROC"]))]


def _na_reason(evaluation: Evaluation, label: str) -> str:
    row = label_row(evaluation.table, label)
    if row is None:
        return "not evaluated"
    pos, neg = int(row.get("Positives", 0)), int(row.get("Negatives", 0))
    if pos + neg == 0:
        return "no labelled rows"
    return (
        f"{'only positives' if neg == 0 else 'only negatives'} among its {pos + neg} labelled rows"
    )


def column_names(evaluations: Sequence[Evaluation], datasets: Sequence[str]) -> list[str]:
    """Short, distinct names for the evaluations' columns and plot legends."""
    models = [e.predictions.model or "model" for e in evaluations]
    if len(evaluations) == 1:
        names = [models[0]]
    elif len(set(models)) == 1:
        names = list(datasets)
    elif len(set(datasets)) == 1:
        names = models
    else:
        names = [f"{m} · {d}" for m, d in zip(models, datasets, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def all_labels(evaluations: Sequence[Evaluation]) -> list[str]:
    """Every evaluated label, in CheXpert order first, then any others in order of appearance."""
    found: list[str] = []
    for evaluation in evaluations:
        found += [name for name in evaluation.predictions.labels if name not in found]
    known = [name for name in OBSERVATIONS if name in found]
    return known + [name for name in found if name not in known]


# ---------------------------------------------------------------------------------------------
# Sections


def _about_section(
    evaluations: Sequence[Evaluation], datasets: Sequence[str], names: Sequence[str]
) -> Section:
    """Two boxes: the distinct data that were scored, and the models that scored them."""
    data: dict[str, None] = {}
    models: dict[str, None] = {}
    for evaluation, dataset, name in zip(evaluations, datasets, names, strict=True):
        pred = evaluation.predictions
        origin = "SYNTHETIC (built-in generated radiographs)" if pred.synthetic else "Real data"
        about = f" — {pred.data}" if pred.data and pred.data != dataset else ""
        data[
            f"{dataset}{about}. {origin}; unit: {_unit_text(evaluation)}; "
            f"{_count_text(evaluation)} of {len(set(pred.patient_ids))} patients; "
            f"{len(pred.labels)} labels ({', '.join(pred.labels)})"
        ] = None
        thresholds = pred.thresholds
        chosen = f", chosen on {thresholds.chosen_on}" if thresholds.chosen_on else ""
        band = "" if thresholds.band is None else ", with an uncertainty band"
        model = "" if name == pred.model else f" ({pred.model})"
        notes = "".join(f" {note}." for note in pred.notes)
        models[
            f"{name}{model}: {pred.kind}; thresholds {_thresholds_text(thresholds)}{chosen}"
            f"{band}.{notes}"
        ] = None
    return Section(
        "data",
        "What these data are",
        (Bullets(tuple(data), title="Data"), Bullets(tuple(models), title="Models")),
    )


def _thresholds_text(thresholds: Thresholds) -> str:
    values = set(thresholds.values)
    if len(values) == 1:
        return f"{thresholds.rule} at {fmt(values.pop(), 2)}"
    return f"{thresholds.rule}, per label (see All metrics per label)"


def _summary_section(
    evaluations: Sequence[Evaluation], datasets: Sequence[str], names: Sequence[str]
) -> Section:
    columns = ("Model", "Kind", "Dataset", "Unit", "N", "Accuracy", "Precision", "Recall")
    columns += ("F Score", "AUROC [95% CI]")
    rows = []
    for evaluation, dataset in zip(evaluations, datasets, strict=True):
        pred = evaluation.predictions
        mean = label_row(evaluation.table, "Mean")
        ci = label_row(evaluation.ci, "Mean")
        metrics = ["Accuracy", "Precision", "Recall", "F1"]
        values = [fmt(None if mean is None else mean[m]) for m in metrics]
        auroc = NA if mean is None else fmt_ci(mean["AUROC"], *_low_high(ci))
        rows.append(
            (pred.model, pred.kind, dataset, _unit_text(evaluation), str(len(pred)), *values, auroc)
        )
    parts: list[Part] = [
        Text(
            "One row per evaluation, in the method's layout (Tables II and IV): each metric is "
            "the mean over the labels of the per-label value; Accuracy, Precision, Recall and "
            "F Score at each label's decision threshold. The 95% CI is a bootstrap interval of "
            "the mean AUROC."
        ),
        Table(columns, tuple(rows), align="llll" + "r" * 6),
    ]
    parts += _na_notes(evaluations, names)
    return Section("summary", "Summary", tuple(parts))


def _low_high(ci_row: pd.Series | None) -> tuple[object, object]:
    return (None, None) if ci_row is None else (ci_row["Low"], ci_row["High"])


def _na_notes(evaluations: Sequence[Evaluation], names: Sequence[str]) -> list[Part]:
    notes: list[Part] = []
    for evaluation, name in zip(evaluations, names, strict=True):
        missing = _na_labels(evaluation)
        if missing:
            which = ", ".join(f"{m} ({_na_reason(evaluation, m)})" for m in missing)
            them = "it is" if len(missing) == 1 else "they are"
            notes.append(
                Text(
                    f"{name}: AUROC is n/a for {which}: one class only, so {them} left out of "
                    "the mean AUROC.",
                    "note",
                )
            )
    return notes


def _auroc_section(
    evaluations: Sequence[Evaluation], names: Sequence[str], labels: Sequence[str]
) -> Section:
    columns: list[str] = ["Label"]
    groups: list[tuple[str, int]] = [("", 1)]
    for name in names:
        columns += ["AUROC", "95% CI", "Pos / Neg"]
        groups.append((name, 3))
    rows = []
    for label in [*labels, "Mean"]:
        cells = [label]
        for evaluation in evaluations:
            row, ci = label_row(evaluation.table, label), label_row(evaluation.ci, label)
            if row is None:
                cells += ["not evaluated", "", ""]
                continue
            low, high = _low_high(ci)
            interval = (
                "" if fmt(row["AUROC"]) == NA or fmt(low) == NA else f"{fmt(low)}–{fmt(high)}"
            )
            counts = f"{int(row['Positives'])} / {int(row['Negatives'])}"
            cells += [fmt(row["AUROC"]), interval, counts]
        rows.append(tuple(cells))
    resamples = sorted({e.n_resamples for e in evaluations})
    seeds = sorted({e.seed for e in evaluations})
    text = (
        "95% confidence intervals: percentile bootstrap, resampling studies with replacement "
        "(all images of a study move together; one image per study makes it an image "
        f"bootstrap), {', '.join(map(str, resamples))} resamples, seed "
        f"{', '.join(map(str, seeds))}. "
        "The Mean row is the mean over the labels with a defined AUROC."
    )
    parts: list[Part] = [Text(text), Table(tuple(columns), tuple(rows), groups=tuple(groups))]
    if any(_na_labels(e) for e in evaluations):
        parts.append(
            Text(
                "n/a: the label has one class only among its labelled rows, so it has no AUROC "
                "and is left out of the Mean (see the Summary for which labels and why).",
                "note",
            )
        )
    return Section("auroc", "AUROC per label with 95% confidence intervals", tuple(parts))


def _chexpert_section(
    evaluations: Sequence[Evaluation],
    datasets: Sequence[str],
    names: Sequence[str],
    chexpert_valid: bool,
) -> Section:
    competition = list(LABEL_SETS["competition"])
    marker = "" if chexpert_valid else " (different dataset)"
    columns = ("Label", "CheXpert paper", *(f"{n}{marker}" for n in names))
    rows = []
    own_means: list[str] = []
    for evaluation in evaluations:
        values = [label_row(evaluation.table, label) for label in competition]
        aurocs = [math.nan if r is None else float(r["AUROC"]) for r in values]
        defined = [a for a in aurocs if not math.isnan(a)]
        own_means.append(
            fmt(np.mean(defined))
            if len(defined) == len(competition)
            else f"{NA} ({len(defined)} of {len(competition)} labels)"
        )
    for label in competition:
        cells = [label, fmt(PAPER_AUROC[label])]
        for evaluation in evaluations:
            row, ci = label_row(evaluation.table, label), label_row(evaluation.ci, label)
            cells.append("not evaluated" if row is None else fmt_ci(row["AUROC"], *_low_high(ci)))
        rows.append(tuple(cells))
    rows.append(("Mean of the five", fmt(np.mean(list(PAPER_AUROC.values()))), *own_means))
    parts: list[Part] = []
    evaluated_on = "; ".join(dict.fromkeys(datasets))
    if chexpert_valid:
        parts.append(
            Text(
                "Same dataset as the paper (CheXpert's validation set). Remaining differences: "
                "the paper's figures come from an ensemble of 30 checkpoints scored per study; "
                "the figures beside them are "
                + "; ".join(
                    f"{n}: {e.predictions.kind}, {_unit_text(e)} level"
                    for n, e in zip(names, evaluations, strict=True)
                )
                + ".",
                "note",
            )
        )
    else:
        parts.append(
            Text(
                "DIFFERENT DATASET — not a like-for-like comparison. The paper's AUROCs are on "
                "CheXpert's validation set (200 studies, scored per study by an ensemble of 30 "
                f"checkpoints). The figures beside them are on: {evaluated_on}"
                ". Other images, other labellers and other prevalences: the columns only place "
                "the numbers side by side for orientation.",
                "warning",
            )
        )
    parts.append(Table(columns, tuple(rows), caption=f"Paper: {PAPER_SETTING}."))
    return Section("chexpert", "Comparison with the CheXpert paper", tuple(parts))


def _metrics_section(evaluations: Sequence[Evaluation], names: Sequence[str]) -> Section:
    from cxrlabel.evaluation.metrics import METRIC_NAMES

    parts: list[Part] = []
    for evaluation, name in zip(evaluations, names, strict=True):
        table = evaluation.table
        metric_columns = [m for m in METRIC_NAMES if m in table.columns]
        columns = ("Label", "Threshold", *metric_columns, "Positives", "Negatives")
        rows = []
        for _, row in table.iterrows():
            label = str(row["Label"])
            threshold = "" if label == "Mean" else fmt(row.get("Threshold"), 2)
            cells = [label, threshold, *(fmt(row[m]) for m in metric_columns)]
            cells += [str(int(row["Positives"])), str(int(row["Negatives"]))]
            rows.append(tuple(cells))
        thresholds = evaluation.predictions.thresholds
        chosen = f", chosen on {thresholds.chosen_on}" if thresholds.chosen_on else ""
        parts.append(Heading(name))
        parts.append(
            Table(
                columns,
                tuple(rows),
                caption=f"{evaluation.predictions.kind}; {_count_text(evaluation)}; "
                f"unit {_unit_text(evaluation)}; thresholds: {thresholds.rule}{chosen}.",
            )
        )
    return Section("metrics", "All metrics per label", tuple(parts))


def _band_section(evaluations: Sequence[Evaluation], names: Sequence[str]) -> Section | None:
    with_band = [(e, n) for e, n in zip(evaluations, names, strict=True) if e.band is not None]
    if not with_band:
        return None
    parts: list[Part] = [
        Text(
            "With an uncertainty band a prediction whose probability lies in [low, high) is "
            "labelled uncertain (-1) instead of positive or negative. 'In band' counts those "
            "predictions among the labelled rows; the metrics are computed on the rest."
        )
    ]
    for evaluation, name in with_band:
        band = evaluation.band
        assert band is not None  # for the type checker: filtered above
        shown = [c for c in band.columns if c not in ("Label", "Low", "High")]
        rows = []
        for _, row in band.iterrows():
            interval = (
                "" if fmt(row["Low"]) == NA else f"[{fmt(row['Low'], 2)}, {fmt(row['High'], 2)})"
            )
            cells = [str(row["Label"]), interval]
            for column in shown:
                value = row[column]
                if column in ("In band", "Positives", "Negatives"):
                    cells.append(str(int(value)))
                else:
                    cells.append(fmt(value, 1 if column.endswith("%") else 3))
            rows.append(tuple(cells))
        parts.append(Heading(name))
        parts.append(Table(("Label", "Band", *shown), tuple(rows)))
    return Section("band", "Uncertainty band", tuple(parts))


def _series_text(
    evaluations: Sequence[Evaluation], datasets: Sequence[str], names: Sequence[str]
) -> str:
    return "Lines: " + "; ".join(
        f"{n}: "
        + ("" if n == e.predictions.model else f"{e.predictions.model}, ")
        + f"{e.predictions.kind}, on {d}, {_count_text(e)}"
        for e, d, n in zip(evaluations, datasets, names, strict=True)
    )


def _curves_section(
    evaluations: Sequence[Evaluation],
    datasets: Sequence[str],
    names: Sequence[str],
    labels: Sequence[str],
) -> Section:
    series = _series_text(evaluations, datasets, names)
    return Section(
        "curves",
        "ROC and precision-recall curves",
        (
            Picture(
                "roc_curves.png",
                roc_figure(evaluations, names, labels),
                "ROC curves per label",
                series,
            ),
            Picture(
                "pr_curves.png",
                pr_figure(evaluations, names, labels),
                "Precision-recall curves per label",
                series,
            ),
        ),
    )


def _calibration_section(
    evaluations: Sequence[Evaluation],
    datasets: Sequence[str],
    names: Sequence[str],
    labels: Sequence[str],
) -> Section:
    rows = []
    for label in labels:
        cells = [label]
        for evaluation in evaluations:
            calibration = calibration_of(evaluation, label)
            cells.append("not evaluated" if calibration is None else fmt(calibration.ece))
        rows.append(tuple(cells))
    text = (
        "Each point is one bin of predicted probability: its mean prediction against the "
        "fraction of positives in it; a calibrated model lies on the diagonal. Expected "
        "calibration error (ECE): the count-weighted mean distance from the diagonal."
    )
    return Section(
        "calibration",
        "Calibration (reliability diagram)",
        (
            Text(text),
            Picture(
                "reliability.png",
                reliability_figure(evaluations, names, labels),
                "Reliability diagrams per label",
                _series_text(evaluations, datasets, names),
            ),
            Table(("Label", *(f"ECE {n}" for n in names)), tuple(rows)),
        ),
    )


def read_loss_rows(run_dir: Path) -> list[dict[str, object]]:
    """The rows of a run folder's metrics.csv, checked for the columns (see
    cxrlabel.models.run_folder)."""
    from cxrlabel.models.run_folder import RunFolder, read_metrics

    return read_metrics(RunFolder(Path(run_dir)).metrics)


def _loss_section(runs: Sequence[tuple[Path, list[dict[str, object]]]]) -> Section:
    if not runs:
        note = "No training run folder was given (e.g. external predictions): no loss curves."
        return Section("loss", "Training loss curves", (Text(note, "note"),))
    parts: list[Part] = []
    for i, (run_dir, rows) in enumerate(runs):
        file = "loss.png" if len(runs) == 1 else f"loss_{i + 1}.png"
        epochs = [r for r in rows if r["kind"] == "epoch"]
        steps = [r for r in rows if r["kind"] == "step"]
        caption = f"Run folder {run_dir}: {len(steps)} steps, {len(epochs)} epochs."
        parts.append(Heading(f"Run {run_dir.name}"))
        alt = f"Loss curves of run {run_dir.name}"
        parts.append(Picture(file, loss_plot_png(rows), alt, caption))
    return Section("loss", "Training loss curves", tuple(parts))


def _stats_section(stats: LabelStats | None) -> Section:
    if stats is None:
        return Section(
            "label-stats",
            "Label statistics of the evaluated data",
            (Text("Label statistics were not given for this report.", "note"),),
        )
    table = stats.formatted()
    rows = tuple(tuple(str(v) for v in r) for r in table.itertuples(index=False))
    return Section(
        "label-stats",
        "Label statistics of the evaluated data",
        (
            Text(
                "Positive, uncertain and negative counts (percent) in the CheXpert paper's "
                "Table 1 layout, as cxrlabel stats prints them."
            ),
            Table(tuple(table.columns), rows, caption=stats.title()),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Rendering


def _md_table(table: Table) -> list[str]:
    if table.groups:
        # Markdown has no spanning headers: prefix each column with its group.
        names = []
        columns = iter(table.columns)
        for group, span in table.groups:
            for _ in range(span):
                column = next(columns)
                names.append(f"{group}: {column}" if group else column)
    else:
        names = list(table.columns)
    lines = markdown_lines(names, table.rows, [a == "r" for a in table.alignment()])
    if table.caption:
        lines += ["", f"*{table.caption}*"]
    return lines


def render_markdown(title: str, banner: str | None, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    if banner:
        lines += [f"> **{banner}**", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for part in section.parts:
            lines += _md_part(part)
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _md_part(part: Part) -> list[str]:
    if isinstance(part, Heading):
        return [f"### {part.text}"]
    if isinstance(part, Text):
        if part.style in ("warning", "banner"):
            return [f"> **{part.text}**"]
        return [f"> {part.text}"] if part.style == "note" else [part.text]
    if isinstance(part, Bullets):
        head = [f"**{part.title}**", ""] if part.title else []
        return head + [f"- {item}" for item in part.items]
    if isinstance(part, Table):
        return _md_table(part)
    caption = [f"*{part.caption}*"] if part.caption else []
    return [f"![{part.alt}]({part.file})", "", *caption]


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
  margin: 0; background: #fafafa; line-height: 1.45; }
main { max-width: 1280px; margin: 0 auto; padding: 16px 28px 48px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.4em 0; }
h2 { font-size: 1.3em; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
nav { font-size: 0.9em; margin: 8px 0 16px; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.88em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; }
th { background: #f0f3f6; font-weight: 600; text-align: center; }
td.r { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.l { text-align: left; }
td:first-child { white-space: nowrap; }
tr:last-child td { border-bottom: 2px solid #8c959f; }
tbody tr:nth-child(even) { background: #f8f9fa; }
caption { caption-side: bottom; text-align: left; font-size: 0.9em; color: #57606a;
  padding-top: 4px; }
.banner { background: #fff3b0; border: 2px solid #d4a72c; padding: 10px 14px; font-weight: 600;
  margin: 10px 0; }
.warning { background: #fff1f0; border-left: 5px solid #cf222e; padding: 8px 12px; }
.note { background: #f6f8fa; border-left: 4px solid #8c959f; padding: 6px 12px;
  font-size: 0.92em; }
#data { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
#data > h2 { flex-basis: 100%; }
.box { background: #eef6ff; border: 1px solid #b6d4fe; padding: 8px 14px; flex: 1 1 340px;
  max-width: 600px; }
.box h4 { margin: 2px 0 4px; }
.box ul { margin: 0; padding-left: 18px; }
figure { margin: 12px 0; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 0.9em; color: #57606a; }
"""


def render_html(title: str, banner: str | None, sections: Sequence[Section]) -> str:
    e = html.escape
    nav = " ".join(f'<a href="#{e(s.id)}">{e(s.title)}</a>' for s in sections)
    body = [f"<h1>{e(title)}</h1>"]
    if banner:
        body.append(f'<div class="banner">{e(banner)}</div>')
    body.append(f"<nav>{nav}</nav>")
    for section in sections:
        body.append(f'<section id="{e(section.id)}">\n<h2>{e(section.title)}</h2>')
        body += [_html_part(part) for part in section.parts]
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _html_part(part: Part) -> str:
    e = html.escape
    if isinstance(part, Heading):
        return f"<h3>{e(part.text)}</h3>"
    if isinstance(part, Text):
        cls = f' class="{e(part.style)}"' if part.style else ""
        return f"<p{cls}>{e(part.text)}</p>"
    if isinstance(part, Bullets):
        head = f"<h4>{e(part.title)}</h4>" if part.title else ""
        items = "".join(f"<li>{e(item)}</li>" for item in part.items)
        return f'<div class="{e(part.style)}">{head}<ul>{items}</ul></div>'
    if isinstance(part, Table):
        return _html_table(part)
    data = base64.b64encode(part.png).decode("ascii")
    caption = f"<figcaption>{e(part.caption)}</figcaption>" if part.caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{e(part.alt)}">{caption}</figure>'


def _html_table(table: Table) -> str:
    e = html.escape
    head = []
    if table.groups:
        cells = "".join(f'<th colspan="{span}">{e(name)}</th>' for name, span in table.groups)
        head.append(f"<tr>{cells}</tr>")
    head.append("<tr>" + "".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr>")
    align = table.alignment()
    body = [
        "<tr>"
        + "".join(f'<td class="{a}">{e(c)}</td>' for c, a in zip(row, align, strict=True))
        + "</tr>"
        for row in table.rows
    ]
    caption = f"<caption>{e(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead>{''.join(head)}</thead><tbody>{''.join(body)}</tbody></table>"


# ---------------------------------------------------------------------------------------------
# Entry point


def synthetic_banner(evaluations: Sequence[Evaluation], names: Sequence[str]) -> str | None:
    """A warning naming the synthetic evaluations; None when all data are real."""
    synthetic = [n for e, n in zip(evaluations, names, strict=True) if e.predictions.synthetic]
    if not synthetic:
        return None
    which = (
        "these numbers were"
        if len(synthetic) == len(names)
        else (f"the numbers of {', '.join(synthetic)} were")
    )
    return (
        f"SYNTHETIC DATA: {which} measured on built-in generated radiographs, not on real "
        "patients. They test the pipeline; they say nothing about clinical performance."
    )


def build_sections(
    evaluations: Sequence[Evaluation],
    *,
    datasets: Sequence[str],
    runs: Sequence[tuple[Path, list[dict[str, object]]]],
    label_stats: LabelStats | None,
    chexpert_valid: bool,
) -> list[Section]:
    """The report's sections; `runs` holds (run folder, its metrics.csv rows) pairs."""
    names = column_names(evaluations, datasets)
    labels = all_labels(evaluations)
    sections = [
        _about_section(evaluations, datasets, names),
        _summary_section(evaluations, datasets, names),
        _auroc_section(evaluations, names, labels),
        _chexpert_section(evaluations, datasets, names, chexpert_valid),
        _metrics_section(evaluations, names),
        _band_section(evaluations, names),
        _curves_section(evaluations, datasets, names, labels),
        _calibration_section(evaluations, datasets, names, labels),
        _loss_section(runs),
        _stats_section(label_stats),
    ]
    return [s for s in sections if s is not None]


def write_report(
    evaluations: Sequence[Evaluation],
    out_dir: Path,
    *,
    title: str,
    dataset_names: Sequence[str] | None = None,
    run_dirs: Sequence[Path] = (),
    label_stats: LabelStats | None = None,
    chexpert_valid: bool = False,
) -> tuple[Path, Path]:
    """Write report.md, report.html and the figures' PNG files into `out_dir`.

    dataset_names: one per evaluation (e.g. "validation", "test"); default: each predictions'
    own data description. run_dirs: training run folders whose metrics.csv gives the loss
    curves. chexpert_valid: True only when the evaluated data are CheXpert's validation set;
    otherwise the comparison with the paper is marked as a different dataset.
    Returns (report.md, report.html); every file is written atomically.
    """
    evaluations = list(evaluations)
    if not evaluations:
        raise ValueError("write_report needs at least one evaluation")
    if dataset_names is None:
        datasets = [e.predictions.data or f"evaluation {i + 1}" for i, e in enumerate(evaluations)]
    else:
        datasets = list(dataset_names)
        if len(datasets) != len(evaluations):
            raise ValueError(
                f"{len(datasets)} dataset name(s) for {len(evaluations)} evaluation(s): "
                "give one per evaluation"
            )
    # Read the run folders first: a missing metrics.csv fails before any figure is drawn.
    runs = [(Path(r), read_loss_rows(Path(r))) for r in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = build_sections(
        evaluations,
        datasets=datasets,
        runs=runs,
        label_stats=label_stats,
        chexpert_valid=chexpert_valid,
    )
    for section in sections:
        for part in section.parts:
            if isinstance(part, Picture):
                atomic_write_bytes(out_dir / part.file, part.png)
    banner = synthetic_banner(evaluations, column_names(evaluations, datasets))
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, render_markdown(title, banner, sections))
    atomic_write_text(html_path, render_html(title, banner, sections))
    log.info("report written to %s and %s", md_path, html_path)
    return md_path, html_path
