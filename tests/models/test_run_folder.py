"""The run folder: its paths, metrics.csv, kept.json and summary.json, and model specs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.factory import create_model
from cxrlabel.models.run_folder import (
    METRIC_COLUMNS,
    RunFolder,
    best_k,
    json_value,
    read_kept,
    read_metrics,
    read_metrics_until,
    read_summary,
    resolve_model_paths,
    run_dir_of,
    split_best_k,
    split_folds,
    write_kept,
    write_metrics,
    write_summary,
)
from cxrlabel.training.finetune import TrainResult

LABELS = ("Cardiomegaly", "Edema")


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny", "linear", LABELS, weights="none", size=32)
    save_checkpoint(path, model, config={"name": f"run{seed}"}, epoch=1, step=2)
    return path


def test_layout_paths(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "runs" / "a")
    root = tmp_path / "runs" / "a"
    assert folder.config == root / "config.yaml"
    assert folder.split == root / "splits" / "split.csv"
    assert folder.metrics == root / "metrics.csv"
    assert folder.loss_plot == root / "plots" / "loss.png"
    assert folder.summary == root / "summary.json"
    assert folder.report == root / "report"
    assert folder.cache_root == tmp_path / "runs" / ".cache"
    assert folder.best == root / "checkpoints" / "best.safetensors"
    assert folder.last == root / "checkpoints" / "last.safetensors"
    assert folder.last_prev == root / "checkpoints" / "last.prev.safetensors"
    assert folder.kept == root / "checkpoints" / "kept.json"
    assert folder.epoch_checkpoint(7) == root / "checkpoints" / "epoch-0007.safetensors"
    assert not root.exists() and not folder.is_run()  # building one creates nothing
    assert RunFolder(str(root)).root == root
    assert RunFolder.best == Path("checkpoints/best.safetensors")  # on the class: relative


def test_epoch_checkpoints_finds_each_epoch_once(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    _checkpoint(folder.epoch_checkpoint(3), seed=0)
    _checkpoint(folder.epoch_checkpoint(12), seed=0)
    (folder.checkpoints / "epoch-0005.state.safetensors").write_bytes(b"left by a kill")
    _checkpoint(folder.best, seed=0)
    found = folder.epoch_checkpoints()
    assert sorted(found) == [3, 5, 12]
    assert found[12] == folder.checkpoints / "epoch-0012.json"
    assert found[5] == folder.checkpoints / "epoch-0005.json"  # its metadata, though missing
    assert RunFolder(tmp_path / "none").epoch_checkpoints() == {}


def test_read_metrics_until_keeps_what_last_covers(tmp_path: Path) -> None:
    """metrics.csv is written before `last`, so after a kill it can hold the row of an epoch
    that `last` stopped at the end of but had not validated: that row must not come back."""
    path = tmp_path / "metrics.csv"
    rows = [
        {"kind": "step", "epoch": 0, "step": 1, "train_loss": 1.0},
        {"kind": "step", "epoch": 0, "step": 2, "train_loss": 0.9},
        {"kind": "epoch", "epoch": 0, "step": 2, "train_loss": 0.95, "val_loss": 1.1},
        {"kind": "step", "epoch": 1, "step": 3, "train_loss": 0.8},
    ]
    write_metrics(path, rows)
    assert [r["kind"] for r in read_metrics_until(path, 2, 0)] == ["step", "step"]
    assert [r["kind"] for r in read_metrics_until(path, 2, 1)] == ["step", "step", "epoch"]
    assert len(read_metrics_until(path, 3, 1)) == 4
    assert read_metrics_until(tmp_path / "missing.csv", 3, 1) == []


def test_read_metrics_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.csv"
    rows = [
        {"kind": "step", "epoch": 0, "step": 1, "train_loss": 0.5, "lr": 0.1},
        {"kind": "epoch", "epoch": 0, "step": 1, "train_loss": None, "val_loss": 0.7},
    ]
    write_metrics(path, rows)
    back = read_metrics(path)
    assert list(back[0]) == list(METRIC_COLUMNS)
    assert back[0]["train_loss"] == 0.5 and back[0]["val_loss"] is None  # empty -> None
    assert back[1]["train_loss"] is None and back[1]["val_loss"] == 0.7
    assert back[1]["epoch"] == 0 and back[1]["step"] == 1
    with pytest.raises(FileNotFoundError, match=r"no metrics\.csv in run folder"):
        read_metrics(tmp_path / "metrics.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("kind,epoch\nstep,0\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*missing column.*step"):
        read_metrics(bad)
    bad.write_text("")
    with pytest.raises(ValueError, match=r"bad\.csv: not a readable metrics CSV"):
        read_metrics(bad)


def test_kept_json_and_best_k(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"kept\.json"):
        read_kept(folder)
    kept = [
        {"rank": 1, "epoch": 2, "val_auroc": 0.8, "path": "checkpoints/epoch-0002.safetensors"},
        {"rank": 2, "epoch": 0, "val_auroc": None, "path": "checkpoints/epoch-0000.safetensors"},
    ]
    write_kept(folder, kept, select_best="val_auroc", keep_best=3)
    data = read_kept(folder)
    assert data == {"select_best": "val_auroc", "keep_best": 3, "kept": kept}
    with pytest.raises(FileNotFoundError, match="kept checkpoint 1"):
        best_k(folder, 1)
    _checkpoint(folder.epoch_checkpoint(2), seed=0)
    assert best_k(folder, 1) == [folder.epoch_checkpoint(2)]
    with pytest.raises(ValueError, match="K must be 1 to 2"):
        best_k(folder, 0)
    folder.kept.write_text(json.dumps({"keep_best": 2}))
    with pytest.raises(ValueError, match=r"kept\.json: no list of kept checkpoints"):
        read_kept(folder)
    folder.kept.write_text("{not json")
    with pytest.raises(ValueError, match=r"kept\.json: cannot read"):
        read_kept(folder)


def test_summary_round_trip_and_errors(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"not a finished run folder \(no summary\.json\)"):
        read_summary(folder)
    write_summary(folder, {"best_epoch": 1, "labels": list(LABELS)})
    assert read_summary(folder) == {"best_epoch": 1, "labels": list(LABELS)}
    assert not list(folder.root.glob(".*.tmp"))


def test_json_value() -> None:
    assert json_value(0.25) == 0.25
    assert json_value(3) == 3.0
    assert json_value(math.nan) is None and json_value(-math.inf) is None


def test_split_best_k() -> None:
    assert split_best_k("runs/a:best3") == (Path("runs/a"), 3)
    assert split_best_k(Path("runs/a")) == (Path("runs/a"), None)
    assert split_best_k("runs/a:bestX") == (Path("runs/a:bestX"), None)


def test_resolve_run_folder_best_k_and_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=r"run folder has no checkpoints/best"):
        resolve_model_paths([run])
    for name in ("best", "epoch-0000", "epoch-0003"):
        _checkpoint(ckpts / f"{name}.safetensors", seed=0)
    assert resolve_model_paths([run]) == [ckpts / "best.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"kept\.json"):
        resolve_model_paths([f"{run}:best2"])
    # RUN:bestK follows the ranking training recorded in kept.json, not the file names.
    kept = [
        {"rank": 1, "epoch": 3, "val_loss": 0.2, "path": "checkpoints/epoch-0003.safetensors"},
        {"rank": 2, "epoch": 0, "val_loss": 0.3, "path": "checkpoints/epoch-0000.safetensors"},
    ]
    (ckpts / "kept.json").write_text(json.dumps({"keep_best": 2, "kept": kept}))
    assert resolve_model_paths([f"{run}:best2"]) == [
        ckpts / "epoch-0003.safetensors",
        ckpts / "epoch-0000.safetensors",
    ]
    assert resolve_model_paths([f"{run}:best1"]) == [ckpts / "epoch-0003.safetensors"]
    json_path = ckpts / "epoch-0000.json"
    assert resolve_model_paths([json_path]) == [ckpts / "epoch-0000.safetensors"]
    with pytest.raises(ValueError, match="keeps 2 checkpoint"):
        resolve_model_paths([f"{run}:best3"])
    (ckpts / "epoch-0000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="epoch-0000"):
        resolve_model_paths([f"{run}:best2"])
    with pytest.raises(FileNotFoundError, match="not a run folder or a checkpoint"):
        resolve_model_paths([tmp_path / "nothing.safetensors"])
    with pytest.raises(ValueError, match="no model given"):
        resolve_model_paths([])


def test_split_folds() -> None:
    assert split_folds("runs/a:folds") == (Path("runs/a"), True)
    assert split_folds("runs/a/Tiny_1:folds") == (Path("runs/a/Tiny_1"), True)
    assert split_folds("runs/a") == (Path("runs/a"), False)
    assert split_folds(":folds") == (Path(":folds"), False)


def test_resolve_folds_in_fold_order_and_errors(tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    # Numeric order: fold-10 after fold-2 (a name sort would put it first).
    for k in (2, 10, 1):
        _checkpoint(cv / f"fold-{k}" / "checkpoints" / "best.safetensors", seed=k)
    (cv / "fold-x").mkdir()  # not a fold folder
    expected = [cv / f"fold-{k}" / "checkpoints" / "best.safetensors" for k in (1, 2, 10)]
    assert resolve_model_paths([f"{cv}:folds"]) == expected
    with pytest.raises(FileNotFoundError, match=r"use .*cv:folds"):
        resolve_model_paths([cv])
    (cv / "fold-3").mkdir()
    with pytest.raises(FileNotFoundError, match=r"fold-3 has no checkpoints/best"):
        resolve_model_paths([f"{cv}:folds"])
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no fold-\* folders.*cxrlabel cv"):
        resolve_model_paths([f"{plain}:folds"])
    heads = tmp_path / "heads"
    _checkpoint(heads / "Tiny_1" / "fold-1" / "checkpoints" / "best.safetensors", seed=0)
    with pytest.raises(FileNotFoundError, match=r"name a model, e\.g\. .*Tiny_1:folds"):
        resolve_model_paths([f"{heads}:folds"])
    assert resolve_model_paths([f"{heads / 'Tiny_1'}:folds"]) == [
        heads / "Tiny_1" / "fold-1" / "checkpoints" / "best.safetensors"
    ]


def test_run_dir_of(tiny_run: TrainResult, tmp_path: Path):
    run = tiny_run.run_dir
    assert run_dir_of(run) == run
    assert run_dir_of(f"{run}:best2") == run
    assert run_dir_of(run / "checkpoints" / "epoch-0002.json") == run
    assert run_dir_of(tmp_path / "model.safetensors") is None
    assert run_dir_of(tmp_path) is None  # a folder without config.yaml is no run


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../other/checkpoints/best.safetensors", "checkpoints/../../x"]
)
def test_kept_json_cannot_point_outside_the_run(tmp_path: Path, path: str) -> None:
    folder = RunFolder(tmp_path / "run")
    _checkpoint(tmp_path / "other" / "checkpoints" / "best.safetensors", seed=0)
    write_kept(folder, [{"rank": 1, "epoch": 0, "path": path}], select_best="val_loss", keep_best=2)
    with pytest.raises(ValueError, match=r"kept\.json.*outside"):
        best_k(folder, 1)
