"""Dataset planning and writing (cxrlabel.synth.dataset): layout, CSV schema, determinism."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlabel import synth
from cxrlabel.data.formats import SYNTHETIC_MARKER, is_synthetic_dataset, write_synthetic_marker
from cxrlabel.data.labels import OBSERVATIONS
from tests.synth.helpers import read_csvs

LABEL_VALUES = {1.0, 0.0, -1.0}
PATH_RE = re.compile(r"^(train|valid)/patient\d{5}/study\d+/view\d+_(frontal|lateral)\.jpg$")


def test_summary_and_files(dataset: Path) -> None:
    train, valid = read_csvs(dataset)
    assert len(train) > 0 and len(valid) > 0
    for df in (train, valid):
        for rel in df["Path"]:
            assert PATH_RE.match(rel), rel
            assert (dataset / rel).is_file()
    assert train["Path"].str.startswith("train/").all()
    assert valid["Path"].str.startswith("valid/").all()
    # No leftover temporary files from the atomic CSV writes.
    assert not [p for p in dataset.iterdir() if p.name.startswith(".")]


def test_write_dataset_summary_counts(tmp_path: Path) -> None:
    summary = synth.write_dataset(tmp_path / "d", patients=10, size=48, seed=5)
    train, valid = read_csvs(tmp_path / "d")
    assert summary.train_images == len(train) and summary.valid_images == len(valid)
    assert summary.images == len(list((tmp_path / "d").rglob("*.jpg")))
    assert summary.train_patients + summary.valid_patients == 10
    assert summary.valid_patients >= 1
    with pytest.raises(AttributeError):
        summary.studies = 0  # type: ignore[misc]  # frozen


def test_csv_columns_and_values(dataset: Path) -> None:
    train, valid = read_csvs(dataset)
    expected = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    assert list(train.columns) == expected
    assert list(valid.columns) == expected
    for df in (train, valid):
        assert set(df["Sex"]) <= {"Male", "Female"}
        assert df["Age"].dtype.kind == "i" and df["Age"].between(18, 90).all()
        assert set(df["Frontal/Lateral"]) <= {"Frontal", "Lateral"}
        frontal = df["Frontal/Lateral"] == "Frontal"
        assert set(df.loc[frontal, "AP/PA"]) <= {"AP", "PA"}
        assert df.loc[~frontal, "AP/PA"].isna().all()
        lateral_paths = df.loc[~frontal, "Path"]
        assert lateral_paths.str.endswith("_lateral.jpg").all()
        for name in OBSERVATIONS:
            values = set(df[name].dropna())
            assert values <= LABEL_VALUES, (name, values)
    # Train has uncertain and blank labels, valid has neither (radiologist ground truth).
    train_labels = train[list(OBSERVATIONS)]
    assert (train_labels == -1.0).any().any()
    assert train_labels.isna().any().any()
    valid_labels = valid[list(OBSERVATIONS)]
    assert not (valid_labels == -1.0).any().any()
    assert not valid_labels.isna().any().any()


def test_views_share_study_labels(dataset: Path) -> None:
    train, _ = read_csvs(dataset)
    train["study"] = train["Path"].str.rsplit("/", n=1).str[0]
    for _, group in train.groupby("study"):
        labels = group[list(OBSERVATIONS)].fillna(99.0)
        assert (labels.nunique() == 1).all()


def test_split_sizes() -> None:
    for patients in (2, 7, 20, 100):
        plans = synth.plan_dataset(patients, seed=0)
        valid = {p.patient for p in plans if p.split == "valid"}
        train = {p.patient for p in plans if p.split == "train"}
        assert not valid & train
        assert len(valid | train) == patients
        assert len(valid) >= 1
        assert len(valid) <= max(1, math.ceil(0.16 * patients))
    assert {p.split for p in synth.plan_dataset(1, seed=0)} == {"train"}


def test_some_laterals_and_repeat_studies(plans: list[synth.StudyPlan]) -> None:
    studies_per_patient: dict[int, int] = {}
    for p in plans:
        studies_per_patient[p.patient] = max(studies_per_patient.get(p.patient, 0), p.study)
    assert max(studies_per_patient.values()) >= 3
    assert any("lateral" in p.views for p in plans)
    assert all(p.views[0] == "frontal" for p in plans)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_identical_bytes(tmp_path: Path) -> None:
    synth.write_dataset(tmp_path / "a", patients=6, size=64, seed=42)
    synth.write_dataset(tmp_path / "b", patients=6, size=64, seed=42, workers=2)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


def test_different_seed_differs(tmp_path: Path) -> None:
    synth.write_dataset(tmp_path / "a", patients=6, size=64, seed=1)
    synth.write_dataset(tmp_path / "b", patients=6, size=64, seed=2)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a["train.csv"] != b["train.csv"]
    common = [k for k in a.keys() & b.keys() if k.endswith(".jpg")]
    assert common and any(a[k] != b[k] for k in common)


def test_image_independent_of_rendering_order() -> None:
    plans = synth.plan_dataset(5, seed=9)
    forward = [synth.render_study(p, 64, seed=9) for p in plans]
    backward = [synth.render_study(p, 64, seed=9) for p in reversed(plans)][::-1]
    for f, b in zip(forward, backward, strict=True):
        assert f.keys() == b.keys()
        assert all(np.array_equal(f[v], b[v]) for v in f)
    # A patient's plan does not depend on how many patients the dataset has.
    assert synth.plan_dataset(5, seed=9)[0] == synth.plan_dataset(30, seed=9)[0]


def test_jpegs_are_greyscale_of_requested_size(dataset: Path) -> None:
    for path in list(dataset.rglob("*.jpg"))[:10]:
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (64, 64)


def test_dataset_folder_carries_the_synthetic_marker(dataset: Path, tmp_path: Path) -> None:
    marker = json.loads((dataset / SYNTHETIC_MARKER).read_text(encoding="utf-8"))
    assert marker["generator"] == "cxrlabel.synth" and marker["synthetic"] is True
    assert (marker["patients"], marker["size"], marker["seed"]) == (24, 64, 3)
    assert is_synthetic_dataset(dataset / "train.csv") and is_synthetic_dataset(
        dataset / "valid.csv"
    )
    # A folder without the marker, with a broken one or one from another generator is not.
    assert not is_synthetic_dataset(tmp_path / "train.csv")
    for text in ("{not json", "[1, 2]", json.dumps({"generator": "someone.else"})):
        (tmp_path / SYNTHETIC_MARKER).write_text(text, encoding="utf-8")
        assert not is_synthetic_dataset(tmp_path / "train.csv"), text
    path = write_synthetic_marker(tmp_path, patients=2, size=16, seed=0)
    assert path == tmp_path / SYNTHETIC_MARKER and is_synthetic_dataset(tmp_path / "valid.csv")
