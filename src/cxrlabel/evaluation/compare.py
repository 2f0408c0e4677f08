"""`cxrlabel compare`: one table of several training runs' best checkpoints.

Each row comes from a run folder (read through cxrlabel.models.run_folder): the model from
config.yaml, epochs and best epoch from summary.json, and the mean metrics from the run's saved
evaluation (report/evaluation.json, written by `cxrlabel evaluate`) when there is one, else
from summary.json's validation during training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cxrlabel.evaluation.tables import EVALUATION_FILE, SUMMARY_METRICS, markdown_table
from cxrlabel.models.run_folder import REPORT_DIR, RunFolder, read_json, read_summary


def compare_row(run_dir: Path, *, report_dir: str = REPORT_DIR) -> dict[str, Any]:
    """One run's row: model, epochs, best epoch, and its best checkpoint's mean metrics.

    The metrics come from the run's saved evaluation (`<run>/<report_dir>/evaluation.json`,
    its first dataset) when there is one, else from summary.json (validation during training,
    at the stored thresholds).
    """
    from cxrlabel.config import load_config
    from cxrlabel.models.factory import model_display_name

    folder = RunFolder(Path(run_dir))
    summary = read_summary(folder)
    config = load_config(folder.config)
    row: dict[str, Any] = {
        "Run": folder.root.name,
        "Model": model_display_name(config.backbone, config.head),
        "Epochs": int(summary.get("epochs") or 0),
        "Best epoch": "n/a" if summary.get("best_epoch") is None else str(summary["best_epoch"]),
    }
    saved = folder.root / report_dir / EVALUATION_FILE
    if saved.is_file():
        first = read_json(saved)["evaluations"][0]
        mean, thresholds = first["mean"], first["thresholds"]
        source = f"evaluate: {first['dataset']} ({first['unit']} level, {first['kind']})"
    else:
        mean = summary.get("val_mean") or {"AUROC": summary.get("val_auroc_mean")}
        thresholds = summary.get("thresholds") or {"rule": "fixed"}
        source = f"training validation ({summary.get('validation', 'images')})"
    row["Thresholds"] = thresholds.get("rule", "fixed")
    row["Metrics from"] = source
    for metric in SUMMARY_METRICS:
        value = mean.get(metric)
        row[metric] = math.nan if value is None else float(value)
    return row


def compare_runs(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """One row per run (see `compare_row`), in the order given."""
    if not run_dirs:
        raise ValueError("no run folders to compare")
    return pd.DataFrame([compare_row(Path(r)) for r in run_dirs])


def format_comparison(frame: pd.DataFrame) -> str:
    return markdown_table(frame, digits={"AUROC": 3})
