"""Resize, channel expansion, normalisation and (optional) training augmentation.

Input everywhere is what :func:`cxrlabel.data.images.read_image` returns: a float32 ``(H, W)`` array
in ``[0, 1]``, 1 = white. The steps to a model input are::

    img = read_image(path)                      # (H, W) float32 in [0, 1]
    img = prep.geometry.apply(img)              # (S, S)
    x = to_model_input(img, prep)               # (3, S, S) float32, normalised

or :func:`preprocess`, which does the last two. Normalisation (``mean``/``std``) and input size
always come from a :class:`Preprocessing`, which should be built from the model's own config
(:meth:`Preprocessing.from_timm_config`); nothing here defaults to ImageNet statistics.
:data:`IMAGENET_MEAN`/:data:`IMAGENET_STD` exist only for explicit use.

:class:`ResizeGeometry` is the part of a preprocessing that the resized film depends on (size,
pad or crop, interpolation; not mean/std). It is the one type for "how a film is resized":
the preprocessing cache stores films under one, and labelling, the service and evaluation
resize a film once per distinct geometry, however many models share it.

Resizing uses Pillow's mode ``'F'`` (32-bit float) resampling: it antialiases when shrinking
(its filter support scales with the reduction factor), is deterministic, keeps full float
precision (no round trip through uint8) and matches the PIL-based resizing timm's pretrained
models were evaluated with. A 1024 -> 320 resize takes about 5 ms on one core, faster than
``torch.nn.functional.interpolate(antialias=True)`` on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

RESIZE_MODES: tuple[str, ...] = ("pad", "crop")
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")
# Grey-level equalisation of the resized film (see :func:`equalize`); "none" is the method's.
EQUALIZE_METHODS: tuple[str, ...] = ("none", "hist", "clahe")
# CLAHE's settings (OpenCV's usual ones): contrast limit and an 8 x 8 grid of tiles.
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)

_PIL_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# --------------------------------------------------------------------------------------------
# Resize geometry and preprocessing config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeGeometry:
    """How a film becomes a ``size`` x ``size`` square: what :func:`resize` depends on.

    The field names match :class:`Preprocessing` (and the preprocessing cache's ``meta.json``,
    whose fingerprint hashes ``asdict`` of this), so existing caches stay valid.
    """

    size: int
    resize_mode: str = "pad"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int | np.integer):
            raise TypeError(f"size must be an int, got {self.size!r}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        object.__setattr__(self, "size", int(self.size))
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )

    def apply(self, img: np.ndarray) -> np.ndarray:
        """The film resized to ``(size, size)`` float32 (see :func:`resize`)."""
        return resize(img, self.size, self.resize_mode, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a ``[0, 1]`` greyscale image into a model input.

    Attributes:
        size: output side in pixels (inputs are square).
        mean: per-channel mean subtracted after the grey image is repeated to 3 channels.
        std: per-channel standard deviation divided by (all > 0).
        resize_mode: ``"pad"`` keeps the whole image (longer side scaled to ``size``, the
            rest padded with black, centred); ``"crop"`` fills the square (shorter side scaled
            to ``size``, centre-cropped), losing the edges of non-square images. ``"pad"`` is
            the safer choice for radiographs: costophrenic angles and apices sit at the edges.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        equalize: ``"none"``, ``"hist"`` or ``"clahe"``: grey-level equalisation of the
            resized film before normalisation (:func:`equalize`). Part of the model's recorded
            preprocessing so every path (training, evaluation, labelling, heatmaps) applies it;
            left out of :meth:`to_dict` when ``"none"``, so older checkpoints (which lack the
            key) read as ``"none"`` and their metadata and feature-cache fingerprints stay
            unchanged.

    No field but ``equalize`` has a default: normalisation must come from the model that will
    consume the input.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str
    interpolation: str
    equalize: str = "none"

    def __post_init__(self) -> None:
        # The geometry checks size, resize_mode and interpolation (one set of rules for both).
        geometry = ResizeGeometry(self.size, self.resize_mode, self.interpolation)
        object.__setattr__(self, "size", geometry.size)
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        std = _three_floats("std", self.std)
        if any(not s > 0 for s in std):
            raise ValueError(f"std values must all be > 0, got {std}")
        object.__setattr__(self, "std", std)
        if self.equalize not in EQUALIZE_METHODS:
            raise ValueError(f"equalize must be one of {EQUALIZE_METHODS}, got {self.equalize!r}")

    @property
    def geometry(self) -> ResizeGeometry:
        """How this preprocessing resizes a film (mean and std do not change the resized film)."""
        return ResizeGeometry(self.size, self.resize_mode, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict (tuples become lists); inverse of :meth:`from_dict`."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.equalize == "none":
            del d["equalize"]  # the default; see the class doc
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Build from :meth:`to_dict` output. Unknown or missing keys are errors, not ignored."""
        return cls(**_checked_kwargs(cls, d))

    @classmethod
    def from_timm_config(cls, cfg: Mapping[str, Any], resize_mode: str = "pad") -> Preprocessing:
        """Build from a timm ``pretrained_cfg`` or ``resolve_data_config`` dict.

        Reads ``input_size`` (``(3, H, W)``, square only), ``mean``, ``std`` and
        ``interpolation``. A dict that nests them under ``"pretrained_cfg"`` is accepted.
        ``crop_pct``/``crop_mode`` are deliberately ignored: the whole film is kept.
        """
        if "input_size" not in cfg and isinstance(cfg.get("pretrained_cfg"), Mapping):
            cfg = cfg["pretrained_cfg"]
        missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
        if missing:
            raise KeyError(f"timm config lacks {missing}; got keys {sorted(cfg)}")
        input_size = tuple(int(v) for v in cfg["input_size"])
        if len(input_size) != 3 or input_size[0] != 3:
            raise ValueError(f"input_size must be (3, H, W), got {cfg['input_size']!r}")
        if input_size[1] != input_size[2]:
            raise ValueError(f"only square inputs are supported, got input_size {input_size}")
        interpolation = str(cfg.get("interpolation") or "bilinear")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"timm interpolation {interpolation!r} is not one of {INTERPOLATIONS}")
        return cls(
            size=input_size[1],
            mean=tuple(cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(cfg["std"]),  # type: ignore[arg-type]
            resize_mode=resize_mode,
            interpolation=interpolation,
        )


def _three_floats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 numbers, got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be 3 finite numbers (one per channel), got {values!r}")
    return out  # type: ignore[return-value]


def _checked_kwargs(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(names)}")
    return dict(d)


# --------------------------------------------------------------------------------------------
# Resize and dtype helpers
# --------------------------------------------------------------------------------------------


def resize(
    img: np.ndarray, size: int, mode: str = "pad", interpolation: str = "bilinear"
) -> np.ndarray:
    """Resize a ``(H, W)`` float image to ``(size, size)`` float32, keeping it in ``[0, 1]``.

    ``mode="pad"``: scale so the longer side is ``size`` (aspect kept), centre on a black
    (0) square. ``mode="crop"``: scale so the shorter side is ``size``, centre-crop.
    Bicubic overshoot is clipped back to ``[0, 1]``. Deterministic.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    img = np.asarray(img)
    if img.ndim != 2 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W) array, got shape {img.shape}")
    new_h, new_w = scaled_shape(img.shape, size, mode)
    scaled = _resize_exact(img, new_h, new_w, interpolation)
    if mode == "pad":
        out = np.zeros((size, size), dtype=np.float32)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        out[top : top + new_h, left : left + new_w] = scaled
        return out
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(scaled[top : top + size, left : left + size])


def scaled_shape(shape: tuple[int, ...], size: int, mode: str) -> tuple[int, int]:
    """``(height, width)`` that :func:`resize` scales a ``shape`` film to before its pad or
    crop: ``"pad"`` fits the longer side to ``size``, ``"crop"`` the shorter one."""
    height, width = shape
    if mode == "pad":
        scale = size / max(height, width)
        return min(size, max(1, round(height * scale))), min(size, max(1, round(width * scale)))
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def scale_to_fit(img: np.ndarray, geometry: ResizeGeometry) -> np.ndarray:
    """The film scaled exactly as :func:`resize` scales it under ``geometry``, before the pad
    or crop (aspect kept), as float32.

    :func:`resize` of the result scales by exactly 1, so it gives the very same ``(S, S)``
    model input as resizing the original: a model-sized stand-in for a large film.
    """
    img = np.asarray(img)
    if img.ndim != 2 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W) array, got shape {img.shape}")
    height, width = scaled_shape(img.shape, geometry.size, geometry.resize_mode)
    return _resize_exact(img, height, width, geometry.interpolation)


def _resize_exact(img: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    src = np.ascontiguousarray(img, dtype=np.float32)
    if src.shape == (height, width):
        return src.copy()
    resized = Image.fromarray(src).resize((width, height), _PIL_RESAMPLE[interpolation])
    out = np.asarray(resized, dtype=np.float32).copy()
    np.clip(out, 0.0, 1.0, out=out)
    return out


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``[0, 1]`` float -> uint8 ``0..255`` (rounded to nearest, clipped; NaN -> 0)."""
    scaled = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0) * np.float32(255.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def from_uint8(a: np.ndarray) -> np.ndarray:
    """uint8 ``0..255`` -> float32 ``[0, 1]``; exact inverse of :func:`to_uint8` on its output."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array, got {a.dtype}")
    return a.astype(np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------------
# Model input
# --------------------------------------------------------------------------------------------


def to_model_input(img: np.ndarray | torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Grey ``(H, W)`` (or ``(1, H, W)``) in ``[0, 1]`` -> normalised float32 ``(3, H, W)``.

    The grey channel is repeated to 3 channels (pretrained backbones expect RGB), then each
    channel is standardised with ``prep.mean``/``prep.std``. No resizing happens here: call
    :func:`resize` first, or use :func:`preprocess`.
    """
    x = torch.as_tensor(img, dtype=torch.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"expected a (H, W) or (1, H, W) image, got shape {tuple(x.shape)}")
    return to_model_input_batch(x[None, None], prep)[0]


def to_model_input_batch(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Batched :func:`to_model_input`: ``(B, H, W)`` or ``(B, 1, H, W)`` -> ``(B, 3, H, W)``.

    Runs on the batch's device (e.g. normalise on the GPU after transfer); floating dtypes are
    kept, integer inputs become float32.
    """
    if batch.ndim == 3:
        batch = batch[:, None]
    if batch.ndim != 4 or batch.shape[1] != 1:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W), got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        batch = batch.float()
    mean = torch.tensor(prep.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    # One allocation, then in place: large temporaries cost page faults on every call.
    return batch.expand(-1, 3, -1, -1).sub(mean).div_(std)


def preprocess(img: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """:func:`resize`, :func:`equalize`, :func:`to_model_input`: ``(H, W)`` in [0, 1] ->
    ``(3, S, S)``."""
    return to_model_input(equalize(prep.geometry.apply(img), prep.equalize), prep)


def equalize(img: np.ndarray, method: str) -> np.ndarray:
    """Equalise a resized grey film's histogram: ``(H, W)`` in [0, 1] -> float32 in [0, 1].

    ``"hist"``: global histogram equalisation; ``"clahe"``: contrast-limited adaptive
    equalisation (:data:`CLAHE_CLIP_LIMIT`, :data:`CLAHE_TILES`); ``"none"`` returns the input
    as it is. Works on the uint8 levels the preprocessing cache stores (:func:`to_uint8`), so a
    cached film and one resized on the fly give the same result. Uses OpenCV.
    """
    if method == "none":
        return img
    if method not in EQUALIZE_METHODS:
        raise ValueError(f"equalize must be one of {EQUALIZE_METHODS}, got {method!r}")
    import cv2  # imported here: only models trained with equalisation need it

    grey = to_uint8(img)
    if grey.ndim != 2:
        raise ValueError(f"expected a (H, W) image, got shape {grey.shape}")
    if method == "hist":
        out = cv2.equalizeHist(grey)
    else:
        out = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES).apply(grey)
    return from_uint8(out)


def equalize_batch(batch: np.ndarray, method: str) -> np.ndarray:
    """:func:`equalize` of each ``(H, W)`` film of a ``(B, H, W)`` stack."""
    if method == "none":
        return batch
    return np.stack([equalize(img, method) for img in batch])


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Random training augmentation; the defaults are the identity (no augmentation).

    Attributes:
        rotation_deg: rotate by an angle drawn uniformly from ``[-rotation_deg, rotation_deg]``.
        scale: zoom factor drawn uniformly from ``(low, high)``; ``(1, 1)`` disables.
        translate: shift by up to this fraction of width/height in each direction.
        brightness: multiply intensities by a factor in ``[1 - brightness, 1 + brightness]``.
        contrast: blend with the mean grey by a factor in ``[1 - contrast, 1 + contrast]``.
        hflip: allow horizontal flips. Off by default because a chest is *not* left-right
            symmetric: the heart, aortic knob and gastric bubble are on the patient's left
            (and films carry L/R markers), so a flipped film is an anatomically impossible
            image (dextrocardia) that can teach a model wrong cues for Cardiomegaly etc.
        hflip_p: probability of a flip when ``hflip`` is true.

    Geometric transforms fill uncovered pixels with black (0), like the pad in :func:`resize`.
    """

    rotation_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    hflip: bool = False
    hflip_p: float = 0.5

    _N_DRAWS: ClassVar[int] = 7  # random numbers consumed per call, enabled or not

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.scale)
        object.__setattr__(self, "scale", (low, high))
        if not 0 < low <= high:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if not 0 <= self.rotation_deg <= 180:
            raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}")
        for name in ("translate", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not 0 <= self.hflip_p <= 1:
            raise ValueError(f"hflip_p must be in [0, 1], got {self.hflip_p}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """The identity: no augmentation (evaluation, or training without augmentation)."""
        return cls()

    @property
    def enabled(self) -> bool:
        """True when :func:`augment` can change an image."""
        return self.geometric or bool(self.brightness or self.contrast) or self._may_flip

    @property
    def geometric(self) -> bool:
        return bool(self.rotation_deg or self.translate or self.scale != (1.0, 1.0))

    @property
    def _may_flip(self) -> bool:
        return self.hflip and self.hflip_p > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentConfig:
        """Build from :meth:`to_dict` output; unknown keys are errors, missing keys default."""
        kwargs = _checked_kwargs(cls, d)
        if "scale" in kwargs:
            kwargs["scale"] = tuple(kwargs["scale"])
        return cls(**kwargs)


# Augmentation presets for chest films: small rotations, zooms and shifts, mild intensity
# changes, and never a flip (see AugmentConfig.hflip).
AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "cxr-mild": AugmentConfig(
        rotation_deg=10.0, scale=(0.9, 1.1), translate=0.05, brightness=0.1, contrast=0.1
    ),
    "cxr-strong": AugmentConfig(
        rotation_deg=15.0, scale=(0.85, 1.15), translate=0.08, brightness=0.2, contrast=0.2
    ),
}


def zoom_range(scale: float) -> tuple[float, float]:
    """A ``scale`` setting ``s`` as AugmentConfig's zoom range ``(1 - s, 1 + s)``; 0 = off."""
    if not 0 <= scale < 1:
        raise ValueError(f"scale must be in [0, 1), got {scale}")
    return (1.0 - scale, 1.0 + scale)


def augment_config(preset: str = "none", **fields_set: Any) -> AugmentConfig:
    """A preset's AugmentConfig with individual fields put over it.

    Precedence: a field given here with a value other than AugmentConfig's default (0, a
    ``(1, 1)`` scale, no flip) wins over the preset's; a default value means "not set" and
    leaves the preset's. So ``augment=cxr-mild rotation_deg=5`` rotates by up to 5 degrees with
    the rest of cxr-mild; to switch one transform off, use preset "none" and set the others.
    """
    if preset not in AUGMENT_PRESETS:
        names = list(AUGMENT_PRESETS)
        raise ValueError(f"unknown augmentation preset {preset!r}; presets: {names}")
    identity = AugmentConfig()
    chosen = {}
    for name, value in fields_set.items():
        if name == "scale":
            value = tuple(float(v) for v in value)
        if value != getattr(identity, name):
            chosen[name] = value
    return dataclasses.replace(AUGMENT_PRESETS[preset], **chosen)


def augment(img: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly transform a ``(H, W)`` or ``(1, H, W)`` float image in ``[0, 1]``.

    Deterministic for a given generator state: every call draws the same number of random
    values from ``generator`` (whatever is enabled), in a fixed order, so the output depends
    only on the generator's seed/state and ``cfg``. When ``cfg.enabled`` is false the input is
    returned unchanged (same object, no copy). Never flips unless ``cfg.hflip`` is true.
    """
    if not cfg.enabled:
        return img
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[0] != 1):
        raise ValueError(f"expected a (H, W) or (1, H, W) image, got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"expected a float image in [0, 1], got dtype {img.dtype}")
    # Imported here: torchvision costs ~3 s to import and only training augmentation needs it.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    u = torch.rand(AugmentConfig._N_DRAWS, generator=generator, device=generator.device).tolist()
    x = img if img.ndim == 3 else img[None]
    height, width = x.shape[-2:]
    if cfg.geometric:
        x = TF.affine(
            x,
            angle=_between(u[0], -cfg.rotation_deg, cfg.rotation_deg),
            translate=[
                _between(u[1], -cfg.translate, cfg.translate) * width,
                _between(u[2], -cfg.translate, cfg.translate) * height,
            ],
            scale=_between(u[3], *cfg.scale),
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=0.0,
        )
    if cfg.brightness:
        x = TF.adjust_brightness(x, _between(u[4], 1 - cfg.brightness, 1 + cfg.brightness))
    if cfg.contrast:
        x = TF.adjust_contrast(x, _between(u[5], 1 - cfg.contrast, 1 + cfg.contrast))
    if cfg._may_flip and u[6] < cfg.hflip_p:
        x = TF.horizontal_flip(x)
    x = x.clamp(0.0, 1.0)
    return x if img.ndim == 3 else x[0]


def _between(u: float, low: float, high: float) -> float:
    return low + (high - low) * u


def augment_draws(cfg: AugmentConfig, seeds: Sequence[int]) -> torch.Tensor:
    """``[B, 7]`` float64: the random values :func:`augment` draws for each seed's generator.

    Row ``i`` is what ``augment(img, cfg, torch.Generator().manual_seed(seeds[i]))`` uses, so
    :func:`augment_batch` of these draws transforms each film as :func:`augment` would.
    """
    rows = [
        torch.rand(AugmentConfig._N_DRAWS, generator=torch.Generator().manual_seed(int(s)))
        for s in seeds
    ]
    if not rows:
        return torch.zeros((0, AugmentConfig._N_DRAWS), dtype=torch.float64)
    return torch.stack(rows).double()


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, draws: torch.Tensor) -> torch.Tensor:
    """Batched :func:`augment`: ``(B, 1, H, W)`` float in ``[0, 1]``, one row of
    :func:`augment_draws` per film, on the batch's device (e.g. the GPU after transfer).

    The same steps as torchvision's ``affine`` (inverse matrix, ``affine_grid``, bilinear
    ``grid_sample`` with a mask channel for the black fill), brightness, contrast, flip and
    clamp, with each film's parameters drawn exactly as :func:`augment` draws them. On the CPU
    it agrees with :func:`augment` to float rounding (tests/data/test_transforms.py).
    """
    if not cfg.enabled:
        return images
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) images, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype}")
    if draws.shape != (images.shape[0], AugmentConfig._N_DRAWS):
        raise ValueError(f"expected draws of shape ({images.shape[0]}, 7), got {tuple(draws)}")
    u = draws.tolist()
    x = images
    if cfg.geometric:
        x = _affine_batch(x, [_inverse_affine(row, cfg, *x.shape[-2:]) for row in u])
    factors = x.new_tensor  # per-film factors as (B, 1, 1, 1) tensors on the batch's device
    if cfg.brightness:
        low, high = 1 - cfg.brightness, 1 + cfg.brightness
        ratio = factors([_between(row[4], low, high) for row in u]).view(-1, 1, 1, 1)
        x = x.mul(ratio).clamp_(0.0, 1.0)
    if cfg.contrast:
        low, high = 1 - cfg.contrast, 1 + cfg.contrast
        ratios = [_between(row[5], low, high) for row in u]
        ratio = factors(ratios).view(-1, 1, 1, 1)
        rest = factors([1.0 - r for r in ratios]).view(-1, 1, 1, 1)
        mean = x.mean(dim=(-3, -2, -1), keepdim=True)
        x = x.mul(ratio).add_(mean.mul(rest)).clamp_(0.0, 1.0)
    if cfg._may_flip:
        flip = torch.tensor([row[6] < cfg.hflip_p for row in u], device=x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x.clamp(0.0, 1.0)


def _inverse_affine(u: Sequence[float], cfg: AugmentConfig, height: int, width: int) -> list[float]:
    """torchvision's inverse affine matrix (centre at the image centre, no shear) for one
    film's draws: what ``TF.affine`` in :func:`augment` samples the input with."""
    rot = math.radians(_between(u[0], -cfg.rotation_deg, cfg.rotation_deg))
    tx = _between(u[1], -cfg.translate, cfg.translate) * width
    ty = _between(u[2], -cfg.translate, cfg.translate) * height
    scale = _between(u[3], *cfg.scale)
    # torchvision's terms with shear 0 (cos(0) = 1, tan(0) = 0), in the same order.
    a, b = math.cos(rot), -0.0 - math.sin(rot)
    c, d = math.sin(rot), 0.0 + math.cos(rot)
    m = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    m[2] += m[0] * (-0.0 - tx) + m[1] * (-0.0 - ty)
    m[5] += m[3] * (-0.0 - tx) + m[4] * (-0.0 - ty)
    return m


def _affine_batch(x: torch.Tensor, matrices: Sequence[Sequence[float]]) -> torch.Tensor:
    """torchvision's ``_affine_grid`` + ``_apply_grid_transform`` (bilinear, fill 0) with one
    matrix per film."""
    batch, _, height, width = x.shape
    theta = torch.tensor(matrices, dtype=x.dtype, device=x.device).view(batch, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=x.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width))
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height).unsqueeze_(-1)
    base[..., 1].copy_(ys)
    base[..., 2].fill_(1)
    half = torch.tensor([0.5 * width, 0.5 * height], dtype=x.dtype, device=x.device)
    rescaled = theta.transpose(1, 2).div_(half)
    grid = base.view(1, height * width, 3).expand(batch, -1, -1).bmm(rescaled)
    grid = grid.view(batch, height, width, 2)
    mask = torch.ones((batch, 1, height, width), dtype=x.dtype, device=x.device)
    sampled = torch.nn.functional.grid_sample(
        torch.cat((x, mask), dim=1), grid, mode="bilinear", padding_mode="zeros",
        align_corners=False,
    )  # fmt: skip
    image, mask = torch.tensor_split(sampled, indices=(-1,), dim=-3)
    # (image - fill) * mask + fill with fill 0: the mask darkens what came from outside.
    return image.mul_(mask)
