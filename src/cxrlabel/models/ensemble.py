"""Saved models as one predictor: a single checkpoint or an ensemble averaging probabilities.

`--model` arguments name run folders (their best checkpoint), `RUN:bestK` (the K best
checkpoints a run kept, see RunConfig.keep_best) or checkpoint files. Each member keeps its own
saved preprocessing, so members trained at different input sizes can be combined. The CheXpert
paper's figures come from a 30-checkpoint ensemble; `kind` says which kind a figure came from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import cxrlabel
from cxrlabel.data.labels import LabelTable, ensure_ids
from cxrlabel.data.transforms import preprocess
from cxrlabel.evaluation.results import Predictions
from cxrlabel.models.checkpoint import load_checkpoint, thresholds_from_metadata
from cxrlabel.models.factory import CXRModel, model_display_name, resolve_device
from cxrlabel.models.run_folder import resolve_model_paths
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)


def _combined_thresholds(members: Sequence[Thresholds]) -> Thresholds:
    """Identical thresholds pass through (`cxrlabel thresholds` on an ensemble stores the same
    ones in every member); differing ones are averaged label by label, which approximates the
    rule only, so the result says so."""
    first = members[0]
    if all(t == first for t in members[1:]):
        return first
    values = tuple(float(v) for v in np.mean([t.values for t in members], axis=0))
    bands = [t.band for t in members]
    band = None
    if all(b is not None for b in bands):
        band = tuple((float(lo), float(hi)) for lo, hi in np.mean(bands, axis=0))
    elif any(b is not None for b in bands):
        log.warning(
            "ensemble members disagree on the uncertainty band (some have none): no band is "
            "used; run `cxrlabel thresholds` on the ensemble to choose one for it"
        )
    rules = ", ".join(dict.fromkeys(t.rule for t in members))
    note = f"mean of {len(members)} members' thresholds (rules: {rules})"
    return Thresholds(first.labels, values, first.rule, band, note)


@dataclass(frozen=True)
class Member:
    path: Path
    model: CXRModel
    meta: dict[str, Any]


class Ensemble:
    """One or more checkpoints predicting the same labels; probabilities are averaged."""

    def __init__(self, members: Sequence[Member], device: torch.device) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one checkpoint")
        labels = members[0].model.spec.labels
        for m in members[1:]:
            if m.model.spec.labels != labels:
                raise ValueError(
                    f"{m.path} predicts {list(m.model.spec.labels)}, but {members[0].path} "
                    f"predicts {list(labels)}: ensemble members must share their labels"
                )
        self.members = tuple(members)
        self.labels: tuple[str, ...] = tuple(labels)
        self.device = device
        self.thresholds = _combined_thresholds(
            [thresholds_from_metadata(m.meta).subset(labels) for m in members]
        )

    @property
    def kind(self) -> str:
        n = len(self.members)
        return "single model" if n == 1 else f"ensemble of {n} checkpoints"

    @property
    def name(self) -> str:
        names = []
        for m in self.members:
            spec = m.model.spec
            run = m.meta.get("config", {}).get("name")
            base = model_display_name(spec.backbone, spec.head)
            names.append(f"{base} ({run})" if run else base)
        unique = list(dict.fromkeys(names))
        return unique[0] if len(unique) == 1 else " + ".join(unique)

    @torch.no_grad()
    def _member_probs(self, member: Member, batch: torch.Tensor) -> np.ndarray:
        logits = member.model(batch.to(self.device)).float()
        return torch.sigmoid(logits).cpu().numpy()

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W) [0, 1] films -> (N, K) probabilities averaged over the members."""
        if not len(images):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        total = np.zeros((len(images), len(self.labels)), dtype=np.float64)
        for group in self._by_preprocessing():
            prep = group[0].model.preprocessing
            batch = torch.stack([preprocess(img, prep) for img in images])
            for member in group:
                total += self._member_probs(member, batch)
        return (total / len(self.members)).astype(np.float32)

    def _by_preprocessing(self) -> list[list[Member]]:
        """Members grouped by preprocessing: a group's films are resized and normalised once
        (`RUN:best5` would otherwise prepare every film five times)."""
        groups: dict[str, list[Member]] = {}
        for member in self.members:
            key = json.dumps(member.model.preprocessing.to_dict(), sort_keys=True)
            groups.setdefault(key, []).append(member)
        return list(groups.values())

    def predict_table(
        self,
        table: LabelTable,
        *,
        policy: str = "U-Ignore",
        batch_size: int = 32,
        workers: int = 0,
    ) -> Predictions:
        """Score every readable image of a labelled table (unreadable ones are skipped and
        logged); targets and mask follow `policy` for this ensemble's labels."""
        from cxrlabel.data.dataset import CXRDataset, collate_skipping

        table = ensure_ids(table)
        total: np.ndarray | None = None
        rows: np.ndarray | None = None
        targets = masks = None
        # One pass over the images per preprocessing: decoding is the slow part.
        for group in self._by_preprocessing():
            prep = group[0].model.preprocessing
            dataset = CXRDataset(table, self.labels, prep, policy=policy, on_error="skip")
            loader = DataLoader(
                dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping
            )
            probs, index = [], []
            for batch in loader:
                if batch is None:
                    continue
                probs.append(sum(self._member_probs(m, batch["image"]) for m in group))
                index.append(batch["index"].numpy())
            if not probs:
                raise ValueError(f"{table.source}: no readable image to score")
            group_rows = np.concatenate(index)
            group_sum = np.concatenate(probs).astype(np.float64)
            if rows is None:
                rows, total = group_rows, group_sum
                targets, masks = dataset.targets[rows], dataset.mask[rows]
            elif not np.array_equal(rows, group_rows):
                raise RuntimeError("ensemble members scored different images")  # same paths
            else:
                total = total + group_sum
        frame = table.frame.iloc[rows]
        return Predictions(
            labels=self.labels,
            paths=tuple(str(p) for p in frame["Path"]),
            patient_ids=tuple(str(p) for p in frame["patient_id"]),
            study_ids=tuple(str(s) for s in frame["study_id"]),
            y_score=total / len(self.members),
            y_true=np.asarray(targets, dtype=np.float64),
            mask=np.asarray(masks, dtype=bool),
            thresholds=self.thresholds,
            model=self.name,
            kind=self.kind,
            data=table.source,
        )

    def model_info(self) -> dict[str, Any]:
        """What a service or an output file says about the model that produced a label."""
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "thresholds": self.thresholds.to_dict(),
            "package": {"name": "cxrlabel", "version": cxrlabel.__version__},
            "members": [
                {
                    "path": str(m.path),
                    "backbone": m.model.spec.backbone,
                    "head": m.model.spec.head,
                    "preprocessing": m.model.preprocessing.to_dict(),
                    "epoch": m.meta.get("epoch"),
                    "sha256": m.meta.get("sha256", {}).get("weights"),
                }
                for m in self.members
            ],
        }


def load_ensemble(specs: Sequence[str | Path], *, device: str = "auto") -> Ensemble:
    """Load every checkpoint named by `specs` (see run_folder.resolve_model_paths) in eval mode."""
    target = resolve_device(device)
    members = []
    for path in resolve_model_paths(specs):
        model, meta = load_checkpoint(path)
        members.append(Member(path, model.to(target).eval(), meta))
    log.info("loaded %d checkpoint(s) on %s", len(members), target)
    return Ensemble(members, target)
