"""The method's two fine-tuning presets run end to end on synthetic films (weights none: no
downloads), at their own backbone and input size, through the same command users run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrlabel.cli import main
from cxrlabel.config import build_config, load_config
from cxrlabel.data.labels import LABEL_SETS


@pytest.mark.parametrize("preset", ["finetune-mobilenet", "finetune-densenet121"])
def test_method_preset_trains_evaluates_and_labels(preset, tiny_dataset: Path, tmp_path: Path):
    config = build_config(preset, {})
    run = tmp_path / preset
    overrides = [
        f"train_csv={tiny_dataset / 'train.csv'}",
        f"valid_csv={tiny_dataset / 'train.csv'}",  # the tiny valid.csv has too few films
        "weights=none",
        "epochs=1",
        "require_certain=false",
        "device=cpu",
        "precision=fp32",
    ]
    assert main(["train", "--preset", preset, "--run-dir", str(run), *overrides]) == 0
    saved = load_config(run / "config.yaml")
    assert (saved.backbone, saved.size, saved.labels) == (config.backbone, config.size,
                                                         config.labels)  # fmt: skip
    meta = json.loads((run / "checkpoints" / "best.json").read_text())
    assert meta["preprocessing"]["size"] == config.size
    assert tuple(meta["model"]["labels"]) == LABEL_SETS[config.labels]
    assert (run / "metrics.csv").is_file() and (run / "plots" / "loss.png").is_file()
    out = tmp_path / "labels"
    films = tiny_dataset / "valid"
    assert main(["label", str(films), "--model", str(run), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    header = (out / "labels.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "Path" and len(header) == 15
