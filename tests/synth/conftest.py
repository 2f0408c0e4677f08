"""Fixtures of the synthetic-generator tests: one small written dataset, many planned studies."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrlabel import synth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.write_dataset(out, patients=24, size=64, seed=3)
    return out


@pytest.fixture(scope="module")
def plans() -> list[synth.StudyPlan]:
    """Labels of a few hundred patients, no pixels (fast)."""
    return synth.plan_dataset(400, seed=11)
