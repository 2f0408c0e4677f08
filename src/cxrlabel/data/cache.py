"""Preprocessing cache: decode and resize a dataset once, then train from a memory map.

Decoding a JPEG (let alone a JPEG 2000 DICOM) and resizing it costs far more than the network
step at small sizes, and it is the same work every epoch. `prepare_cache` does it once and
stores every image as uint8 in one memory-mapped array:

    <cache_dir>/images.u8     raw uint8, shape (N, size, size), row i = table row i
    <cache_dir>/index.csv     row, Path, ok, reason (bad images: ok=0 and why; pixels zero)
    <cache_dir>/meta.json     the fingerprint and shape; written last, so it marks completeness

The fingerprint covers the cache format version, the resize geometry (`ResizeGeometry`: size,
pad or crop, interpolation; stored under "settings" in meta.json), and each source file's path,
byte size and modification time. A cache whose fingerprint differs is rebuilt, never silently
reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlabel.csvcells import frame_csv, restore_frame
from cxrlabel.data.images import ImageError, read_image
from cxrlabel.data.transforms import ResizeGeometry, to_uint8
from cxrlabel.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1
IMAGES_FILE, INDEX_FILE, META_FILE = "images.u8", "index.csv", "meta.json"


@dataclass(frozen=True)
class Skipped:
    """An image left out of a batch job, and why."""

    path: str
    reason: str


def load_resized(path: Path, geometry: ResizeGeometry) -> np.ndarray:
    """Decode one image and resize it to the cache's uint8 form.

    Both the cache and direct reading go through this one function, so a cached image is
    exactly the image direct decoding would give.
    """
    return to_uint8(geometry.apply(read_image(path)))


def fingerprint(paths: Sequence[Path], geometry: ResizeGeometry) -> str:
    """A hash of the geometry and every source file's identity (path, size, mtime)."""
    digest = hashlib.sha256()
    # Same bytes as before ResizeGeometry replaced ResizeSettings (same field names and order).
    digest.update(json.dumps({"version": CACHE_VERSION, **geometry.to_dict()}).encode())
    for path in paths:
        try:
            st = os.stat(path)
            ident = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n"
        except OSError:
            ident = f"{path}\0missing\n"
        digest.update(ident.encode())
    return digest.hexdigest()


_Result = tuple[int, np.ndarray | None, ImageError | None]


def _load_one(args: tuple[int, str, ResizeGeometry]) -> _Result:
    row, path, geometry = args
    try:
        return row, load_resized(Path(path), geometry), None
    except ImageError as exc:
        return row, None, exc


class ImageCache:
    """Read side of a prepared cache: `cache[i]` is table row i as uint8 (size, size)."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)
        meta_path = self.dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.dir}: no complete cache here (missing {META_FILE})")
        self.meta = json.loads(meta_path.read_text())
        self.geometry = ResizeGeometry(**self.meta["settings"])
        n, size = self.meta["count"], self.geometry.size
        self.images = np.memmap(
            self.dir / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(n, size, size)
        )
        index = restore_frame(
            pd.read_csv(
                self.dir / INDEX_FILE, dtype={"Path": str, "reason": str}, keep_default_na=False
            )
        )
        self.paths: list[str] = index["Path"].tolist()
        self.ok = index["ok"].to_numpy(dtype=bool)
        self.skipped = [
            Skipped(p, r)
            for p, r, ok in zip(index["Path"], index["reason"], self.ok, strict=True)
            if not ok
        ]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> np.ndarray:
        return np.asarray(self.images[row])


def prepare_cache(
    paths: Sequence[Path],
    cache_dir: Path,
    geometry: ResizeGeometry,
    *,
    on_error: str = "skip",
    workers: int | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> ImageCache:
    """Build (or reuse, when its fingerprint matches) the cache for these image paths.

    on_error='skip' records a bad image in the index and goes on; 'raise' stops at the first.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    cache_dir = Path(cache_dir)
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"{cache_dir}: no images to cache")
    key = fingerprint(paths, geometry)
    try:
        existing = ImageCache(cache_dir)
        if existing.meta["fingerprint"] == key:
            log.info("%s: cache is up to date (%d images)", cache_dir, len(existing))
            return existing
        log.info("%s: sources or resize geometry changed; rebuilding", cache_dir)
    except (FileNotFoundError, KeyError, ValueError):
        pass

    cache_dir.mkdir(parents=True, exist_ok=True)
    # The old meta goes first: a crash mid-build must not leave a cache that looks complete.
    (cache_dir / META_FILE).unlink(missing_ok=True)
    size, n = geometry.size, len(paths)
    ok = np.zeros(n, dtype=bool)
    reasons = [""] * n
    with atomic_path(cache_dir / IMAGES_FILE) as tmp:
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, size, size))
        jobs = [(i, str(p), geometry) for i, p in enumerate(paths)]
        results = _run(jobs, workers)
        for row, pixels, error in progress(results) if progress else results:
            if error is not None:
                if on_error == "raise":
                    raise error
                log.warning("skipping: %s", error)
                reasons[row] = error.reason
                continue
            array[row] = pixels
            ok[row] = True
        array.flush()
        del array
    index = pd.DataFrame(
        {"row": range(n), "Path": [str(p) for p in paths], "ok": ok.astype(int), "reason": reasons}
    )
    atomic_write_text(cache_dir / INDEX_FILE, frame_csv(index, index=False))
    meta = {
        "version": CACHE_VERSION,
        "fingerprint": key,
        "count": n,
        "settings": geometry.to_dict(),
        "skipped": int((~ok).sum()),
    }
    atomic_write_text(cache_dir / META_FILE, json.dumps(meta, indent=2))
    log.info("%s: cached %d images, skipped %d", cache_dir, int(ok.sum()), int((~ok).sum()))
    return ImageCache(cache_dir)


def _run(jobs: list, workers: int | None) -> Iterable[_Result]:
    """Decode in worker processes when there is enough work to pay for starting them."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers <= 1 or len(jobs) < 64:
        return map(_load_one, jobs)
    pool = ProcessPoolExecutor(max_workers=workers)
    return _drain(pool, jobs)


def _drain(pool: ProcessPoolExecutor, jobs: list) -> Iterable[_Result]:
    with pool:
        yield from pool.map(_load_one, jobs, chunksize=16)
