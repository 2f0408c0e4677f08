"""Shared fixtures: a tiny synthetic CheXpert-format dataset, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrlabel.synth import write_dataset


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic patients at 64 px: train.csv, valid.csv and their images."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_dataset(out, patients=16, size=64, seed=7)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """One finished tiny-CNN run (3 epochs at 64 px, best 2 epochs kept), trained once per
    session for the evaluation and CLI tests. Tests that change its files work on a copy."""
    from cxrlabel.config import build_config
    from cxrlabel.training.finetune import train

    config = build_config(
        "tiny-cpu",
        {
            "name": "tiny-run",
            "train_csv": str(tiny_dataset / "train.csv"),
            "size": 64,
            "epochs": 3,
            "batch_size": 4,
            "valid_fraction": 0.25,
            "require_certain": False,
            "keep_best": 2,
            "seed": 1,
            # The plan explicit: with "auto" the run would differ by CPU (bf16 on AMX) or GPU.
            "device": "cpu",
            "precision": "fp32",
            "runs_dir": str(tmp_path_factory.mktemp("tiny_runs")),
        },
    )
    return train(config)
