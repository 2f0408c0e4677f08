"""Evaluation of saved models: ensembles, study-level scoring, thresholds, records, compare."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlabel.data.formats import load_table
from cxrlabel.evaluation.scoring import (
    choose_and_store_thresholds,
    data_names,
    describe_data,
    evaluate,
    evaluate_checkpoint,
    is_synthetic,
)
from cxrlabel.models.checkpoint import read_metadata
from cxrlabel.models.thresholds import Thresholds
from cxrlabel.training.finetune import TrainResult

FAST = {"n_resamples": 20, "device": "cpu"}


def test_ensemble_averages_member_probabilities(tiny_run: TrainResult, tiny_dataset: Path):
    data = [("validation", load_table(tiny_dataset / "train.csv"))]
    # The run's two kept checkpoints, best first (files named by epoch, see summary.json).
    a, b = (tiny_run.run_dir / k["path"] for k in tiny_run.metrics["kept_checkpoints"])
    (single_a,) = evaluate([a], data, **FAST)
    (single_b,) = evaluate([b], data, **FAST)
    (both,) = evaluate([f"{tiny_run.run_dir}:best2"], data, **FAST)
    pa, pb, pab = single_a.predictions, single_b.predictions, both.predictions
    assert pa.kind == "single model" and pab.kind == "ensemble of 2 checkpoints"
    assert pab.paths == pa.paths == pb.paths
    np.testing.assert_allclose(pab.y_score, (pa.y_score + pb.y_score) / 2, atol=1e-6)
    # Two different epochs: the members really differ, so the average is not either one.
    assert not np.allclose(pa.y_score, pb.y_score)
    assert pab.model == pa.model  # same architecture and run: one display name


def test_study_level_takes_the_max_or_mean_over_views(tiny_run: TrainResult, tiny_dataset: Path):
    table = load_table(tiny_dataset / "train.csv")
    data = [("validation", table)]
    (images,) = evaluate([tiny_run.run_dir], data, view="all", **FAST)
    (studies,) = evaluate([tiny_run.run_dir], data, view="all", unit="study", **FAST)
    (means,) = evaluate(
        [tiny_run.run_dir], data, view="all", unit="study", aggregate="mean", **FAST
    )
    pi, ps, pm = images.predictions, studies.predictions, means.predictions
    assert pi.unit == "image" and ps.unit == "study" and ps.aggregate == "max"
    assert len(ps) == table.frame["study_id"].nunique() < len(pi)
    frame = pd.DataFrame(pi.y_score, columns=pi.labels).assign(study=pi.study_ids)
    expected_max = frame.groupby("study", sort=False).max().loc[list(ps.study_ids)]
    expected_mean = frame.groupby("study", sort=False).mean().loc[list(pm.study_ids)]
    np.testing.assert_allclose(ps.y_score, expected_max.to_numpy())
    np.testing.assert_allclose(pm.y_score, expected_mean.to_numpy())
    # The metrics are computed on the study rows.
    assert int(studies.table.set_index("Label").loc["Mean", "Positives"]) <= int(
        images.table.set_index("Label").loc["Mean", "Positives"]
    )


def test_bad_unit_fails_before_loading(tiny_dataset: Path):
    data = [("validation", load_table(tiny_dataset / "valid.csv"))]
    with pytest.raises(ValueError, match="unit must be one of"):
        evaluate(["no/such/model"], data, unit="patient")


def test_data_description_and_synthetic_marker(tiny_dataset: Path, tmp_path: Path):
    table = load_table(tiny_dataset / "train.csv")
    assert is_synthetic(table)
    text = describe_data(table, "frontal")
    assert text.startswith("synthetic train.csv") and f"{len(table)} images" in text
    # The same CSV without the generator's marker beside it is not called synthetic.
    copy = tmp_path / "train.csv"
    shutil.copy(tiny_dataset / "train.csv", copy)
    other = load_table(copy)
    assert not is_synthetic(other) and not describe_data(other, "all").startswith("synthetic")


def test_predictions_say_what_they_are(tiny_run: TrainResult, tiny_dataset: Path):
    table = load_table(tiny_dataset / "train.csv")
    ev = evaluate_checkpoint(tiny_run.best_checkpoint, table, **FAST)
    pred = ev.predictions
    assert pred.synthetic and "synthetic train.csv" in pred.data and "frontal views" in pred.data
    assert pred.model.startswith("Tiny_1") and pred.kind == "single model"
    assert pred.thresholds.rule == "fixed"  # what the run stored (the default rule)
    assert ev.n_resamples == 20


def test_thresholds_rule_is_chosen_on_the_first_dataset(tiny_run, tiny_dataset: Path):
    data = [
        ("validation", load_table(tiny_dataset / "train.csv")),
        ("test", load_table(tiny_dataset / "valid.csv")),
    ]
    evs = evaluate([tiny_run.run_dir], data, thresholds_rule="max_f1", band=0.05, **FAST)
    first, second = (ev.predictions.thresholds for ev in evs)
    assert first == second and first.rule == "max_f1" and first.band is not None
    assert "train.csv" in first.chosen_on
    assert first.values != Thresholds.fixed(first.labels).values
    # The metrics table uses them.
    table = evs[0].table.set_index("Label")
    for label, value in zip(first.labels, first.values, strict=True):
        assert table.loc[label, "Threshold"] == pytest.approx(value)


def test_choose_and_store_thresholds(tiny_run: TrainResult, tiny_dataset: Path, tmp_path: Path):
    run = Path(shutil.copytree(tiny_run.run_dir, tmp_path / "run"))
    table = load_table(tiny_dataset / "train.csv")
    paths, chosen = choose_and_store_thresholds([run], table, rule="youden", band=0.1,
                                                device="cpu")  # fmt: skip
    assert paths == [run / "checkpoints" / "best.safetensors"]
    meta = read_metadata(paths[0])
    assert Thresholds.from_dict(meta["thresholds"]) == chosen
    (ev,) = evaluate([run], [("validation", table)], **FAST)
    assert ev.predictions.thresholds == chosen
    assert ev.band is not None  # the band's summary is part of the evaluation

    # An ensemble's thresholds are chosen on its averaged probabilities and stored in every
    # member, so the ensemble uses exactly those (not a mean of per-member choices).
    members = [f"{run}:best2"]
    paths, chosen = choose_and_store_thresholds(members, table, rule="max_f1", device="cpu")
    assert len(paths) == 2
    for path in paths:
        assert Thresholds.from_dict(read_metadata(path)["thresholds"]) == chosen
    (ev,) = evaluate(members, [("validation", table)], **FAST)
    assert ev.predictions.kind == "ensemble of 2 checkpoints"
    assert ev.predictions.thresholds == chosen


def test_data_names():
    assert data_names(2) == ["validation", "test"]
    assert data_names(3, [None, "holdout"]) == ["validation", "holdout", "data3"]
    with pytest.raises(ValueError, match="differ"):
        data_names(2, ["x", "x"])
