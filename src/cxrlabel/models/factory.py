"""Backbones, heads and the one `create_model` factory.

Backbones come from timm under short names for the five the method compares; any other timm
name works too. Weights are `imagenet` (timm's normal pretrained download — the path users
take), a local file (safetensors, or `.pth` read with `torch.load(weights_only=True)`), or
`none` (random init). The preprocessing a backbone expects (size, mean, std, interpolation)
comes from its pretrained config and travels with the model.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cxrlabel.data.transforms import Preprocessing
from cxrlabel.models.tensor_file import (
    WeightsError,
    check_dtypes,
    describe_mismatch,
    read_safetensors,
)

log = logging.getLogger(__name__)

# Short name -> (timm name, display name used in reports, e.g. "Xception_3_D").
BACKBONES: dict[str, tuple[str, str]] = {
    "xception": ("legacy_xception", "Xception"),
    "densenet121": ("densenet121", "DenseNet121"),
    "resnet50": ("resnet50", "ResNet50"),
    "vgg19": ("vgg19", "VGG19"),
    "mobilenet": ("mobilenetv1_100", "MobileNet"),
    # Not in the method: a few-thousand-parameter CNN so tests and the CPU demo train in
    # seconds. It has no pretrained weights.
    "tiny": ("tiny", "Tiny"),
}

# Head kind -> suffix in report names (the method's "1", "3" and "3_D").
HEADS: dict[str, str] = {"linear": "1", "mlp3": "3", "mlp3_dropout": "3_D"}

# Preprocessing for the tiny CNN (it has no pretrained config to read it from).
TINY_PREPROCESSING = Preprocessing(
    size=128,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    resize_mode="pad",
    interpolation="bilinear",
)


class BackboneError(ValueError):
    """A backbone name that cannot be built offline (see `offline_backbone`)."""


# A timm registry name, optionally with a pretrained tag: lower-case words, digits and `_`.
_TIMM_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)?")


class TinyCNN(nn.Module):
    """Four conv blocks (each halves the size) and global pooling: enough to learn the
    synthetic findings on a CPU. Inputs must be at least 16 px."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2**i
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        # timm's layout, so `backbone_stages` treats it like any timm backbone: each block's
        # max-pool ends a reduction stage.
        self.feature_info = [
            {"num_chs": width * 2**i, "reduction": 2 ** (i + 1), "module": f"features.{4 * i + 3}"}
            for i in range(4)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def backbone_display_name(backbone: str) -> str:
    return BACKBONES[backbone][1] if backbone in BACKBONES else backbone


def model_display_name(backbone: str, head: str) -> str:
    """The method's naming: `<Backbone>_<1|3|3_D>`, e.g. `Xception_3_D`."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    return f"{backbone_display_name(backbone)}_{HEADS[head]}"


def _timm_name(backbone: str) -> str:
    return BACKBONES[backbone][0] if backbone in BACKBONES else backbone


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local safetensors or .pth state dict; refuse unreadable files and mismatches,
    naming them (`WeightsError`)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    own = model.state_dict()
    if path.suffix == ".safetensors":
        state = read_safetensors(path, own)
    else:
        state = _read_pth(path)
        problem = describe_mismatch({k: tuple(v.shape) for k, v in state.items()}, own)
        if problem:
            raise WeightsError(f"{path} does not fit {type(model).__name__}: {problem}")
        check_dtypes(path, state, own)
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s", len(state), path)


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    import zipfile

    try:
        # weights_only: never unpickle arbitrary objects from a file we did not write.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError) as exc:
        raise WeightsError(f"{path}: not a readable .pth weights file ({exc})") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{path}: holds no state dict (a mapping of names to tensors)")
    return dict(state)


def offline_backbone(backbone: str) -> str:
    """`backbone` if a model can be built from it with nothing downloaded or read from disk:
    one of BACKBONES, or a plain name in timm's registry (optionally with a pretrained tag,
    which with pretrained=False only picks a local config). Hub ids (`hf-hub:`), `local-dir:`
    folders, paths and URLs are refused with `BackboneError`: a checkpoint names them only to
    make loading reach outside it."""
    if backbone in BACKBONES:
        return backbone
    import timm
    from timm.models import split_model_name_tag

    if isinstance(backbone, str) and _TIMM_NAME.fullmatch(backbone):
        arch, _ = split_model_name_tag(backbone)
        if timm.is_model(arch):
            return backbone
    raise BackboneError(
        f"{backbone!r} is not a known backbone: one of {sorted(BACKBONES)} or a plain timm "
        "model name (hub ids, local folders, paths and URLs are refused: building a model "
        "from a checkpoint never downloads or reads anything but the checkpoint)"
    )


def create_backbone(
    backbone: str, weights: str | Path = "imagenet", *, resize_mode: str = "pad"
) -> tuple[nn.Module, Preprocessing]:
    """A feature extractor (pooled features, no classifier) and the preprocessing it expects.

    weights: 'imagenet' (timm download), 'none' (random init) or a path to a local file.
    """
    if backbone == "tiny":
        if str(weights) == "imagenet":
            raise WeightsError("the tiny backbone has no ImageNet weights; use weights='none'")
        model: nn.Module = TinyCNN()
        prep = TINY_PREPROCESSING
    else:
        import timm

        pretrained = str(weights) == "imagenet"
        model = timm.create_model(_timm_name(backbone), pretrained=pretrained, num_classes=0)
        prep = Preprocessing.from_timm_config(model.pretrained_cfg, resize_mode=resize_mode)
    if str(weights) not in ("imagenet", "none"):
        load_weights_file(model, Path(weights))
    return model, prep


def make_keras_compatible(model: nn.Module) -> nn.Module:
    """Make a timm model compute what Keras computes with the same (converted) weights.

    Keras uses BatchNorm epsilon 1e-3 (timm 1e-5) and TensorFlow "same" max-pool padding (pad
    bottom/right only; timm pads symmetrically). With Keras-trained weights, such as the offline
    Xception file in shared/data/weights, the features then match Keras to ~1e-6; without this
    they differ (cosine ~0.97), which costs frozen-feature heads several AUROC points.
    """
    from timm.layers.pool2d_same import MaxPool2dSame

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-3
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d) and child.stride != 1:
                setattr(module, name, MaxPool2dSame(child.kernel_size, child.stride))
    return model


def create_head(kind: str, in_features: int, num_labels: int, hidden: int = 256) -> nn.Module:
    """The method's feed-forward classifiers: one layer, three layers, three with dropout 0.5."""
    if kind == "linear":
        return nn.Linear(in_features, num_labels)
    if kind in ("mlp3", "mlp3_dropout"):
        drop = 0.5 if kind == "mlp3_dropout" else 0.0
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(drop),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(drop),
            nn.Linear(hidden, num_labels),
        )
    raise ValueError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")


@torch.no_grad()
def feature_dim(backbone: nn.Module, size: int) -> int:
    """Width of a backbone's pooled output (timm's num_features is not always it, e.g. VGG)."""
    was_training = backbone.training
    backbone.eval()
    out = backbone(torch.zeros(1, 3, size, size))
    backbone.train(was_training)
    return int(out.shape[-1])


@dataclass(frozen=True)
class ModelSpec:
    """What defines a model besides its weights; saved with every checkpoint."""

    backbone: str
    head: str
    labels: tuple[str, ...]
    hidden: int = 256


class CXRModel(nn.Module):
    """Backbone + head: images (B, 3, S, S) -> one logit per label (sigmoid gives P)."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, spec: ModelSpec, preprocessing: Preprocessing
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.preprocessing = preprocessing
        # Normalisation layers of frozen stages (`freeze_stages`): a plain list, not
        # submodules, so the state dict is unchanged; they stay in eval mode in train().
        self.frozen_norms: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> CXRModel:
        super().train(mode)
        for module in self.frozen_norms:
            module.eval()  # running statistics of a frozen stage must not move
        return self


def resolve_device(device: str) -> torch.device:
    """auto | cpu | cuda -> the torch device; 'cuda' without CUDA is an error, not a fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(device)


def create_model(
    backbone: str,
    head: str,
    labels: Sequence[str],
    *,
    weights: str | Path = "imagenet",
    hidden: int = 256,
    size: int | None = None,
    resize_mode: str = "pad",
    equalize: str = "none",
) -> CXRModel:
    """The factory: backbone (with weights) + head for `labels`, and its preprocessing.

    `size` overrides the backbone's native input size (e.g. 220 or 320 as in the method);
    mean, std and interpolation still come from the backbone's config. `equalize` is recorded
    in the preprocessing (see `Preprocessing.equalize`).
    """
    net, prep = create_backbone(backbone, weights, resize_mode=resize_mode)
    if size is not None and size != prep.size:
        prep = Preprocessing(size, prep.mean, prep.std, prep.resize_mode, prep.interpolation)
    if equalize != prep.equalize:
        prep = dataclasses.replace(prep, equalize=equalize)
    spec = ModelSpec(backbone=backbone, head=head, labels=tuple(labels), hidden=hidden)
    dim = feature_dim(net, prep.size)
    return CXRModel(net, create_head(head, dim, len(spec.labels), hidden), spec, prep)


# --------------------------------------------------------------------------------------------
# Backbone stages (for freezing the first ones)
# --------------------------------------------------------------------------------------------


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def backbone_stages(backbone: nn.Module) -> list[str]:
    """The module name that ends each reduction stage, from timm's `feature_info`.

    Stage k is its module (with everything inside it) and whatever comes between stage k-1's
    module and it in module order; what comes after the last stage's module (a neck, VGG's
    pre-logits) belongs to no stage.
    """
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__} has no feature_info: stages are undefined")
    names = [entry["module"] if isinstance(entry, Mapping) else entry.module for entry in info]
    known = {name for name, _ in backbone.named_modules()}
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"feature_info names modules the backbone lacks: {missing}")
    return names


def module_stages(backbone: nn.Module) -> dict[str, int]:
    """Each module's stage (see `backbone_stages`); len(stages) for what follows the last."""
    stages = backbone_stages(backbone)
    order = [name for name, _ in backbone.named_modules()]
    ends = [order.index(name) for name in stages]
    out: dict[str, int] = {}
    for position, name in enumerate(order):
        inside = [k for k, end in enumerate(stages) if name.startswith(end + ".")]
        if inside:  # inside a stage's module: that stage, however late in the order
            out[name] = inside[-1]
        else:  # the first stage whose module is here or later
            out[name] = next((k for k, end in enumerate(ends) if end >= position), len(stages))
    return out


def freeze_stages(model: CXRModel, n: int) -> int:
    """Freeze the backbone's first `n` stages: no gradients, normalisation layers kept in eval
    mode (see CXRModel.train). Returns how many parameters were frozen."""
    if n == 0:
        return 0
    stages = module_stages(model.backbone)
    count = len(backbone_stages(model.backbone))
    if not 0 <= n <= count:
        raise ValueError(
            f"freeze_stages={n}, but backbone {model.spec.backbone!r} has {count} stages"
        )
    frozen = 0
    for name, module in model.backbone.named_modules():
        if stages[name] >= n:
            continue
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
            frozen += param.numel()
        if isinstance(module, BATCH_NORMS):
            model.frozen_norms.append(module)
    model.train(model.training)
    log.info("froze %d parameters in the first %d of %d stages", frozen, n, count)
    return frozen


def masked_bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy summed over each image's certain labels, averaged over the batch.

    This is the method's equation (1): masked (uncertain or unknown) labels contribute nothing.
    pos_weight (one per label) multiplies the positive term, as in BCEWithLogitsLoss.
    """
    if pos_weight is not None:
        pos_weight = pos_weight.to(device=logits.device, dtype=logits.dtype)
    per_label = nn.functional.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), reduction="none", pos_weight=pos_weight
    )
    return (per_label * mask.to(per_label.dtype)).sum(dim=1).mean()
