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
    equalize,
    from_uint8,
    to_model_input,
)

log = logging.getLogger(__name__)


class CXRDataset(Dataset):
    """Items are dicts: image (3, S, S) float32 normalised, target [K], mask [K], index.

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
        # Equalised before augmentation: it is part of the model's preprocessing, which
        # evaluation and labelling apply to the unaugmented film.
        image = torch.from_numpy(equalize(from_uint8(pixels), self.preprocessing.equalize))
        if self.augmentation is not None and self.augmentation.enabled:
            # Seeded per (seed, row) so an epoch's augmentations do not depend on worker order.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + row)
            image = augment(image, self.augmentation, generator)
        return {
            "image": to_model_input(image, self.preprocessing),
            "target": torch.from_numpy(self.targets[row]),
            "mask": torch.from_numpy(self.mask[row]),
            "index": torch.tensor(row),
        }


def collate_skipping(
    batch: list[dict[str, torch.Tensor] | None],
) -> dict[str, torch.Tensor] | None:
    """default_collate, minus the items a skipping dataset returned as None.

    A batch made only of unreadable images becomes None: loops skip it.
    """
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None
