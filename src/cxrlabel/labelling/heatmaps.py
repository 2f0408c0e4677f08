"""Grad-CAM heatmaps for a CXRModel, drawn over the film, with a contact sheet per image.

CAMs come from the maintained `grad-cam` package (pytorch_grad_cam), not a hand-written CAM.
The target layer is found by running the model once and taking the last module, in order of
completion, whose output is still a spatial map (B, C, H, W) with H * W > 1: the final feature
map before global pooling, whatever the backbone (the tiny CNN's `features`, DenseNet's final
norm/activation, MobileNet's last block...). The film is preprocessed with the model's own
saved preprocessing, and the CAM is mapped back through the same pad/crop geometry, so it lines
up with the film at the film's own size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from cxrlabel.data.pictures import SheetStyle, encode_png, render_sheet
from cxrlabel.data.transforms import preprocess, scaled_shape
from cxrlabel.models.factory import CXRModel
from cxrlabel.models.predictor import Predictor

log = logging.getLogger(__name__)

# Display: CAM opacity where the CAM is 1 (it fades to 0 with the CAM so the film stays
# readable where the model did not look).
MAX_ALPHA = 0.6
COLORMAP = "jet"
SHEET_TILE = 256


def find_target_layer(model: CXRModel) -> nn.Module:
    """The module producing the backbone's last spatial feature map (see the module doc)."""
    size = model.preprocessing.size
    device = next(model.parameters()).device
    order: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            order.append((module, tuple(output.shape)))

    handles = [m.register_forward_hook(record) for m in model.backbone.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.backbone(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    spatial = [m for m, shape in order if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not spatial:
        raise ValueError(
            f"{model.spec.backbone}: no spatial feature map found for Grad-CAM at {size} px input"
        )
    return spatial[-1]


@dataclass(frozen=True)
class HeatmapModel:
    """What Grad-CAM runs on for a Predictor: the PyTorch model, its target layer and a note
    naming the checkpoint; or, when heatmaps are unavailable, no model and the reason."""

    model: CXRModel | None
    layer: nn.Module | None
    note: str = ""
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.reason is None


def heatmap_model(model: Predictor, *, required: bool = True) -> HeatmapModel:
    """The PyTorch model Grad-CAM runs on for `model` (its first member; an ONNX model's is
    reloaded from the checkpoint it was exported from, see `Predictor.torch_model`) and that
    model's target layer, found here once: finding it hooks every module and runs a forward
    pass, which each heatmap would otherwise repeat.

    required: True raises whatever stops heatmaps (a missing or changed checkpoint, an
    unreadable file, no spatial feature map), as heatmaps asked of `cxrlabel label` must;
    False (the service, where heatmaps are optional) returns an unavailable HeatmapModel whose
    `reason` says why, so that labelling goes on.
    """
    try:
        torch_model, path = model.torch_model()
        layer = find_target_layer(torch_model.eval())
    except Exception as exc:
        if required:
            raise
        # Anything may stop them (the checkpoint loader and the backbone raise many types);
        # none of it may stop labelling, and the reason is reported.
        reason = f"heatmaps unavailable: {exc}"
        log.warning("%s", reason)
        return HeatmapModel(None, None, reason=reason)
    info = model.model_info()
    n = len(info.get("members", [])) or 1
    note = f"Grad-CAM from {path}"
    if n > 1:
        note += f" (the first of the {n} ensemble members; the labels are the ensemble's)"
    tta = info.get("tta", 1)
    if tta != 1:
        # Grad-CAM explains one forward pass; an average over transformed films has no map.
        note += f"; drawn on the untransformed film, without the labels' {tta}-transform TTA"
    return HeatmapModel(torch_model, layer, note)


def _to_film_geometry(cam: np.ndarray, shape: tuple[int, int], model: CXRModel) -> np.ndarray:
    """Undo the preprocessing's pad or crop: a (S, S) CAM -> (H, W) over the original film."""
    prep = model.preprocessing
    size = prep.size
    new_h, new_w = scaled_shape(shape, size, prep.resize_mode)
    if prep.resize_mode == "pad":
        top, left = (size - new_h) // 2, (size - new_w) // 2
        region = cam[top : top + new_h, left : left + new_w]
    else:
        # The model saw only the centre crop; outside it the CAM is 0 (nothing was seen).
        region = np.zeros((new_h, new_w), dtype=np.float32)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        region[top : top + size, left : left + size] = cam
    height, width = shape
    resized = Image.fromarray(np.ascontiguousarray(region, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def gradcams(
    model: CXRModel,
    image: np.ndarray,
    labels: Sequence[str],
    *,
    target_layer: nn.Module | None = None,
) -> dict[str, np.ndarray]:
    """Grad-CAM of each of `labels` for one film, in one forward/backward pass.

    image: (H, W) float in [0, 1] as `read_image` returns. Returns label -> (H, W) float32 CAM
    in [0, 1] (grad-cam scales each CAM to its own maximum; an all-zero CAM means no positive
    evidence at the target layer). `target_layer` defaults to `find_target_layer(model)`;
    pass it when calling for many films.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected a (H, W) film, got shape {image.shape}")
    unknown = [name for name in labels if name not in model.spec.labels]
    if unknown:
        raise ValueError(f"{unknown} not predicted by this model; it predicts {model.spec.labels}")
    if not labels:
        return {}
    layer = target_layer if target_layer is not None else find_target_layer(model)
    x = preprocess(image, model.preprocessing)[None].repeat(len(labels), 1, 1, 1)
    # One copy of the film per label, each with its own target: the copies are independent in
    # eval mode, so one backward pass gives every label's gradients.
    targets = [ClassifierOutputTarget(model.spec.labels.index(name)) for name in labels]
    x.requires_grad_(True)  # a graph exists even if the model's parameters are frozen
    # Grad-CAM needs gradients: leave any surrounding inference_mode / no_grad.
    with torch.inference_mode(False), torch.enable_grad(), GradCAM(model, [layer]) as cam:
        maps = cam(input_tensor=x, targets=targets)
    model.zero_grad(set_to_none=True)  # the backward pass filled .grad; free that memory
    return {name: _to_film_geometry(maps[i], image.shape, model) for i, name in enumerate(labels)}


def gradcam(model: CXRModel, image: np.ndarray, label: str) -> np.ndarray:
    """Grad-CAM of `label` for one (H, W) [0, 1] film: (H, W) float32 in [0, 1]."""
    return gradcams(model, image, [label])[label]


def _colour(cam: np.ndarray) -> np.ndarray:
    """(H, W) [0, 1] -> (H, W, 3) float32 colours, through a 256-entry lookup table (mapping
    every pixel through matplotlib directly is ~10x slower on a 1024 px film)."""
    from matplotlib import colormaps

    lut = colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)
    return lut[np.rint(np.clip(cam, 0.0, 1.0) * 255.0).astype(np.uint8)]


def overlay_rgb(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the grey film with the colour-mapped CAM blended where it is high."""
    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float32)
    if image.ndim != 2 or image.shape != cam.shape:
        raise ValueError(f"film {image.shape} and CAM {cam.shape} must be the same (H, W)")
    if not np.all(np.isfinite(cam)):
        raise ValueError("CAM contains non-finite values")
    film = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=2)
    alpha = MAX_ALPHA * np.clip(cam, 0.0, 1.0)[..., None]
    blended = film * (1.0 - alpha) + _colour(cam) * alpha
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def overlay_png(image: np.ndarray, cam: np.ndarray) -> bytes:
    """PNG bytes of the film with the colour-mapped CAM blended over it."""
    return encode_png(overlay_rgb(image, cam))


def _tile(rgb: np.ndarray, tile: int) -> Image.Image:
    im = Image.fromarray(rgb)
    im.thumbnail((tile, tile), Image.Resampling.BILINEAR)
    return im


def contact_sheet_png(
    image: np.ndarray,
    cams: Mapping[str, np.ndarray],
    *,
    probabilities: Mapping[str, float] | None = None,
    title: str = "",
    tile: int = SHEET_TILE,
    columns: int = 4,
) -> bytes:
    """One PNG: the plain film, then one overlay per label, captioned with its probability."""
    grey = np.repeat(
        np.clip(np.rint(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)[..., None],
        3,
        axis=2,
    )
    tiles = [_tile(grey, tile)]
    captions = ["film" if cams else "film (no label to show)"]
    for name, cam in cams.items():
        p = None if probabilities is None else probabilities.get(name)
        tiles.append(_tile(overlay_rgb(image, cam), tile))
        captions.append(name if p is None else f"{name} {p:.2f}")
    columns = max(1, min(columns, len(tiles)))
    sheet = render_sheet(
        tiles,
        [[caption[:40]] for caption in captions],
        tile=tile,
        columns=columns,
        style=SheetStyle(),
        title=title[: columns * tile // 6],
    )
    return encode_png(sheet)
