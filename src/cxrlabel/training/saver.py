"""A run's checkpoints: `last` for resuming, `best`, and the best k epochs, kept kill-safely.

`CheckpointSaver` owns the bookkeeping a training loop would otherwise interleave with its
steps (timm's `CheckpointSaver` plays the same part there): which epoch is best, the keep_best
ranking, kept.json, deleting displaced epochs' files, and what a resumed run must clean up.
The loop hands it the model, the optimizer and, at each save, where the run stands
(``progress``: epoch, batch, step); the ranking is saved inside `last` next to that progress.

End-of-epoch bookkeeping survives a kill at any point. A kept epoch's file is new, so writing
it touches nothing recorded; the ranking is recorded with `last` (the commit), then in
kept.json, then best.* is written and displaced epochs' files are deleted. A resumed run
deletes epoch files the recorded ranking does not name and rewrites best.* if the kill came
before it. `last` itself is saved beside a hard-linked copy of the previous one
(last.prev.*, deleted once the new one is whole), which a resume falls back to when `last` is
torn. The loop writes metrics.csv before each save of `last`, and trims it on resume to what
`last` covers (run_folder.read_metrics_until).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cxrlabel.fileio import atomic_write_text
from cxrlabel.models.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    load_training_state,
    read_metadata,
    remove_checkpoint,
    save_checkpoint,
)
from cxrlabel.models.factory import CXRModel
from cxrlabel.models.run_folder import RunFolder, json_value, write_kept
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

SELECT_BEST = ("val_loss", "val_auroc")


@dataclass
class Ranking:
    """What the saver has recorded about the epochs so far; saved in `last` with the progress."""

    best_epoch: int | None = None
    best_value: float | None = None
    best_metrics: dict[str, Any] | None = None  # the best epoch's validation metrics
    # The keep_best ranking, best first: {"epoch", "value"} per kept epoch.
    kept: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def split(cls, saved: Mapping[str, Any]) -> tuple[Ranking, dict[str, Any]]:
        """A saved progress dict -> (the ranking in it, the rest: the loop's own progress)."""
        names = {f.name for f in fields(cls)}
        ranking = cls(**{k: v for k, v in saved.items() if k in names})
        return ranking, {k: v for k, v in saved.items() if k not in names}


def ranking_value(metrics: Mapping[str, Any], select_best: str) -> float:
    """The number an epoch is ranked by: its validation loss or mean AUROC (-inf if none)."""
    if select_best == "val_auroc":
        auroc = metrics["val_auroc_mean"]
        return -math.inf if auroc is None else float(auroc)
    return float(metrics["val_loss"])


def is_better(value: float, best: float | None, select_best: str) -> bool:
    """Whether `value` beats the best so far; only a strictly better epoch becomes best."""
    if best is None:
        return True
    return value > best if select_best == "val_auroc" else value < best


def rank_kept(
    kept: Sequence[Mapping[str, Any]], new: Mapping[str, Any], k: int, select_best: str
) -> list[dict[str, Any]]:
    """The best `k` of `kept` plus `new` ({"epoch", "value"}), best first.

    Lower is better for val_loss, higher for val_auroc; on a tie the earlier epoch ranks first,
    as a later epoch only becomes `best` when strictly better. A NaN value ranks last.
    """
    sign = -1.0 if select_best == "val_auroc" else 1.0

    def key(entry: Mapping[str, Any]) -> tuple[float, int]:
        value = float(entry["value"])
        return (math.inf if math.isnan(value) else sign * value, int(entry["epoch"]))

    return sorted((dict(e) for e in (*kept, new)), key=key)[:k]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy of the data; `src` is later replaced, not rewritten in place
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)


class CheckpointSaver:
    """The checkpoints of one run folder: `last`, `best` and, with keep_best=k>1, k epochs.

    config: stored in every checkpoint (the run's RunConfig as a dict).
    extra: stored under each checkpoint's "extra" too (e.g. the execution plan).
    ema: a moving average of `model`'s weights (a CXRModel, e.g. timm ModelEmaV3's module):
        best and kept checkpoints then hold it, and `last` holds both for resuming.
    writer: False for the ranks of a torchrun job other than 0: they keep the same ranking
        and read `last` on resume, but write, rewrite and delete nothing.
    """

    def __init__(
        self,
        folder: RunFolder,
        model: CXRModel,
        optimizer: torch.optim.Optimizer,
        *,
        select_best: str,
        keep_best: int,
        config: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        ema: CXRModel | None = None,
        writer: bool = True,
    ) -> None:
        if select_best not in SELECT_BEST:
            raise ValueError(f"select_best must be one of {SELECT_BEST}, not {select_best!r}")
        if keep_best < 1:
            raise ValueError(f"keep_best must be at least 1, not {keep_best}")
        self.folder = folder
        self.model = model
        self.optimizer = optimizer
        self.select_best = select_best
        self.keep_best = keep_best
        self.config = dict(config)
        self.extra = dict(extra or {})
        self.ema = ema
        self.writer = writer
        # What inference checkpoints hold: the EMA weights when there are any.
        self.inference_model = ema if ema is not None else model
        self.ranking = Ranking()
        # The progress `last` holds (None before the first save or resume).
        self.committed: dict[str, Any] | None = None
        # Whether checkpoints/last.* is known to be whole, so worth keeping as last.prev.*.
        self.last_whole = False

    # ----------------------------------------------------------------------------------------
    # last

    def save_last(self, progress: Mapping[str, Any]) -> None:
        """Save `last` (weights, optimizer and RNG state, `progress` and the ranking)."""
        if not self.writer:
            self.committed = dict(progress)
            return
        if self.last_whole:
            self._keep_previous_last()
        save_checkpoint(
            self.folder.last,
            self.model,
            config=self.config,
            epoch=progress["epoch"],
            step=progress["step"],
            optimizer=self.optimizer,
            extra={"progress": {**progress, **self.ranking.to_dict()}, **self.extra},
            ema=self.ema,
        )
        self.committed = dict(progress)
        self.last_whole = True
        remove_checkpoint(self.folder.last_prev)

    def _keep_previous_last(self) -> None:
        """Hard-link the whole current `last` as last.prev.* before it is overwritten.

        save_checkpoint replaces each file of `last` in turn, so a kill part-way leaves files
        that disagree (read_metadata refuses them); the links keep the old contents.
        """
        remove_checkpoint(self.folder.last_prev)
        src, dst = checkpoint_paths(self.folder.last), checkpoint_paths(self.folder.last_prev)
        meta = json.loads(src[2].read_text(encoding="utf-8"))
        for kind, index in (("weights", 0), ("state", 1)):
            _link_or_copy(src[index], dst[index])
            meta["files"][kind] = dst[index].name
        # Last: the metadata naming the linked files marks the copy whole.
        atomic_write_text(dst[2], json.dumps(meta, indent=2))

    # ----------------------------------------------------------------------------------------
    # End of an epoch

    def end_epoch(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        thresholds: Thresholds,
        progress: Mapping[str, Any],
    ) -> bool:
        """Rank epoch `epoch` by its validation `metrics` and save what the ranking keeps.

        progress: where the run stands after the epoch (the next one's start); saving it in
        `last` commits the new ranking. Returns whether the epoch is the new best.
        """
        value = ranking_value(metrics, self.select_best)
        r = self.ranking
        better = is_better(value, r.best_value, self.select_best)
        if better:
            r.best_epoch, r.best_value, r.best_metrics = epoch, value, dict(metrics)
        entry = {"epoch": epoch, "value": value}
        r.kept = rank_kept(r.kept, entry, self.keep_best, self.select_best)
        kept = any(e["epoch"] == epoch for e in r.kept)
        step = int(progress["step"])
        if not self.writer:
            self.committed = dict(progress)
            return better
        if kept and self.keep_best > 1:
            # A new file: nothing recorded is touched before the ranking is.
            path = self.folder.epoch_checkpoint(epoch)
            self.save_best(path, metrics, thresholds, epoch=epoch, step=step)
        # The commit: from here a resume starts at the next epoch with the new ranking, and
        # settle finishes whatever of the rest a kill left undone.
        self.save_last(progress)
        if kept:
            self.write_kept()
        if better:
            self.save_best(self.folder.best, metrics, thresholds, epoch=epoch, step=step)
        self.prune_epoch_files()
        return better

    def save_best(
        self,
        path: Path,
        metrics: Mapping[str, Any],
        thresholds: Thresholds,
        *,
        epoch: int,
        step: int,
    ) -> None:
        """Save the model (its EMA, if any) as epoch `epoch`'s inference checkpoint (no optimizer
        state)."""
        save_checkpoint(
            path,
            self.inference_model,
            config=self.config,
            epoch=epoch,
            step=step,
            extra={"metrics": dict(metrics), **self.extra},
            thresholds=thresholds,
        )

    def kept_checkpoints(self) -> list[dict[str, Any]]:
        """The kept checkpoints, best first (rank, epoch, value, path relative to the run)."""
        out = []
        for rank, entry in enumerate(self.ranking.kept, start=1):
            epoch = int(entry["epoch"])
            path = self.folder.best if self.keep_best == 1 else self.folder.epoch_checkpoint(epoch)
            out.append(
                {
                    "rank": rank,
                    "epoch": entry["epoch"],
                    self.select_best: json_value(entry["value"]),
                    "path": path.relative_to(self.folder.root).as_posix(),
                }
            )
        return out

    def write_kept(self) -> None:
        """checkpoints/kept.json: the recorded ranking, for `RUN:bestK`."""
        write_kept(
            self.folder,
            self.kept_checkpoints(),
            select_best=self.select_best,
            keep_best=self.keep_best,
        )

    def prune_epoch_files(self) -> None:
        """Delete epoch-NNNN.* files of epochs the recorded ranking does not keep."""
        keep = {int(e["epoch"]) for e in self.ranking.kept} if self.keep_best > 1 else set()
        for epoch, meta in sorted(self.folder.epoch_checkpoints().items()):
            if epoch not in keep:
                remove_checkpoint(meta)

    # ----------------------------------------------------------------------------------------
    # Resuming

    def resume(self) -> dict[str, Any]:
        """Load `last` into the model and optimizer (and the global RNG), restore the ranking
        and settle the kept checkpoints; return the loop's saved progress.

        A `last` torn by a kill while it was rewritten falls back to last.prev.
        """
        try:
            meta = load_training_state(self.folder.last, self.model, self.optimizer, ema=self.ema)
            self.last_whole = True
            if self.writer:  # not needed: what a kill left of it goes
                remove_checkpoint(self.folder.last_prev)
        except CheckpointError as exc:
            # Killed while `last` was being rewritten: its files disagree, the previous is whole.
            if not checkpoint_paths(self.folder.last_prev)[2].is_file():
                raise
            log.warning("%s; resuming from the previous one, %s", exc, self.folder.last_prev.name)
            meta = load_training_state(
                self.folder.last_prev, self.model, self.optimizer, ema=self.ema
            )
        self.ranking, progress = Ranking.split(meta["extra"]["progress"])
        self.committed = dict(progress)
        if self.writer:
            self.settle(progress)
        return progress

    def settle(self, progress: Mapping[str, Any]) -> None:
        """Make the kept checkpoints match the resumed ranking after a kill in end_epoch.

        Files of a kill's half-done saves and epoch files the ranking does not name (one saved
        before the kill could record it, or one displaced but not yet deleted) go; kept.json
        is rewritten; best.* is rewritten when the kill came between recording a new best and
        saving it, which leaves `last` at the start of the next epoch with that best's weights.
        """
        for tmp in self.folder.checkpoints.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        self.prune_epoch_files()
        r = self.ranking
        if r.kept:
            self.write_kept()
        else:  # no epoch recorded yet: nothing to name
            self.folder.kept.unlink(missing_ok=True)
        if r.best_epoch is None or r.best_metrics is None:
            return
        try:
            if read_metadata(self.folder.best)["epoch"] == r.best_epoch:
                return
        except CheckpointError:
            pass  # missing, or torn by the kill: rewritten below
        if (progress["epoch"], progress["batch"]) == (r.best_epoch + 1, 0):
            log.info("%s: saving best epoch %d again (interrupted)", self.folder.best, r.best_epoch)
            thresholds = Thresholds.from_dict(r.best_metrics["thresholds"])
            self.save_best(
                self.folder.best, r.best_metrics, thresholds, epoch=r.best_epoch,
                step=int(progress["step"]),
            )  # fmt: skip
        else:
            log.warning(
                "%s does not hold the recorded best epoch %d and cannot be rebuilt",
                self.folder.best,
                r.best_epoch,
            )
