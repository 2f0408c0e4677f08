"""Patient-level k-fold cross-validation (`cxrlabel cv`, training.cv) of both approaches.

Each approach runs once per module on the tiny synthetic set (2 folds, 1-2 epochs, 32 px,
three labels, two heads); the tests read what it wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cxrlabel.training.features as features_module
from cxrlabel.cli import main
from cxrlabel.config import HeadConfig, RunConfig, build_config
from cxrlabel.data.splits import load_split
from cxrlabel.evaluation.external import read_predictions
from cxrlabel.evaluation.metrics import evaluate_predictions
from cxrlabel.evaluation.results import Predictions
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.run_folder import resolve_model_paths
from cxrlabel.models.thresholds import Thresholds
from cxrlabel.training.cv import CVResult, make_folds, metric_rows, pool, run_cv
from cxrlabel.training.finetune import filtered_table
from tests.helpers import count_calls

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = "Cardiomegaly,Edema,Atelectasis"
FOLDS = 2
HEADS = ("Tiny_1", "Tiny_3")


def _finetune_config(tiny_dataset: Path, runs: Path, **overrides):
    return build_config(
        "tiny-cpu",
        {
            "name": "cvtiny",
            "train_csv": str(tiny_dataset / "train.csv"),
            "labels": LABELS,
            "size": 32,
            "epochs": 1,
            "batch_size": 8,
            "valid_fraction": 0.25,
            "require_certain": False,
            "device": "cpu",
            "precision": "fp32",
            "runs_dir": str(runs),
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def finetune_cv(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> CVResult:
    """Approach 2 through the Python API: one train() run per fold."""
    runs = tmp_path_factory.mktemp("cv_finetune")
    # youden: thresholds are chosen (on each fold's inner split), so they can be checked.
    config = _finetune_config(tiny_dataset, runs, threshold_rule="youden")
    return run_cv(config, folds=FOLDS, n_resamples=20)


@pytest.fixture(scope="module")
def heads_cv(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Approach 1 through the CLI (its kind read from the heads preset), extractions counted:
    (run folder, printed output, backbone runs)."""
    run = tmp_path_factory.mktemp("cv_heads") / "heads-cv"
    args = ["cv", "--preset", "tiny-heads", "--folds", str(FOLDS), "--bootstrap", "20",
            "--run-dir", str(run), f"train_csv={tiny_dataset / 'train.csv'}", "size=32",
            "epochs=2", "heads=linear,mlp3", f"labels={LABELS}", "require_certain=false",
            "valid_fraction=0.25", "threshold_rule=youden"]  # fmt: skip
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        runs = count_calls(mp, features_module, "_run_backbone")
        assert main(args) == 0
    return run, out.getvalue(), runs.n


def _heads_config(run: Path) -> HeadConfig:
    return HeadConfig.load(run / "config.yaml")


def _oof_cases(finetune_cv: CVResult, heads_cv) -> list[tuple[Path, Path, object]]:
    """(run folder, OOF CSV, config) for the fine-tuned model and every head."""
    run = heads_cv[0]
    fine = finetune_cv.run_dir
    cases = [(fine, fine / "oof_predictions.csv", RunConfig.load(fine / "config.yaml"))]
    cases += [(run, run / m / "oof_predictions.csv", _heads_config(run)) for m in HEADS]
    return cases


# ---------------------------------------------------------------------------------------------
# Folds


def test_make_folds_patients_disjoint_and_cover_the_table(tiny_dataset: Path, tmp_path: Path):
    config = _finetune_config(tiny_dataset, tmp_path)
    table = filtered_table(config, config.train_csv)
    folds = make_folds(table, 3, config)
    patients = table.frame["patient_id"].astype(str).to_numpy()
    held = np.concatenate([f.held_out for f in folds])
    assert sorted(held) == list(range(len(table)))  # every image held out exactly once
    for fold in folds:
        held_p = set(patients[fold.held_out])
        assert held_p.isdisjoint(patients[fold.train]) and held_p.isdisjoint(patients[fold.valid])
        assert set(patients[fold.train]).isdisjoint(patients[fold.valid])
        assert len(fold.train) and len(fold.valid)
        assert f"fold {fold.number}'s training patients" in fold.valid_source


def test_valid_csv_is_refused(tiny_dataset: Path, tmp_path: Path, caplog):
    config = _finetune_config(tiny_dataset, tmp_path, valid_csv=str(tiny_dataset / "valid.csv"))
    with pytest.raises(ValueError, match="valid_csv must be empty"):
        run_cv(config, folds=2)
    data = [f"train_csv={tiny_dataset / 'train.csv'}", f"valid_csv={tiny_dataset / 'valid.csv'}"]
    args = ["cv", "--preset", "tiny-cpu", *data, "--run-dir", str(tmp_path / "r")]
    assert main(args) == 2
    assert "valid_csv must be empty" in caplog.text
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# What the runs wrote


def test_finetune_fold_run_folders_and_outputs(finetune_cv: CVResult):
    run = finetune_cv.run_dir
    assert run.name == "cvtiny-cv"  # <runs_dir>/<name>-cv
    for k in range(1, FOLDS + 1):
        assert (run / f"fold-{k}" / "checkpoints" / "best.safetensors").is_file()
        summary = json.loads((run / f"fold-{k}" / "summary.json").read_text())
        # Model selection and thresholds on the fold's inner split, never on its held-out part.
        assert f"fold {k}'s training patients" in summary["validation"]
        assert f"fold {k}'s" in summary["thresholds"]["chosen_on"]
    for name in ("cv_metrics.csv", "cv_summary.json", "report/report.md", "report/report.html",
                 "report/folds.md", "report/evaluation.json", "splits/folds.csv"):  # fmt: skip
        assert (run / name).is_file(), name
    (model,) = finetune_cv.oof
    assert model == "Tiny_1 (cvtiny)"
    assert finetune_cv.model_specs[model] == f"{run}:folds"
    report = (run / "report" / "report.md").read_text()
    assert "out-of-fold predictions (2 folds)" in report
    assert "Run fold-1" in report and "Run fold-2" in report  # each fold's loss curves
    assert "| Tiny_1 (cvtiny) | pooled |" in (run / "report" / "folds.md").read_text()


def test_cv_metrics_rows_per_fold_and_pooled(finetune_cv: CVResult, heads_cv):
    run, printed, _ = heads_cv
    heads_metrics = pd.read_csv(run / "cv_metrics.csv", dtype={"fold": str})
    for metrics, models in ((finetune_cv.metrics, list(finetune_cv.oof)), (heads_metrics, HEADS)):
        assert sorted(metrics["model"].unique()) == sorted(models)
        assert set(metrics["fold"]) == {"1", "2", "pooled"}
        assert set(metrics["label"]) == {*LABELS.split(","), "Mean"}
        for column in ("AUROC", "AUROC_low", "AUROC_high", "accuracy", "sensitivity",
                       "specificity"):  # fmt: skip
            values = metrics[column].dropna()
            assert ((values >= 0) & (values <= 1)).all(), column
        pooled = metrics[(metrics["fold"] == "pooled") & (metrics["label"] != "Mean")]
        folds = metrics[(metrics["fold"] != "pooled") & (metrics["label"] != "Mean")]
        # The folds partition the pooled images.
        for model in models:
            a = pooled[pooled["model"] == model]["images"].iloc[0]
            assert a == folds[folds["model"] == model].drop_duplicates("fold")["images"].sum()
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["kind"] == "heads" and summary["folds"] == FOLDS
    for model in HEADS:
        mean = summary["models"][model]["pooled_auroc_mean"]
        assert f"| {model} | 2 |" in printed
        assert mean is None or f"{mean:.3f}" in printed  # the compact table at the end


def test_oof_covers_every_filtered_image_once_with_its_fold(finetune_cv, heads_cv):
    for run, csv, config in _oof_cases(finetune_cv, heads_cv):
        table = filtered_table(config, config.train_csv)
        oof = pd.read_csv(csv)
        assert list(oof.columns[:2]) == ["Path", "fold"]
        assert sorted(oof["Path"]) == sorted(table.frame["Path"])  # each exactly once
        folds = pd.read_csv(run / "splits" / "folds.csv", dtype={"patient_id": str})
        fold_of = dict(zip(folds["patient_id"], folds["fold"], strict=True))
        assert [fold_of[p] for p in oof["patient_id"].astype(str)] == oof["fold"].tolist()
        assert set(oof["fold"]) == {1, 2}
        probs = oof[LABELS.split(",")].to_numpy()
        assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()


def test_held_out_patients_never_in_their_folds_training(finetune_cv, heads_cv):
    for run in (finetune_cv.run_dir, heads_cv[0]):
        folds = pd.read_csv(run / "splits" / "folds.csv", dtype={"patient_id": str})
        for k in range(1, FOLDS + 1):
            held = set(folds[folds["fold"] == k]["patient_id"])
            inner = load_split(run / "splits" / f"fold-{k}.csv")
            assert held and held.isdisjoint(inner.train) and held.isdisjoint(inner.valid)
            # ... and the inner split is exactly the other folds' patients.
            assert inner.train | inner.valid == set(folds["patient_id"]) - held
    for k in range(1, FOLDS + 1):  # the fine-tuned fold's own record of what it trained on
        fold_split = load_split(finetune_cv.run_dir / f"fold-{k}" / "splits" / "split.csv")
        assert fold_split == load_split(finetune_cv.run_dir / "splits" / f"fold-{k}.csv")


def test_heads_features_extracted_once_for_all_folds(heads_cv):
    run, _, backbone_runs = heads_cv
    assert backbone_runs == 1  # one backbone, 2 folds x 2 heads
    caches = [p.name for p in (run / "features").iterdir()]
    assert len(caches) == 1 and caches[0].startswith("all-tiny-")
    for model in HEADS:
        for k in range(1, FOLDS + 1):
            meta = json.loads((run / model / f"fold-{k}" / "checkpoints" / "best.json").read_text())
            assert meta["extra"]["cv"]["fold"] == k
            assert f"fold {k}'s training patients" in meta["thresholds"]["chosen_on"]
            assert meta["frozen_backbone"]["backbone"] == "tiny"


# ---------------------------------------------------------------------------------------------
# The fold ensemble and the OOF files, used by other commands


def test_folds_spec_resolves_to_every_fold(finetune_cv: CVResult, heads_cv):
    run = finetune_cv.run_dir
    (model,) = finetune_cv.oof
    paths = resolve_model_paths([f"{run}:folds"])
    assert paths == finetune_cv.checkpoints[model] and len(paths) == FOLDS
    heads_run = heads_cv[0]
    ensemble = load_ensemble([f"{heads_run / 'Tiny_3'}:folds"], device="cpu")
    assert ensemble.kind == "ensemble of 2 checkpoints"
    assert [m.path for m in ensemble.members] == [
        heads_run / "Tiny_3" / f"fold-{k}" / "checkpoints" / "best.safetensors" for k in (1, 2)
    ]
    with pytest.raises(FileNotFoundError, match=r"name a model.*Tiny_1:folds"):
        resolve_model_paths([f"{heads_run}:folds"])
    with pytest.raises(FileNotFoundError, match=r"use .*:folds"):
        resolve_model_paths([run])  # the cv folder itself has no best checkpoint


def test_label_with_the_fold_ensemble(finetune_cv: CVResult, tiny_dataset: Path, tmp_path):
    out = tmp_path / "labels"
    spec = f"{finetune_cv.run_dir}:folds"
    args = ["label", str(tiny_dataset / "valid.csv"), "--model", spec, "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    probs = pd.read_csv(out / "probabilities.csv")
    assert len(probs) == len(pd.read_csv(tiny_dataset / "valid.csv"))
    record = json.loads((out / "run.json").read_text())
    assert "ensemble of 2 checkpoints" in json.dumps(record)


def test_evaluate_reads_the_oof_predictions(finetune_cv, heads_cv, tiny_dataset, tmp_path, capsys):
    csv = finetune_cv.run_dir / "oof_predictions.csv"
    args = ["evaluate", "--predictions", str(csv), "--data", str(tiny_dataset / "train.csv"),
            "--bootstrap", "20", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert "| Tiny_1 (cvtiny) | out-of-fold predictions (2 folds) |" in capsys.readouterr().out
    assert (tmp_path / "report.md").is_file()
    for run, csv, config in _oof_cases(finetune_cv, heads_cv):
        model = json.loads(csv.with_suffix(".json").read_text())["model"]
        # Read back, the file scores exactly as the cross-validation pooled it.
        table = filtered_table(config, config.train_csv)
        ev = evaluate_predictions(read_predictions(csv, table, view="all"), n_resamples=20)
        metrics = pd.read_csv(run / "cv_metrics.csv", dtype={"fold": str})
        pooled = metrics[(metrics["fold"] == "pooled") & (metrics["model"] == model)]
        for label in LABELS.split(","):
            got = ev.table.set_index("Label").loc[label, "AUROC"]
            want = pooled.set_index("label").loc[label, "AUROC"]
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# Pooled metrics at each fold's own thresholds


def _pred(scores, truth, thresholds: float, fold: str) -> Predictions:
    n = len(scores)
    return Predictions(
        labels=("Edema",),
        paths=tuple(f"{fold}/{i}.png" for i in range(n)),
        patient_ids=tuple(f"{fold}{i}" for i in range(n)),
        study_ids=tuple(f"{fold}{i}" for i in range(n)),
        y_score=np.asarray(scores, dtype=float)[:, None],
        y_true=np.asarray(truth, dtype=float)[:, None],
        mask=np.ones((n, 1), dtype=bool),
        thresholds=Thresholds(("Edema",), (thresholds,), "youden"),
    )


def test_pooled_accuracy_uses_each_folds_thresholds():
    a = _pred([0.2, 0.4, 0.1, 0.35], [0, 1, 0, 1], 0.3, "a")  # all right at 0.3
    b = _pred([0.6, 0.8, 0.9, 0.65], [0, 1, 1, 0], 0.7, "b")  # all right at 0.7
    pooled = pool([a, b], model="m", folds=2, data="d", synthetic=True)
    assert pooled.thresholds == Thresholds.fixed(("Edema",))  # they differ: the report's 0.5
    assert any("thresholds differ" in note for note in pooled.notes)
    cuts = np.array([[0.3]] * 4 + [[0.7]] * 4)
    rows = metric_rows("m", "pooled", pooled, cuts, evaluate_predictions(pooled, n_resamples=10))
    edema = rows[0]
    assert edema["accuracy"] == 1.0 and edema["sensitivity"] == 1.0
    assert edema["specificity"] == 1.0 and math.isnan(edema["threshold"])
    # At a single 0.5 the same scores would be wrong on 4 of 8.
    assert evaluate_predictions(pooled, n_resamples=10).table.loc[0, "Accuracy"] == 0.5
