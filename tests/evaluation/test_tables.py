"""Tests for cxrlabel.evaluation.tables: the one number formatter and markdown renderer, the
terminal and JSON tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlabel.data.formats import load_table
from cxrlabel.evaluation.scoring import evaluate_checkpoint
from cxrlabel.evaluation.tables import (
    evaluation_record,
    fmt,
    markdown_lines,
    markdown_table,
    save_evaluations,
)
from cxrlabel.training.finetune import TrainResult

FAST = {"n_resamples": 20, "device": "cpu"}


def test_evaluation_record_is_json(tiny_run: TrainResult, tiny_dataset: Path, tmp_path: Path):
    table = load_table(tiny_dataset / "valid.csv")  # 2 images: most labels have one class
    ev = evaluate_checkpoint(tiny_run.best_checkpoint, table, **FAST)
    record = evaluation_record(ev, "validation")
    assert record["auroc_na"] == list(ev.table.attrs["auroc_na"]) and record["auroc_na"]
    assert record["kind"] == "single model" and record["synthetic"] is True
    path = save_evaluations(tmp_path / "evaluation.json", [ev], ["validation"], models=["x"])
    text = path.read_text()
    assert "NaN" not in text  # NaN is written as null: strict JSON readers accept it
    data = json.loads(text)
    assert data["models"] == ["x"] and data["evaluations"][0]["n"] == len(ev.predictions)
    na = data["evaluations"][0]["auroc_na"][0]
    row = next(r for r in data["evaluations"][0]["labels"] if r["Label"] == na)
    assert row["AUROC"] is None


def test_markdown_table_formats_by_column():
    frame = pd.DataFrame(
        {"Name": ["a", "b"], "N": [3, 12], "AUROC": [0.81234, math.nan], "F1": [0.5, 0.25]}
    )
    lines = markdown_table(frame, digits={"AUROC": 3}).splitlines()
    assert lines[0] == "| Name | N | AUROC | F1 |"
    assert lines[1] == "|---|---:|---:|---:|"
    assert lines[2] == "| a | 3 | 0.812 | 0.50 |"
    assert lines[3] == "| b | 12 | n/a | 0.25 |"


def test_fmt_is_the_one_number_formatter():
    assert fmt(0.81234) == "0.812" and fmt(0.81234, 2) == "0.81"
    assert fmt(12) == "12" and fmt(np.int64(7), 3) == "7"  # counts are never "12.000"
    assert fmt(None) == "n/a" and fmt(math.nan) == "n/a" and fmt(np.float32("nan")) == "n/a"
    assert fmt("not evaluated") == "not evaluated"
    assert fmt(True, 1) == "1.0"  # a flag is not a count


def test_markdown_lines_escape_cells_and_align():
    lines = markdown_lines(
        ["Model", "AUROC"], [["a|b", "0.9"], ["two\nlines", "n/a"]], [False, True]
    )
    assert lines == [
        "| Model | AUROC |",
        "|---|---:|",
        "| a\\|b | 0.9 |",
        "| two lines | n/a |",
    ]
