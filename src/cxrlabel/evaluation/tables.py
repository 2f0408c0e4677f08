"""Tables: the one number formatter, the one markdown-table renderer, and the terminal and
JSON tables of evaluations (the summary in the method's layout, per-label metrics with CIs).

`markdown_table` renders a DataFrame (evaluate, compare and the sweep tables);
`markdown_lines` renders rows of cells and is what both it and the report's tables use.
`evaluation_record` / `save_evaluations` write the JSON that `cxrlabel compare` reads beside a
report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxrlabel.evaluation.metrics import METRIC_NAMES
from cxrlabel.fileio import atomic_write_text

if TYPE_CHECKING:
    from cxrlabel.evaluation.metrics import Evaluation

EVALUATION_FILE = "evaluation.json"
# The method's summary columns (Table I / II: Acc, Prec, Recall, F Score, AUROC).
SUMMARY_METRICS = ("Accuracy", "Precision", "Recall", "F1", "AUROC")
NA = "n/a"


def fmt(value: object, digits: int = 3) -> str:
    """The one number formatter of tables and reports: `digits` decimals, whole numbers as
    they are, NaN/None as 'n/a', text unchanged."""
    if value is None:
        return NA
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return str(int(value))
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return NA if math.isnan(number) else f"{number:.{digits}f}"


def fmt_ci(value: object, low: object, high: object) -> str:
    """'0.812 [0.751, 0.870]'; 'n/a' without a value; the bare value without a CI."""
    if fmt(value) == NA:
        return NA
    if fmt(low) == NA or fmt(high) == NA:
        return fmt(value)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def label_row(frame: pd.DataFrame, label: str) -> pd.Series | None:
    hits = frame[frame["Label"] == label]
    return None if hits.empty else hits.iloc[0]


def markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_lines(
    columns: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]
) -> list[str]:
    """A markdown table of text cells: header, alignment rule (right-aligned where `right`),
    one line per row; cells are escaped so a '|' never splits a column."""
    rule = ["---:" if r else "---" for r in right]
    return [
        "| " + " | ".join(markdown_cell(c) for c in columns) + " |",
        "|" + "|".join(rule) + "|",
        *("| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows),
    ]


def markdown_table(
    frame: pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    digits: int | Mapping[str, int] = 2,
) -> str:
    """A markdown table: text columns left-aligned, numeric ones right-aligned, NaN as n/a.

    `digits` is one number of decimals for every float, or one per column (default 2).
    """
    columns = list(frame.columns if columns is None else columns)
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in columns]
    rows = []
    # Records, not iterrows: a row Series of numbers only would turn every int into a float.
    for row in frame.to_dict("records"):
        cells = []
        for column, is_number in zip(columns, numeric, strict=True):
            value = row[column]
            places = digits.get(column, 2) if isinstance(digits, Mapping) else digits
            cells.append(fmt(value, places) if is_number else str(value))
        rows.append(cells)
    return "\n".join(markdown_lines(columns, rows, numeric)) + "\n"


def _mean_row(evaluation: Evaluation) -> pd.Series:
    return evaluation.table.set_index("Label").loc["Mean"]


def _ci_row(evaluation: Evaluation, label: str) -> pd.Series | None:
    ci = evaluation.ci.set_index("Label")
    return ci.loc[label] if label in ci.index else None


def summary_frame(evaluations: Sequence[Evaluation], names: Sequence[str]) -> pd.DataFrame:
    """One row per evaluation: dataset, model, kind, unit, N and the method's mean metrics."""
    rows = []
    for name, ev in zip(names, evaluations, strict=True):
        pred, mean, ci = ev.predictions, _mean_row(ev), _ci_row(ev, "Mean")
        unit = pred.unit if pred.unit == "image" else f"study ({pred.aggregate})"
        row: dict[str, Any] = {
            "Dataset": name,
            "Model": pred.model,
            "Kind": pred.kind,
            "Unit": unit,
            "N": len(pred),
            **{m: float(mean[m]) for m in SUMMARY_METRICS},
        }
        row["AUROC 95% CI"] = _ci_text(ci)
        rows.append(row)
    return pd.DataFrame(rows)


def _ci_text(ci: pd.Series | None) -> str:
    if ci is None or not all(math.isfinite(float(ci[c])) for c in ("Low", "High")):
        return "n/a"
    return f"{float(ci['Low']):.3f}-{float(ci['High']):.3f}"


def per_label_frame(evaluation: Evaluation) -> pd.DataFrame:
    """The metrics table with each label's AUROC CI beside it."""
    table = evaluation.table.copy()
    table.insert(table.columns.get_loc("AUROC") + 1, "AUROC 95% CI", "n/a")
    for i, label in enumerate(table["Label"]):
        table.loc[i, "AUROC 95% CI"] = _ci_text(_ci_row(evaluation, label))
    return table


def format_evaluations(evaluations: Sequence[Evaluation], names: Sequence[str]) -> str:
    """Summary table, then per-label tables: what `cxrlabel evaluate` prints."""
    digits = {"AUROC": 3, "AUPRC": 3, "Threshold": 3}
    parts = [markdown_table(summary_frame(evaluations, names), digits=digits)]
    for name, ev in zip(names, evaluations, strict=True):
        pred = ev.predictions
        t = pred.thresholds
        band = "" if t.band is None else ", with an uncertainty band"
        parts.append(
            f"\n{name}: {pred.data}; {pred.model} ({pred.kind}), {pred.unit} level; "
            f"thresholds {t.rule}{band}"
            + (f" (chosen on {t.chosen_on})" if t.chosen_on else "")
            + f"; AUROC CIs from {ev.n_resamples} bootstrap resamples of studies\n"
        )
        parts.append(markdown_table(per_label_frame(ev), digits=digits))
        missing = ev.table.attrs.get("auroc_na") or []
        if missing:
            parts.append(
                f"AUROC n/a (one class only), left out of the mean: {', '.join(missing)}\n"
            )
    return "".join(parts)


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict("records")]


def evaluation_record(evaluation: Evaluation, name: str) -> dict[str, Any]:
    """One evaluation as JSON-able data: what, how, and the numbers (NaN as null)."""
    pred, mean, ci = evaluation.predictions, _mean_row(evaluation), _ci_row(evaluation, "Mean")
    return {
        "dataset": name,
        "data": pred.data,
        "synthetic": pred.synthetic,
        "model": pred.model,
        "kind": pred.kind,
        "tta": pred.tta,
        "unit": pred.unit,
        "aggregate": pred.aggregate,
        "n": len(pred),
        "thresholds": pred.thresholds.to_dict(),
        "mean": {m: _json_value(mean[m]) for m in METRIC_NAMES},
        "auroc_ci": None if ci is None else [_json_value(ci["Low"]), _json_value(ci["High"])],
        "auroc_na": list(evaluation.table.attrs.get("auroc_na") or []),
        "labels": _records(evaluation.table),
        "ci": _records(evaluation.ci),
        "n_resamples": evaluation.n_resamples,
        "seed": evaluation.seed,
    }


def save_evaluations(
    path: Path,
    evaluations: Sequence[Evaluation],
    names: Sequence[str],
    *,
    models: Sequence[str | Path] = (),
) -> Path:
    """Write `evaluation.json` (read by `compare_runs`) atomically; return its path."""
    data = {
        "models": [str(m) for m in models],
        "evaluations": [
            evaluation_record(ev, name) for ev, name in zip(evaluations, names, strict=True)
        ],
    }
    atomic_write_text(Path(path), json.dumps(data, indent=2))
    return Path(path)
