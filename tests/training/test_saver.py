"""CheckpointSaver on its own: ranking, kept.json, pruning, and resuming after a kill at each
step of the end-of-epoch bookkeeping (train's own kill tests are in test_finetune.py)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import cxrlabel.training.saver as saver_module
from cxrlabel.models.checkpoint import CheckpointError, read_metadata
from cxrlabel.models.factory import create_model
from cxrlabel.models.run_folder import RunFolder, read_kept
from cxrlabel.models.thresholds import Thresholds
from cxrlabel.training.saver import (
    CheckpointSaver,
    Ranking,
    is_better,
    rank_kept,
    ranking_value,
)
from tests.helpers import tearing_save

LABELS = ("Cardiomegaly", "Edema")
THRESHOLDS = Thresholds.fixed(LABELS)
# Validation losses per epoch: with keep_best=2, epoch 2 is the new best and displaces epoch 1.
LOSSES = (0.5, 0.7, 0.4)


def test_rank_kept_orders_and_truncates() -> None:
    kept = [{"epoch": 0, "value": 0.5}, {"epoch": 1, "value": 0.7}]
    new = {"epoch": 2, "value": 0.6}
    assert [e["epoch"] for e in rank_kept(kept, new, 2, "val_loss")] == [0, 2]
    assert [e["epoch"] for e in rank_kept(kept, new, 3, "val_loss")] == [0, 2, 1]
    assert [e["epoch"] for e in rank_kept(kept, new, 2, "val_auroc")] == [1, 2]
    tie = {"epoch": 3, "value": 0.5}  # a tie ranks below the earlier epoch
    assert [e["epoch"] for e in rank_kept(kept[:1], tie, 2, "val_loss")] == [0, 3]
    nan = {"epoch": 4, "value": float("nan")}  # never displaces a real value
    assert [e["epoch"] for e in rank_kept(kept, nan, 2, "val_loss")] == [0, 1]
    assert [e["epoch"] for e in rank_kept(kept, nan, 3, "val_auroc")] == [1, 0, 4]


def test_ranking_value_and_is_better() -> None:
    metrics = {"val_loss": 0.3, "val_auroc_mean": 0.8}
    assert ranking_value(metrics, "val_loss") == 0.3
    assert ranking_value(metrics, "val_auroc") == 0.8
    assert ranking_value({**metrics, "val_auroc_mean": None}, "val_auroc") == -math.inf
    assert is_better(0.9, None, "val_loss")
    assert is_better(0.2, 0.3, "val_loss") and not is_better(0.3, 0.3, "val_loss")
    assert is_better(0.9, 0.8, "val_auroc") and not is_better(0.8, 0.8, "val_auroc")


def test_ranking_split_separates_the_loop_progress() -> None:
    saved = {"epoch": 2, "batch": 0, "step": 9, "best_epoch": 1, "best_value": 0.4,
             "best_metrics": {"val_loss": 0.4}, "kept": [{"epoch": 1, "value": 0.4}]}  # fmt: skip
    ranking, progress = Ranking.split(saved)
    assert progress == {"epoch": 2, "batch": 0, "step": 9}
    assert ranking == Ranking(1, 0.4, {"val_loss": 0.4}, [{"epoch": 1, "value": 0.4}])
    assert {**progress, **ranking.to_dict()} == saved


def _saver(root: Path, *, keep_best: int = 2, select_best: str = "val_loss", seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("tiny", "linear", LABELS, weights="none", size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    return CheckpointSaver(
        RunFolder(root), model, optimizer, select_best=select_best, keep_best=keep_best,
        config={"name": "unit"}, extra={"execution": {"device": "cpu"}},
    )  # fmt: skip


def _metrics(loss: float, auroc: float | None = None) -> dict[str, Any]:
    return {"val_loss": loss, "val_auroc_mean": auroc, "thresholds": THRESHOLDS.to_dict()}


def _end_epoch(saver: CheckpointSaver, epoch: int, metrics: dict[str, Any] | None = None) -> bool:
    """The epoch's "training" (a fixed change to the weights), then its bookkeeping."""
    with torch.no_grad():
        for param in saver.model.parameters():
            param.add_(0.01 * (epoch + 1))
    progress = {"epoch": epoch + 1, "batch": 0, "step": 10 * (epoch + 1)}
    return saver.end_epoch(epoch, metrics or _metrics(LOSSES[epoch]), THRESHOLDS, progress)


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir())


def _sha(path: Path) -> str:
    return read_metadata(path)["sha256"]["weights"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> CheckpointSaver:
    """Three uninterrupted epochs (the kill tests' reference)."""
    saver = _saver(tmp_path_factory.mktemp("reference"))
    assert [_end_epoch(saver, epoch) for epoch in range(3)] == [True, False, True]
    return saver


def test_end_epoch_keeps_the_k_best_and_prunes(reference: CheckpointSaver) -> None:
    folder = reference.folder
    assert _files(folder.root) == [
        "best.json", "best.safetensors", "epoch-0000.json", "epoch-0000.safetensors",
        "epoch-0002.json", "epoch-0002.safetensors", "kept.json",
        "last.json", "last.safetensors", "last.state.safetensors",
    ]  # fmt: skip
    kept = reference.kept_checkpoints()
    assert kept == [
        {"rank": 1, "epoch": 2, "val_loss": 0.4, "path": "checkpoints/epoch-0002.safetensors"},
        {"rank": 2, "epoch": 0, "val_loss": 0.5, "path": "checkpoints/epoch-0000.safetensors"},
    ]
    assert read_kept(folder) == {"select_best": "val_loss", "keep_best": 2, "kept": kept}
    best = read_metadata(folder.best)
    assert (best["epoch"], best["step"]) == (2, 30) and "state" not in best["files"]
    assert best["thresholds"] == THRESHOLDS.to_dict()
    assert best["extra"] == {"metrics": _metrics(0.4), "execution": {"device": "cpu"}}
    assert _sha(folder.best) == _sha(folder.epoch_checkpoint(2))
    assert _sha(folder.epoch_checkpoint(0)) != _sha(folder.epoch_checkpoint(2))
    # `last` holds the loop's progress with the ranking: all a resume needs.
    last = read_metadata(folder.last)
    assert last["extra"]["progress"] == {
        "epoch": 3, "batch": 0, "step": 30, "best_epoch": 2, "best_value": 0.4,
        "best_metrics": _metrics(0.4),
        "kept": [{"epoch": 2, "value": 0.4}, {"epoch": 0, "value": 0.5}],
    }  # fmt: skip
    assert last["extra"]["execution"] == {"device": "cpu"} and "state" in last["files"]
    assert reference.committed == {"epoch": 3, "batch": 0, "step": 30}


def test_keep_best_1_keeps_best_only(tmp_path: Path) -> None:
    saver = _saver(tmp_path, keep_best=1)
    for epoch in range(3):
        _end_epoch(saver, epoch)
    assert not [n for n in _files(tmp_path) if n.startswith("epoch-")]
    assert saver.kept_checkpoints() == [
        {"rank": 1, "epoch": 2, "val_loss": 0.4, "path": "checkpoints/best.safetensors"}
    ]
    assert read_kept(saver.folder)["kept"] == saver.kept_checkpoints()


def test_val_auroc_ranks_higher_first_and_none_last(tmp_path: Path) -> None:
    saver = _saver(tmp_path, keep_best=3, select_best="val_auroc")
    better = [
        _end_epoch(saver, e, _metrics(0.5, auroc)) for e, auroc in enumerate((0.6, None, 0.8))
    ]
    assert better == [True, False, True]
    kept = saver.kept_checkpoints()
    assert [(k["epoch"], k["val_auroc"]) for k in kept] == [(2, 0.8), (0, 0.6), (1, None)]
    assert json.loads(saver.folder.kept.read_text())["kept"] == kept  # valid JSON: no -Infinity


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="select_best"):
        _saver(tmp_path, select_best="val_f1")
    with pytest.raises(ValueError, match="keep_best"):
        _saver(tmp_path, keep_best=0)


def test_resume_without_last_fails(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        _saver(tmp_path).resume()


class _Killed(Exception):
    """Stands for the process being killed at that point."""


def _kill_at(point: str, monkeypatch: pytest.MonkeyPatch, fired: list[str]) -> None:
    """Make epoch 2's bookkeeping (new best, displaces epoch 1) die at `point`."""
    Saver = saver_module.CheckpointSaver

    def fire() -> None:
        fired.append(point)
        raise _Killed

    if point == "before_last":  # epoch-0002.* is written, `last` (the commit) is not
        save_last = Saver.save_last

        def dying_save_last(saver: Any, progress: dict[str, Any]) -> None:
            if progress["epoch"] == 3:
                fire()
            save_last(saver, progress)

        monkeypatch.setattr(Saver, "save_last", dying_save_last)
    elif point == "torn_last":  # `last`'s tensor files are new, its metadata the old one's
        dying_save = tearing_save(saver_module.save_checkpoint, epoch=3, on_torn=fire)
        monkeypatch.setattr(saver_module, "save_checkpoint", dying_save)
    elif point == "before_kept":  # committed in `last`; kept.json and best.* are old
        write_kept = Saver.write_kept

        def dying_write_kept(saver: Any) -> None:
            if saver.committed["epoch"] == 3:
                fire()
            write_kept(saver)

        monkeypatch.setattr(Saver, "write_kept", dying_write_kept)
    elif point == "before_best":  # kept.json is new, best.* still epoch 0
        save_best = Saver.save_best

        def dying_save_best(saver: Any, path: Path, *args: Any, **kwargs: Any) -> None:
            if path == saver.folder.best and kwargs["epoch"] == 2:
                fire()
            save_best(saver, path, *args, **kwargs)

        monkeypatch.setattr(Saver, "save_best", dying_save_best)
    elif point == "while_pruning":  # epoch 1's files are still there
        remove = saver_module.remove_checkpoint

        def dying_remove(path: Path) -> None:
            if Path(path).name.startswith("epoch-"):
                fire()
            remove(path)

        monkeypatch.setattr(saver_module, "remove_checkpoint", dying_remove)


@pytest.mark.parametrize(
    ("point", "resumed_at"),
    [
        ("before_last", 2),  # the epoch was not committed: it is done again
        ("torn_last", 2),  # last.prev (end of epoch 1) is used instead
        ("before_kept", 3),
        ("before_best", 3),  # best.* is rebuilt from `last`'s weights
        ("while_pruning", 3),
    ],
)
def test_resume_after_a_kill_settles_the_checkpoints(
    point: str,
    resumed_at: int,
    reference: CheckpointSaver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    killed = _saver(tmp_path)
    fired: list[str] = []
    with monkeypatch.context() as patch:
        _kill_at(point, patch, fired)
        with pytest.raises(_Killed):
            for epoch in range(3):
                _end_epoch(killed, epoch)
    assert fired == [point]

    resumed = _saver(tmp_path, seed=1)  # a new process: other initial weights
    progress = resumed.resume()
    assert progress == {"epoch": resumed_at, "batch": 0, "step": 10 * resumed_at}
    # Already settled: only files the recorded ranking names, kept.json matching it.
    kept_epochs = {int(e["epoch"]) for e in resumed.ranking.kept}
    assert set(resumed.folder.epoch_checkpoints()) == kept_epochs
    assert read_kept(resumed.folder)["kept"] == resumed.kept_checkpoints()
    assert not list(resumed.folder.checkpoints.glob(".*.tmp"))
    if resumed_at == 2:
        _end_epoch(resumed, 2)

    assert resumed.kept_checkpoints() == reference.kept_checkpoints()
    assert _files(tmp_path) == _files(reference.folder.root)
    assert read_kept(resumed.folder) == read_kept(reference.folder)
    for epoch in (0, 2):
        a, b = reference.folder.epoch_checkpoint(epoch), resumed.folder.epoch_checkpoint(epoch)
        assert _sha(a) == _sha(b) and read_metadata(b)["epoch"] == epoch
    for name in ("best", "last"):
        a = read_metadata(reference.folder.checkpoint(name))
        b = read_metadata(resumed.folder.checkpoint(name))
        assert (a["epoch"], a["sha256"]["weights"]) == (b["epoch"], b["sha256"]["weights"])
        assert a.get("thresholds") == b.get("thresholds")
    assert resumed.ranking == reference.ranking


def test_best_that_cannot_be_rebuilt_is_reported(tmp_path: Path, caplog) -> None:
    saver = _saver(tmp_path)
    for epoch, loss in enumerate((0.4, 0.5, 0.7)):  # epoch 0 stays best
        _end_epoch(saver, epoch, _metrics(loss))
    (tmp_path / "checkpoints" / "best.json").unlink()  # lost, and `last` is two epochs on
    with caplog.at_level(logging.WARNING, logger="cxrlabel.training.saver"):
        _saver(tmp_path, seed=1).resume()
    assert "does not hold the recorded best epoch 0 and cannot be rebuilt" in caplog.text
    assert not (tmp_path / "checkpoints" / "best.json").exists()
