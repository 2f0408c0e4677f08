"""The data layer end to end on the tiny synthetic dataset: CSV -> table -> split -> cache ->
batches, as training will use it."""

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cxrlabel.data.cache import prepare_cache
from cxrlabel.data.dataset import CXRDataset
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import BlankMeaning, filter_certain, filter_view
from cxrlabel.data.splits import patient_split
from cxrlabel.data.stats import label_stats
from cxrlabel.data.transforms import Preprocessing, ResizeGeometry


def test_synthetic_csvs_load_as_chexpert(tiny_dataset):
    train = load_table(tiny_dataset / "train.csv")
    valid = load_table(tiny_dataset / "valid.csv")
    assert train.blank is BlankMeaning.NEGATIVE
    assert all(p.is_file() for p in train.image_paths() + valid.image_paths())
    assert set(train.frame["patient_id"]).isdisjoint(valid.frame["patient_id"])
    assert not (valid.values() == -1).any()


def test_study_stats_match_a_count_by_hand(tiny_dataset):
    raw = pd.read_csv(tiny_dataset / "train.csv")
    raw["study"] = raw["Path"].str.extract(r"(patient\d+/study\d+)")[0]
    per_study = raw.groupby("study")["Edema"].max()  # views of a study share labels
    stats = label_stats(load_table(tiny_dataset / "train.csv"), unit="study")
    row = stats.frame.set_index("Pathology").loc["Edema"]
    assert stats.total == raw["study"].nunique()
    assert row["Positive"] == (per_study == 1).sum()
    assert row["Uncertain"] == (per_study == -1).sum()


def test_split_cache_and_batches(tiny_dataset, tmp_path):
    table = filter_view(load_table(tiny_dataset / "train.csv"), "frontal")
    table = filter_certain(table, ["Cardiomegaly", "Pleural Effusion"])
    train, held_out = patient_split(table, valid_fraction=0.25, seed=0).apply(table)
    assert set(train.frame["patient_id"]).isdisjoint(held_out.frame["patient_id"])

    prep = Preprocessing(64, (0.5,) * 3, (0.5,) * 3, "pad", "bilinear")
    cache = prepare_cache(train.image_paths(), tmp_path / "cache", ResizeGeometry(64), workers=1)
    ds = CXRDataset(train, ["Cardiomegaly", "Pleural Effusion"], prep, cache=cache)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["target"].shape == batch["mask"].shape == (4, 2)
    assert batch["mask"].any(dim=1).all()  # filter_certain kept only images with a label
    assert torch.isfinite(batch["image"]).all() and batch["image"].std() > 0.1
    values = train.values(["Cardiomegaly", "Pleural Effusion"])[batch["index"].numpy()]
    np.testing.assert_array_equal(batch["target"].numpy(), (values == 1).astype(np.float32))
