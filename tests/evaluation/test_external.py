"""Tests for cxrlabel.evaluation.external: another model's predictions file against labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlabel.data.formats import load_table
from cxrlabel.evaluation.external import prediction_columns, read_predictions
from cxrlabel.evaluation.scoring import score_predictions
from tests.helpers import chexpert_csv


def test_prediction_columns_by_name_and_nih_name():
    columns = ["Path", "Edema", "prob_Effusion", "prob_Mass", "prob_Nodule", "prob_Hernia",
               "prob_Pleural_Thickening", "prob_Lung_Opacity"]  # fmt: skip
    assert prediction_columns(columns) == {
        "Edema": "Edema",
        "Pleural Effusion": "prob_Effusion",
        "Pleural Other": "prob_Pleural_Thickening",
        "Lung Opacity": "prob_Lung_Opacity",
    }  # Mass and Nodule both mean Lung Lesion: ambiguous, left out; Hernia has no observation


def test_read_predictions_matches_rows_and_scores_like_sklearn(tiny_dataset: Path, tmp_path):
    from sklearn.metrics import roc_auc_score

    table = load_table(tiny_dataset / "train.csv")
    paths = table.frame["Path"].astype(str)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"Path": paths, "Cardiomegaly": rng.random(len(paths)),
                          "prob_Effusion": rng.random(len(paths))})  # fmt: skip
    frame = frame.iloc[1:].iloc[::-1]  # one film without a prediction, rows in another order
    csv = tmp_path / "other_model.csv"
    frame.to_csv(csv, index=False)
    (tmp_path / "other_model.json").write_text(json.dumps({"model": "Other", "notes": ["n1"]}))

    pred = read_predictions(csv, table)
    assert pred.labels == ("Cardiomegaly", "Pleural Effusion")
    assert pred.model == "Other" and pred.kind == "external predictions"
    assert len(pred) == len(paths) - 1 and "1 labelled image(s) had no prediction" in pred.notes[1]
    assert pred.paths == tuple(paths.iloc[1:])
    by_path = frame.set_index("Path")
    np.testing.assert_array_equal(pred.y_score[:, 0], by_path.loc[list(pred.paths), "Cardiomegaly"])
    targets, mask = table.targets(pred.labels, "U-Ignore")
    keep = mask[1:, 0]
    expected = roc_auc_score(targets[1:, 0][keep], pred.y_score[keep, 0])
    (evaluation,) = score_predictions([pred], n_resamples=20)
    row = evaluation.table.set_index("Label").loc["Cardiomegaly"]
    assert row["AUROC"] == pytest.approx(expected, abs=1e-12)

    # `cxrlabel label` writes the paths it was given (absolute, or under the dataset folder),
    # where every file is named view1_frontal.jpg: the label paths' suffix still matches.
    moved = frame.assign(Path=str(tmp_path / "copy" / "data") + "/" + frame["Path"])
    moved.to_csv(tmp_path / "moved.csv", index=False)
    np.testing.assert_array_equal(read_predictions(tmp_path / "moved.csv", table).y_score,
                                  pred.y_score)  # fmt: skip

    # Converted films (NIH's PNGs shared as JPEGs) match on the file stem when stems are unique.
    rows = [{"Path": f"images/{i:05d}_000.jpg", "Edema": str(i % 2)} for i in range(6)]
    nih = load_table(chexpert_csv(tmp_path / "nih" / "labels.csv", rows), "generic")
    scores = pd.DataFrame({"Image Index": [f"{i:05d}_000.png" for i in range(6)][::-1],
                           "prob_Edema": np.linspace(0.1, 0.9, 6)})  # fmt: skip
    scores.to_csv(tmp_path / "nih_preds.csv", index=False)
    converted = read_predictions(tmp_path / "nih_preds.csv", nih)
    np.testing.assert_allclose(converted.y_score[:, 0], np.linspace(0.1, 0.9, 6)[::-1])

    frame.rename(columns={"Path": "File"}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="'Path' or 'Image Index'"):
        read_predictions(tmp_path / "bad.csv", table)
    frame[["Path"]].assign(Hernia=0.5).to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(ValueError, match="no probability column matches"):
        read_predictions(tmp_path / "none.csv", table)
    frame.assign(Cardiomegaly=1.5).to_csv(tmp_path / "range.csv", index=False)
    with pytest.raises(ValueError, match="within"):
        read_predictions(tmp_path / "range.csv", table)
