"""Saved models as one predictor: a single checkpoint or an ensemble averaging probabilities.

`--model` arguments name run folders (their best checkpoint), `RUN:bestK` (the K best
checkpoints a run kept, see RunConfig.keep_best) or checkpoint files. Each member keeps its own
saved preprocessing, so members trained at different input sizes can be combined. The CheXpert
paper's figures come from a 30-checkpoint ensemble; `kind` says which kind a figure came from.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cxrlabel
from cxrlabel.data.transforms import (
    Preprocessing,
    ResizeGeometry,
    equalize_batch,
    to_model_input_batch,
)
from cxrlabel.models.checkpoint import load_checkpoint, thresholds_from_metadata
from cxrlabel.models.factory import CXRModel, model_display_name, resolve_device
from cxrlabel.models.run_folder import resolve_model_paths
from cxrlabel.models.thresholds import combine_thresholds

log = logging.getLogger(__name__)

# What an Ensemble computes in: fp32, or bf16 autocast (the weights stay fp32; matmuls and
# convolutions run in bf16, the sigmoid in fp32). See cxrlabel.models.predictor.inference_plan.
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Member:
    path: Path
    model: CXRModel
    meta: dict[str, Any]


class Ensemble:
    """One or more checkpoints predicting the same labels; probabilities are averaged.

    precision: 'fp32' or 'bf16' (autocast; native and fast only on CUDA and on CPUs with
    AMX/AVX512-BF16, emulated and slow elsewhere, but it runs anywhere). compile: run each
    member through torch.compile (off by default: the first batch pays the compilation); the
    members themselves stay eager modules, so Grad-CAM's hooks still see their layers.
    """

    def __init__(
        self,
        members: Sequence[Member],
        device: torch.device,
        *,
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one checkpoint")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
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
        self.precision = precision
        self.compiled = compile
        self._forwards: dict[int, Any] = {}
        self.thresholds = combine_thresholds(
            [thresholds_from_metadata(m.meta).subset(labels) for m in members], labels
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

    @property
    def preprocessing(self) -> Preprocessing:
        """The first member's preprocessing (the one its heatmaps use); members may differ,
        see `member_preprocessings`."""
        return self.members[0].model.preprocessing

    @property
    def member_preprocessings(self) -> tuple[Preprocessing, ...]:
        """Every member's preprocessing, in member order."""
        return tuple(m.model.preprocessing for m in self.members)

    def torch_model(self) -> tuple[CXRModel, Path]:
        """The first member's PyTorch model and checkpoint (what Grad-CAM runs on)."""
        first = self.members[0]
        return first.model, first.path

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _forward(self, member: Member) -> Any:
        if not self.compiled:
            return member.model
        key = id(member)
        if key not in self._forwards:  # compiled once per member, on first use
            self._forwards[key] = torch.compile(member.model)
        return self._forwards[key]

    @torch.inference_mode()
    def _member_probs(self, member: Member, batch: torch.Tensor) -> np.ndarray:
        with self._autocast():
            logits = self._forward(member)(batch.to(self.device))
        return torch.sigmoid(logits.float()).cpu().numpy()

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W) [0, 1] films -> (N, K) probabilities averaged over the members.

        Each film is resized once per distinct resize geometry and normalised once per
        distinct preprocessing, however many members share them (`RUN:best5` would otherwise
        prepare every film five times); an S x S film already resized to a member's geometry
        is not resampled again.
        """
        if not len(images):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        total = np.zeros((len(images), len(self.labels)), dtype=np.float64)
        for geometry, by_prep in self._by_preprocessing().items():
            resized = np.stack([geometry.apply(img) for img in images])
            for prep, group in by_prep.items():
                films = torch.from_numpy(equalize_batch(resized, prep.equalize))
                batch = to_model_input_batch(films, prep)
                for member in group:
                    total += self._member_probs(member, batch)
        return (total / len(self.members)).astype(np.float32)

    def _by_preprocessing(self) -> dict[ResizeGeometry, dict[Preprocessing, list[Member]]]:
        """Members grouped by resize geometry, then by preprocessing (mean and std), in
        member order."""
        groups: dict[ResizeGeometry, dict[Preprocessing, list[Member]]] = {}
        for member in self.members:
            prep = member.model.preprocessing
            groups.setdefault(prep.geometry, {}).setdefault(prep, []).append(member)
        return groups

    def model_info(self) -> dict[str, Any]:
        """What a service or an output file says about the model that produced a label."""
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "thresholds": self.thresholds.to_dict(),
            "package": {"name": "cxrlabel", "version": cxrlabel.__version__},
            "precision": self.precision,
            **({"compiled": True} if self.compiled else {}),
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


def load_ensemble(
    specs: Sequence[str | Path],
    *,
    device: str = "auto",
    precision: str = "fp32",
    compile: bool = False,
) -> Ensemble:
    """Load every checkpoint named by `specs` (see run_folder.resolve_model_paths) in eval mode."""
    target = resolve_device(device)
    members = []
    for path in resolve_model_paths(specs):
        model, meta = load_checkpoint(path)
        members.append(Member(path, model.to(target).eval(), meta))
    log.info("loaded %d checkpoint(s) on %s (%s)", len(members), target, precision)
    return Ensemble(members, target, precision=precision, compile=compile)
