import numpy as np
import pandas as pd
import pytest

from cxrlabel.data.labels import BlankMeaning, table_from_columns
from cxrlabel.data.splits import (
    Split,
    SplitError,
    load_split,
    patient_folds,
    patient_split,
    save_split,
)


def _table(n_patients=40, images_per_patient=3):
    rows = [
        {"Path": f"p{p}/i{i}.jpg", "patient_id": f"p{p}", "study_id": f"p{p}/s{i}"}
        for p in range(n_patients)
        for i in range(images_per_patient)
    ]
    return table_from_columns(pd.DataFrame(rows), root=".", source="t", blank=BlankMeaning.NEGATIVE)


def test_split_is_patient_level_disjoint_and_seeded():
    table = _table()
    split = patient_split(table, valid_fraction=0.25, seed=3)
    assert len(split.valid) == 10 and len(split.train) == 30
    train, valid = split.apply(table)
    assert set(train.frame["patient_id"]).isdisjoint(valid.frame["patient_id"])
    assert len(train) + len(valid) == len(table)
    assert patient_split(table, 0.25, seed=3) == split
    assert patient_split(table, 0.25, seed=4) != split
    # Row order does not change the split.
    shuffled = table.subset(np.random.default_rng(0).permutation(len(table)))
    assert patient_split(shuffled, 0.25, seed=3) == split


def test_overlapping_split_is_refused():
    with pytest.raises(SplitError, match="both train and valid"):
        Split(train=frozenset({"a", "b"}), valid=frozenset({"b"}))


def test_split_file_round_trip(tmp_path):
    split = patient_split(_table(), 0.2, seed=0)
    path = tmp_path / "splits" / "split.csv"
    save_split(split, path)
    assert load_split(path) == split
    assert not list(path.parent.glob("*.tmp"))


def test_tampered_split_file_is_refused(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("patient_id,split\na,train\na,valid\n")
    with pytest.raises(SplitError):
        load_split(path)


def test_unassigned_patient(tmp_path):
    split = Split(train=frozenset({"p0"}), valid=frozenset({"p1"}))
    with pytest.raises(SplitError, match="in no split part"):
        split.apply(_table(n_patients=3))


def test_folds_cover_every_patient_once():
    table = _table(n_patients=23)
    folds = patient_folds(table, k=5, seed=1)
    valid_sets = [f.valid for f in folds]
    assert sum(len(v) for v in valid_sets) == 23
    assert set().union(*valid_sets) == set(table.frame["patient_id"])
