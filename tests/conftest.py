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
