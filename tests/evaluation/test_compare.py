"""`cxrlabel compare`: one row per run folder, from its summary or its saved evaluation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cxrlabel.data.formats import load_table
from cxrlabel.evaluation.compare import compare_row, compare_runs, format_comparison
from cxrlabel.evaluation.scoring import evaluate_checkpoint
from cxrlabel.evaluation.tables import save_evaluations
from cxrlabel.models.checkpoint import set_thresholds
from cxrlabel.models.thresholds import Thresholds
from cxrlabel.training.finetune import TrainResult

FAST = {"n_resamples": 20, "device": "cpu"}


def test_compare_runs_reads_summary_then_saved_evaluation(
    tiny_run: TrainResult, tiny_dataset: Path, tmp_path: Path
):
    run = Path(shutil.copytree(tiny_run.run_dir, tmp_path / "copy"))
    frame = compare_runs([tiny_run.run_dir, run])
    assert list(frame["Run"]) == ["tiny-run", "copy"]
    row = frame.iloc[0]
    summary = tiny_run.metrics
    assert row["Model"] == "Tiny_1" and row["Epochs"] == 3
    assert row["Best epoch"] == str(summary["best_epoch"])
    assert row["Accuracy"] == pytest.approx(summary["val_mean"]["Accuracy"])
    assert row["Metrics from"].startswith("training validation")
    # Once the copy has a saved evaluation, its row comes from that instead.
    table = load_table(tiny_dataset / "train.csv")
    set_thresholds(run / "checkpoints" / "best.safetensors", Thresholds.fixed(summary["labels"]))
    ev = evaluate_checkpoint(run / "checkpoints" / "best.safetensors", table, **FAST)
    save_evaluations(run / "report" / "evaluation.json", [ev], ["validation"])
    row = compare_runs([run]).iloc[0]
    assert row["Metrics from"].startswith("evaluate: validation")
    mean = ev.table.set_index("Label").loc["Mean"]
    assert row["F1"] == pytest.approx(mean["F1"]) and row["AUROC"] == pytest.approx(mean["AUROC"])
    with pytest.raises(FileNotFoundError, match=r"summary\.json"):
        compare_runs([tmp_path])


def test_compare_row_without_a_best_epoch_or_metrics(tiny_run: TrainResult, tmp_path: Path):
    """A run stopped before its first epoch ended: no best epoch, no validation metrics."""
    run = Path(shutil.copytree(tiny_run.run_dir, tmp_path / "early"))
    summary = json.loads((run / "summary.json").read_text())
    summary.update(best_epoch=None, epochs=0, val_mean=None, val_auroc_mean=None, thresholds=None)
    (run / "summary.json").write_text(json.dumps(summary))
    row = compare_row(run)
    assert row["Best epoch"] == "n/a" and row["Epochs"] == 0
    assert row["Thresholds"] == "fixed"
    assert all(math.isnan(row[m]) for m in ("Accuracy", "F1", "AUROC"))


def test_compare_errors_name_the_file(tiny_run: TrainResult, tmp_path: Path):
    with pytest.raises(ValueError, match="no run folders"):
        compare_runs([])
    run = Path(shutil.copytree(tiny_run.run_dir, tmp_path / "torn"))
    (run / "summary.json").write_text("{")
    with pytest.raises(ValueError, match=r"torn/summary\.json: cannot read"):
        compare_runs([run])


def test_format_comparison_is_a_markdown_table(tiny_run: TrainResult):
    frame = compare_runs([tiny_run.run_dir])
    lines = format_comparison(frame).splitlines()
    assert lines[0].startswith("| Run") and "| AUROC" in lines[0]
    assert lines[2].startswith("| tiny-run | Tiny_1 |")
    auroc = frame.iloc[0]["AUROC"]
    assert f"| {auroc:.3f} |" in lines[2]
