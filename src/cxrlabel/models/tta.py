"""Test-time augmentation (TTA): probabilities averaged over fixed, mild transforms of a film.

`TTA_TRANSFORMS` is the one ordered list; `--tta N` uses its first N. The identity comes
first, so N = 1 is exactly the model without TTA. Then, in pairs where a transform has a
mirror image, so that an even N stays balanced:

    0  identity
    1  zoom in 1.05 (about the centre)
    2  rotate +5 degrees (counter-clockwise)
    3  rotate -5 degrees
    4  shift right by 3% of the width
    5  shift left by 3% of the width
    6  zoom in 1.1

Every transform is deterministic (no random draw) and geometric only, with bilinear
resampling and black (0) fill like the pad of `cxrlabel.data.transforms.resize` and the
training augmentation. None flips: a chest is not left-right symmetric (heart, aortic knob and
gastric bubble on the patient's left), so a flipped film is an anatomically impossible one
(see `AugmentConfig.hflip`). Shifts are horizontal only: a vertical shift would push the
costophrenic angles or the apices off the film.

`TTAPredictor(inner, n)` wraps any `Predictor` (an Ensemble, an OnnxModel, either backend):
each transform is applied to the films given to `predict_images`, the inner model predicts
them as usual (its own resize and normalisation), and the probabilities are averaged.
Labels and thresholds stay the inner model's (they were chosen without TTA). Grad-CAM
heatmaps come from the inner PyTorch model on the untransformed film (`torch_model`), so they
explain the identity prediction, not the TTA average.

The transform acts on the film as `predict_images` receives it: the full-size film, or (where
every member resizes alike, as in `cxrlabel label`, `evaluate` and the service) the film
already scaled to the model's input. Both give the same film up to resampling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrlabel.data.transforms import Preprocessing
from cxrlabel.models.predictor import Predictor
from cxrlabel.models.thresholds import Thresholds

if TYPE_CHECKING:
    from cxrlabel.models.factory import CXRModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TTATransform:
    """One fixed affine transform about the film's centre (no flip, no shear).

    angle: degrees, counter-clockwise; shift_x: fraction of the width, positive = right;
    zoom: > 1 zooms in (the edges leave the film).
    """

    name: str
    angle: float = 0.0
    shift_x: float = 0.0
    zoom: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.angle == 0.0 and self.shift_x == 0.0 and self.zoom == 1.0

    def apply(self, img: np.ndarray) -> np.ndarray:
        """A (H, W) [0, 1] film -> the transformed (H, W) float32 film (the identity returns
        the film itself, unresampled)."""
        if self.is_identity:
            return img
        # Imported here: torchvision costs ~3 s to import and only TTA needs it at inference.
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
        out = TF.affine(
            x,
            angle=self.angle,
            translate=[self.shift_x * x.shape[-1], 0.0],
            scale=self.zoom,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=0.0,
        )
        return out[0].clamp_(0.0, 1.0).numpy()


TTA_TRANSFORMS: tuple[TTATransform, ...] = (
    TTATransform("identity"),
    TTATransform("zoom 1.05", zoom=1.05),
    TTATransform("rotate +5 deg", angle=5.0),
    TTATransform("rotate -5 deg", angle=-5.0),
    TTATransform("shift right 3%", shift_x=0.03),
    TTATransform("shift left 3%", shift_x=-0.03),
    TTATransform("zoom 1.1", zoom=1.1),
)
MAX_TTA = len(TTA_TRANSFORMS)


def check_tta(n: int) -> int:
    """`n` when it is a usable number of TTA transforms (1..MAX_TTA), else ValueError."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise ValueError(f"--tta must be a whole number, got {n!r}")
    if not 1 <= n <= MAX_TTA:
        names = ", ".join(t.name for t in TTA_TRANSFORMS)
        raise ValueError(
            f"--tta must be between 1 (off) and {MAX_TTA}, the number of fixed transforms "
            f"({names}); got {n}"
        )
    return int(n)


def tta_of(model: Predictor) -> int:
    """How many TTA transforms `model` averages over (1: none), from its model_info."""
    return int(model.model_info().get("tta", 1))


def with_tta(model: Predictor, n: int) -> Predictor:
    """`model` itself for n = 1 (TTA off: outputs exactly as before), else a TTAPredictor."""
    return model if check_tta(n) == 1 else TTAPredictor(model, n)


class TTAPredictor:
    """A Predictor averaging `inner`'s probabilities over the first `n` TTA_TRANSFORMS."""

    def __init__(self, inner: Predictor, n: int) -> None:
        self.inner = inner
        self.n = check_tta(n)
        self.transforms = TTA_TRANSFORMS[: self.n]
        self.labels: tuple[str, ...] = tuple(inner.labels)
        self.thresholds: Thresholds = inner.thresholds
        self.name: str = inner.name

    @property
    def kind(self) -> str:
        return self.inner.kind if self.n == 1 else f"{self.inner.kind}, TTA x{self.n}"

    @property
    def preprocessing(self) -> Preprocessing:
        return self.inner.preprocessing

    @property
    def member_preprocessings(self) -> tuple[Preprocessing, ...]:
        return self.inner.member_preprocessings

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W) [0, 1] films -> (N, K) probabilities: the mean over the transforms of the
        inner model's probabilities on the transformed films (one inner call per transform,
        so memory stays that of one batch)."""
        if self.n == 1 or not len(images):
            return self.inner.predict_images(images)
        total = np.zeros((len(images), len(self.labels)), dtype=np.float64)
        for transform in self.transforms:
            total += self.inner.predict_images([transform.apply(img) for img in images])
        return (total / self.n).astype(np.float32)

    def model_info(self) -> dict[str, Any]:
        """The inner model's info, with this kind, "tta": n and the transforms' names."""
        return {
            **self.inner.model_info(),
            "kind": self.kind,
            "tta": self.n,
            "tta_transforms": [t.name for t in self.transforms],
        }

    def torch_model(self) -> tuple[CXRModel, Path]:
        """The inner model's PyTorch model (Grad-CAM runs on it without TTA)."""
        return self.inner.torch_model()
