"""The optimisation side of a fine-tuning recipe: what `_Run` builds from RunConfig's
"Recipe: optimisation" keys besides the plain Adam + masked BCE of the method.

- param groups: backbone at ``lr * backbone_lr_scale``, head at ``lr`` (frozen stages left out);
- the learning rate of a step (constant or cosine, after a linear warm-up): a pure function of
  the global step, so a resumed run needs no scheduler state;
- the positive-class weights of the BCE (`pos_weight`);
- the AUC-margin stage (LibAUC's AUC-M loss and PESG optimizer), imported only when used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlabel.config import parse_pos_weight
from cxrlabel.models.factory import CXRModel

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")
POS_WEIGHT_CLIP = 50.0  # balanced weights are clipped to [1/this, this]
LR_SCALE_KEY = "lr_scale"  # each param group's share of the scheduled lr


def scheduled_lr(
    base_lr: float, schedule: str, step: int, total_steps: int, *, warmup_steps: int = 0
) -> float:
    """Learning rate for optimisation step `step` (0-based) of `total_steps`.

    A pure function of the step, so a resumed run needs no scheduler state. "constant" is the
    method's setup; "cosine" decays to zero over the run, which steadies short CPU runs whose
    BatchNorm statistics otherwise keep jumping at a high constant rate. With `warmup_steps`
    the rate first rises linearly (step 0 at base_lr / warmup_steps, reaching base_lr at the
    end of the warm-up); the cosine then decays over the steps that remain.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {schedule!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(total_steps - warmup_steps, 1)
    done = min(step - warmup_steps, span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * done / span))


def param_groups(model: CXRModel, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """Backbone and head parameters as two optimizer groups, each with its lr scale.

    Frozen parameters (requires_grad False) are left out; an empty group is dropped.
    """
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad],
         LR_SCALE_KEY: backbone_lr_scale},
        {"params": [p for p in model.head.parameters() if p.requires_grad], LR_SCALE_KEY: 1.0},
    ]  # fmt: skip
    return [g for g in groups if g["params"]]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's lr to `lr` times its scale (1 for a group without one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_SCALE_KEY, 1.0)


# --------------------------------------------------------------------------------------------
# Positive-class weights
# --------------------------------------------------------------------------------------------


def label_counts(targets: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per label among the rows the loss sees (mask true)."""
    mask = np.asarray(mask, dtype=bool)
    positive = np.asarray(targets) > 0.5
    return (positive & mask).sum(axis=0), (~positive & mask).sum(axis=0)


def balanced_pos_weight(targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """negatives / positives per label, clipped to [1/50, 50] (a label without positives gets
    50, one without negatives 1/50, one without either 1)."""
    pos, neg = label_counts(targets, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pos + neg > 0, neg / np.maximum(pos, 1e-12), 1.0)
    return np.clip(ratio, 1.0 / POS_WEIGHT_CLIP, POS_WEIGHT_CLIP)


def pos_weights(
    spec: str, labels: Sequence[str], targets: np.ndarray, mask: np.ndarray
) -> dict[str, float] | None:
    """RunConfig.pos_weight for the run's labels: None ("none"), balanced from the training
    targets, or the explicit list (labels it does not name get 1)."""
    parsed = parse_pos_weight(spec)
    if parsed == "none":
        return None
    if parsed == "balanced":
        return dict(zip(labels, map(float, balanced_pos_weight(targets, mask)), strict=True))
    assert isinstance(parsed, dict)
    unknown = sorted(set(parsed) - set(labels))
    if unknown:
        raise ValueError(f"pos_weight names label(s) {unknown} not among {list(labels)}")
    return {label: float(parsed.get(label, 1.0)) for label in labels}


# --------------------------------------------------------------------------------------------
# AUC-margin stage (LibAUC)
# --------------------------------------------------------------------------------------------


def positive_fractions(targets: np.ndarray, mask: np.ndarray) -> list[float]:
    """Each label's positive fraction among its certain training rows (AUC-M's imratio)."""
    pos, neg = label_counts(targets, mask)
    return [float(p / (p + n)) if p + n else 0.0 for p, n in zip(pos, neg, strict=True)]


class AucmObjective:
    """LibAUC's AUC-margin loss, one per label on sigmoid probabilities, and its PESG optimizer.

    `MultiLabelAUCMLoss` is LibAUC's per-label AUCMLoss (v1, each label's own a, b, alpha) in
    the one object PESG drives; each label's term sees only its certain rows of the batch and
    uses that label's training positive fraction (auto=False keeps it from the batch's). PESG
    uses the margin in its update of alpha. LibAUC 1.3.0 is imported here only, so nothing
    else depends on it.
    """

    def __init__(
        self,
        model: nn.Module,
        imratio: Sequence[float],
        *,
        lr: float,
        margin: float,
        device: str | torch.device,
    ) -> None:
        from libauc.losses import MultiLabelAUCMLoss
        from libauc.optimizers import PESG

        device = torch.device(device)
        self.loss = MultiLabelAUCMLoss(
            margin=margin, version="v1", imratio=list(imratio), num_labels=len(imratio),
            device=device,
        )  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        # LibAUC's defaults otherwise (momentum 0.9, weight_decay 1e-5, epoch_decay 2e-3).
        self.optimizer = PESG(
            params, loss_fn=self.loss, lr=lr, mode="sgd", device=device, verbose=False
        )

    def __call__(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        probs = torch.sigmoid(logits.float())
        mask = mask.bool()
        terms = []
        for k in range(probs.shape[1]):
            rows = mask[:, k]
            if rows.any():
                ids = torch.tensor([k], device=probs.device)
                terms.append(self.loss(probs[rows], targets[rows].float(), task_id=ids, auto=False))
        if not terms:  # no certain label in the batch: a zero loss that still backpropagates
            return probs.sum() * 0.0
        return torch.stack([t.reshape(()) for t in terms]).mean()

    def end_epoch(self) -> None:
        """PESG's epoch-level step: the proximal reference becomes this epoch's mean weights."""
        if self.optimizer.T:  # an epoch without steps (resumed at its end) has no mean
            self.optimizer.update_regularizer()
