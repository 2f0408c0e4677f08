import os

import numpy as np
import pytest
from PIL import Image

from cxrlabel.data.cache import (
    CACHE_VERSION,
    META_FILE,
    ImageCache,
    fingerprint,
    load_resized,
    prepare_cache,
)
from cxrlabel.data.images import ImageError
from cxrlabel.data.transforms import Preprocessing, ResizeGeometry
from tests.helpers import SHARED_DATA

SETTINGS = ResizeGeometry(size=32, resize_mode="pad", interpolation="bilinear")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        pixels = rng.integers(0, 256, size=(40 + 7 * i, 50), dtype=np.uint8)
        path = tmp_path / "src" / f"img{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_cache_equals_direct_decoding(tmp_path, images):
    cache = prepare_cache(images, tmp_path / "cache", SETTINGS, workers=1)
    assert len(cache) == 5 and not cache.skipped
    for row, path in enumerate(images):
        np.testing.assert_array_equal(cache[row], load_resized(path, SETTINGS))
    assert cache[0].dtype == np.uint8 and cache[0].shape == (32, 32)


def test_cache_reused_then_rebuilt_on_change(tmp_path, images):
    out = tmp_path / "cache"
    first = prepare_cache(images, out, SETTINGS, workers=1)
    stamp = os.stat(out / META_FILE).st_mtime_ns
    again = prepare_cache(images, out, SETTINGS, workers=1)
    assert again.meta == first.meta and os.stat(out / META_FILE).st_mtime_ns == stamp

    # A changed source file changes the fingerprint, and the new pixels land in the cache.
    Image.fromarray(np.full((40, 50), 200, dtype=np.uint8)).save(images[0])
    os.utime(images[0], ns=(1, 1))
    rebuilt = prepare_cache(images, out, SETTINGS, workers=1)
    assert rebuilt.meta["fingerprint"] != first.meta["fingerprint"]
    np.testing.assert_array_equal(rebuilt[0], load_resized(images[0], SETTINGS))

    # So do other settings.
    bigger = prepare_cache(images, out, ResizeGeometry(48, "crop", "bicubic"), workers=1)
    assert bigger[0].shape == (48, 48)


def test_bad_images_are_skipped_and_reported(tmp_path, images):
    broken = tmp_path / "src" / "broken.png"
    broken.write_bytes(images[1].read_bytes()[:60])
    empty = tmp_path / "src" / "empty.jpg"
    empty.touch()
    paths = [images[0], broken, images[2], empty, tmp_path / "missing.png"]
    cache = prepare_cache(paths, tmp_path / "cache", SETTINGS, workers=1)
    assert cache.ok.tolist() == [True, False, True, False, False]
    skipped = {s.path: s.reason for s in cache.skipped}
    assert set(skipped) == {str(broken), str(empty), str(tmp_path / "missing.png")}
    assert all(skipped.values())
    # Good images around the bad ones are intact.
    np.testing.assert_array_equal(cache[2], load_resized(images[2], SETTINGS))
    # The report survives a reopen.
    assert len(ImageCache(tmp_path / "cache").skipped) == 3


def test_raise_mode_stops_at_bad_image(tmp_path, images):
    with pytest.raises(ImageError, match=r"missing\.png"):
        prepare_cache(
            [images[0], tmp_path / "missing.png"],
            tmp_path / "c",
            SETTINGS,
            on_error="raise",
            workers=1,
        )
    assert not (tmp_path / "c" / META_FILE).exists()  # no complete-looking cache left


def test_parallel_build_matches_serial(tmp_path, images):
    paths = images * 14  # enough work for the worker pool
    serial = prepare_cache(paths, tmp_path / "a", SETTINGS, workers=1)
    parallel = prepare_cache(paths, tmp_path / "b", SETTINGS, workers=2)
    np.testing.assert_array_equal(np.asarray(serial.images), np.asarray(parallel.images))


def test_real_nih_fixtures_cache(tmp_path):
    folder = SHARED_DATA / "fixtures" / "nih_320"
    if not folder.is_dir():
        pytest.skip(f"shared data absent: {folder}")
    paths = sorted(folder.glob("*.jpg"))[:4]
    cache = prepare_cache(paths, tmp_path / "c", ResizeGeometry(64), workers=1)
    for row, path in enumerate(paths):
        np.testing.assert_array_equal(cache[row], load_resized(path, ResizeGeometry(64)))


def test_geometry_keeps_caches_made_with_resize_settings_valid(images, tmp_path):
    """meta.json and the fingerprint hash the same bytes as the ResizeSettings they replaced,
    so a cache prepared before ResizeGeometry is reused, not rebuilt."""
    import hashlib
    import json

    legacy = {"size": 32, "resize_mode": "pad", "interpolation": "bilinear"}
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **legacy}).encode())
    for path in images:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    assert fingerprint(images, SETTINGS) == digest.hexdigest()
    cache = prepare_cache(images, tmp_path / "c", SETTINGS, workers=1)
    assert json.loads((tmp_path / "c" / META_FILE).read_text())["settings"] == legacy
    assert cache.geometry == SETTINGS
    prep = Preprocessing(32, (0.1, 0.2, 0.3), (0.5,) * 3, "pad", "bilinear")
    assert prep.geometry == SETTINGS  # mean and std are not part of the geometry
