"""Torch dataset over a LabelTable: pixels from the preprocessing cache or straight from files.

Label parsing lives in `labels`/`formats` (pure); this module only joins labels to pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from cxrlabel.data.cache import ImageCache, Skipped, load_resized
from cxrlabel.data.images import ImageError
from cxrlabel.data.labels import LabelPolicy, LabelTable, UncertaintyPolicy, resolve_labels
from cxrlabel.data.transforms import (
    AugmentConfig,
    Preprocessing,
    augment,
    augment_batch,
    augment_draws,
    equalize,
    from_uint8,
    to_model_input,
    to_model_input_batch,
    to_uint8,
)

log = logging.getLogger(__name__)


def augment_seed(seed: int, row: int) -> int:
    """The seed of one film's augmentation: a function of (dataset seed, table row) only, so
    an epoch's augmentations depend neither on worker order nor on where they are computed."""
    return seed * 1_000_003 + row


class CXRDataset(Dataset):
    """Items are dicts: image (3, S, S) float32 normalised, target [K], mask [K], index.

    With `uint8` the image is the cached film itself, uint8 (1, S, S) (equalised, when the
    preprocessing says so: equalisation is numpy/OpenCV and stays here, on the CPU, and is
    exact on the uint8 levels); `model_input_batch` then finishes a batch of them on whatever
    device it was moved to: float conversion, augmentation and normalisation, batched. Moving
    uint8 moves a quarter of the bytes and takes the per-image float work off the CPU.

    on_error='skip' turns an unreadable image into None (dropped by `collate_skipping`) and
    records it in `skipped`; 'raise' lets the ImageError through. With a cache, images that
    failed while preparing it are left out up front and listed in `skipped`.

    `policy` is one policy or a per-label mapping (`LabelPolicy`). With `smooth_labels`, LSR
    policies give soft targets drawn once, here, from `seed` (so they stay the same however
    `seed` is changed later for augmentation); without it (validation) LSR labels get their
    hard policy's 0/1 targets.
    """

    def __init__(
        self,
        table: LabelTable,
        labels: Sequence[str] | str,
        preprocessing: Preprocessing,
        *,
        policy: LabelPolicy | UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
        cache: ImageCache | None = None,
        augmentation: AugmentConfig | None = None,
        on_error: str = "raise",
        seed: int = 0,
        smooth_labels: bool = True,
        uint8: bool = False,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.labels = resolve_labels(labels)
        self.preprocessing = preprocessing
        self.paths = table.image_paths()
        self.targets, self.mask = table.targets(
            self.labels, policy, seed=seed if smooth_labels else None
        )
        # Raw 1/0/-1/NaN values [N, K], for samplers that pick by the label itself.
        self.values = table.values(self.labels)
        self.augmentation = augmentation
        self.on_error = on_error
        self.seed = seed
        self.uint8 = uint8
        self.skipped: list[Skipped] = []
        self.cache = cache
        self.rows = np.arange(len(self.paths))
        if cache is not None:
            self._check_cache(cache)
            self.rows = self.rows[cache.ok]
            self.skipped = list(cache.skipped)

    def _check_cache(self, cache: ImageCache) -> None:
        if cache.geometry != self.preprocessing.geometry:
            raise ValueError(
                f"{cache.dir}: cache holds {cache.geometry}, the model needs "
                f"{self.preprocessing.geometry}; prepare a matching cache"
            )
        if cache.paths != [str(p) for p in self.paths]:
            raise ValueError(f"{cache.dir}: cache was prepared for a different image list")

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, row: int) -> np.ndarray:
        """uint8 (S, S) image for a table row: from the cache, or decoded now."""
        if self.cache is not None:
            return self.cache[row]
        return load_resized(self.paths[row], self.preprocessing.geometry)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        row = int(self.rows[i])
        try:
            pixels = self.pixels(row)
        except ImageError as exc:
            if self.on_error == "raise":
                raise
            log.warning("skipping: %s", exc)
            self.skipped.append(Skipped(str(exc.path), exc.reason))
            return None
        return {
            "image": self.uint8_image(pixels) if self.uint8 else self.float_image(pixels, row),
            "target": torch.from_numpy(self.targets[row]),
            "mask": torch.from_numpy(self.mask[row]),
            "index": torch.tensor(row),
        }

    def float_image(self, pixels: np.ndarray, row: int) -> torch.Tensor:
        """The normalised float32 (3, S, S) model input of a cached uint8 film."""
        # Equalised before augmentation: it is part of the model's preprocessing, which
        # evaluation and labelling apply to the unaugmented film.
        image = torch.from_numpy(equalize(from_uint8(pixels), self.preprocessing.equalize))
        if self.augmentation is not None and self.augmentation.enabled:
            # Seeded per (seed, row) so an epoch's augmentations do not depend on worker order.
            generator = torch.Generator().manual_seed(augment_seed(self.seed, row))
            image = augment(image, self.augmentation, generator)
        return to_model_input(image, self.preprocessing)

    def uint8_image(self, pixels: np.ndarray) -> torch.Tensor:
        """The uint8 (1, S, S) film, equalised when the preprocessing says so."""
        if self.preprocessing.equalize != "none":
            # equalize works on these very uint8 levels, so the round trip is exact.
            pixels = to_uint8(equalize(from_uint8(pixels), self.preprocessing.equalize))
        # A copy: the cache hands out read-only views of its memory map.
        return torch.from_numpy(np.array(pixels, dtype=np.uint8))[None]

    def model_input_batch(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, S, S) films (items' "image" with `uint8`) and their "index" rows ->
        normalised float32 (B, 3, S, S), on the films' device; each film augmented as
        `__getitem__` would augment it on the float path (same per-row seeds)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 films, got dtype {images.dtype}")
        # The same float32 division as from_uint8.
        x = images.float().div_(255.0)
        if self.augmentation is not None and self.augmentation.enabled:
            seeds = [augment_seed(self.seed, int(r)) for r in rows.tolist()]
            x = augment_batch(x, self.augmentation, augment_draws(self.augmentation, seeds))
        return to_model_input_batch(x, self.preprocessing)


def collate_skipping(
    batch: list[dict[str, torch.Tensor] | None],
) -> dict[str, torch.Tensor] | None:
    """default_collate, minus the items a skipping dataset returned as None.

    A batch made only of unreadable images becomes None: loops skip it.
    """
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None
