"""Frozen-feature approach, "extract once": the feature cache and stale-cache refusal (heads and
the sweep: test_heads.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import save_file

from cxrlabel.data.formats import load_table
from cxrlabel.models.factory import TINY_PREPROCESSING, TinyCNN
from cxrlabel.training.features import (
    FEATURES_FILE,
    FEATURES_META,
    PARTS_DIR,
    StaleFeatureCacheError,
    extract_features,
    feature_fingerprint,
    load_features,
    part_path,
    read_part,
)

# Module-wide: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def _prep(size: int):
    return replace(TINY_PREPROCESSING, size=size)


@pytest.fixture(scope="module")
def train_table(tiny_dataset: Path):
    return load_table(tiny_dataset / "train.csv")


@pytest.fixture(scope="module")
def built(train_table, tmp_path_factory: pytest.TempPathFactory):
    """One extraction at 32 px shared by the cache tests (they only read or copy it)."""
    cache = tmp_path_factory.mktemp("features") / "tiny32"
    return cache, extract_features(train_table, "tiny", "none", _prep(32), cache, progress=False)


def test_extraction_writes_cache(built, train_table):
    cache, feats = built
    assert (cache / FEATURES_FILE).is_file() and (cache / FEATURES_META).is_file()
    assert not feats.reused
    assert feats.features.dtype == np.float32
    assert feats.features.shape == (len(train_table), TinyCNN().num_features)
    assert feats.rows.tolist() == list(range(len(train_table)))
    assert feats.meta["preprocessing"]["size"] == 32


def test_second_call_reuses_cache(built, train_table, monkeypatch: pytest.MonkeyPatch):
    cache, first = built
    mtime = (cache / FEATURES_FILE).stat().st_mtime_ns

    def no_backbone(*_args, **_kwargs):
        raise AssertionError("a matching cache must be loaded, not recomputed")

    monkeypatch.setattr("cxrlabel.training.features.create_backbone", no_backbone)
    again = extract_features(train_table, "tiny", "none", _prep(32), cache, progress=False)
    assert again.reused
    np.testing.assert_array_equal(again.features, first.features)
    assert (cache / FEATURES_FILE).stat().st_mtime_ns == mtime


def _copy_cache(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (FEATURES_FILE, FEATURES_META):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_changed_size_is_refused_then_rebuilt_on_request(built, train_table, tmp_path):
    cache = _copy_cache(built[0], tmp_path / "c")
    with pytest.raises(StaleFeatureCacheError, match="size 32"):
        extract_features(train_table, "tiny", "none", _prep(48), cache, progress=False)
    rebuilt = extract_features(
        train_table, "tiny", "none", _prep(48), cache, progress=False, overwrite=True
    )
    assert not rebuilt.reused and rebuilt.meta["preprocessing"]["size"] == 48
    assert load_features(cache, rebuilt.meta["fingerprint"]).reused


def test_changed_weights_are_refused(built, train_table, tmp_path):
    cache = _copy_cache(built[0], tmp_path / "c")
    weights = tmp_path / "tiny.safetensors"
    save_file(TinyCNN().state_dict(), str(weights))
    with pytest.raises(StaleFeatureCacheError, match="fingerprint"):
        extract_features(train_table, "tiny", weights, _prep(32), cache, progress=False)


def test_changed_label_value_is_refused(built, train_table, tmp_path):
    cache = _copy_cache(built[0], tmp_path / "c")
    frame = train_table.frame.copy()
    frame.loc[0, "Edema"] = 1.0 if frame.loc[0, "Edema"] != 1.0 else 0.0
    changed = replace(train_table, frame=frame)
    with pytest.raises(StaleFeatureCacheError):
        extract_features(changed, "tiny", "none", _prep(32), cache, progress=False)


def test_bad_image_is_skipped_and_reported(train_table, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    extra = train_table.frame.iloc[[0]].copy()
    extra["Path"] = str(bad)  # absolute: root / absolute path is the absolute path
    frame = pd.concat([train_table.frame.iloc[:3], extra], ignore_index=True)
    table = replace(train_table, frame=frame)
    feats = extract_features(table, "tiny", "none", _prep(32), tmp_path / "c", progress=False)
    assert feats.rows.tolist() == [0, 1, 2]
    assert len(feats.skipped) == 1 and "broken.jpg" in feats.skipped[0].path
    assert load_features(tmp_path / "c").skipped == feats.skipped


class Stopped(RuntimeError):
    """Raised from on_batch to stop an extraction as a kill would."""


def _stop_after(batch: int, seen: list[int]):
    def on_batch(b: int) -> None:
        seen.append(b)
        if b == batch:
            raise Stopped(f"stopped after batch {b}")

    return on_batch


def _cache_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}


def test_stopped_extraction_resumes_from_its_journal(train_table, tmp_path):
    whole = extract_features(
        train_table, "tiny", "none", _prep(32), tmp_path / "whole", batch_size=4, progress=False
    )
    cache, seen = tmp_path / "c", []
    with pytest.raises(Stopped):
        extract_features(train_table, "tiny", "none", _prep(32), cache, batch_size=4,
                         progress=False, on_batch=_stop_after(1, seen))  # fmt: skip
    assert not (cache / FEATURES_META).exists()
    assert sorted(p.name for p in (cache / PARTS_DIR).iterdir()) == [
        "batch-000000.safetensors", "batch-000001.safetensors"]  # fmt: skip
    seen.clear()
    again = extract_features(train_table, "tiny", "none", _prep(32), cache, batch_size=4,
                             progress=False, on_batch=seen.append)  # fmt: skip
    batches = -(-len(train_table) // 4)
    assert seen == list(range(2, batches))  # the journaled batches were not recomputed
    assert not again.reused and again.rows.tolist() == whole.rows.tolist()
    assert _cache_bytes(cache) == _cache_bytes(tmp_path / "whole")  # no parts folder left


def test_journal_of_another_batch_size_is_recomputed(train_table, tmp_path):
    whole = tmp_path / "whole"
    extract_features(train_table, "tiny", "none", _prep(32), whole, batch_size=4, progress=False)
    cache, seen = tmp_path / "c", []
    with pytest.raises(Stopped):
        extract_features(train_table, "tiny", "none", _prep(32), cache, batch_size=3,
                         progress=False, on_batch=_stop_after(1, seen))  # fmt: skip
    seen.clear()
    extract_features(train_table, "tiny", "none", _prep(32), cache, batch_size=4,
                     progress=False, on_batch=seen.append)  # fmt: skip
    assert seen == list(range(-(-len(train_table) // 4)))  # batch b covers other rows now
    assert _cache_bytes(cache) == _cache_bytes(whole)


def test_merge_refuses_a_part_of_another_extraction(train_table, tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(Stopped):
        extract_features(train_table, "tiny", "none", _prep(32), cache, batch_size=4,
                         progress=False, on_batch=_stop_after(0, []))  # fmt: skip
    part = part_path(cache / PARTS_DIR, 0)
    key = feature_fingerprint(train_table, "tiny", "none", _prep(32))
    tag = {"fingerprint": key, "batch_size": "4", "batch": "0"}
    assert read_part(part, tag).rows.tolist() == [0, 1, 2, 3]
    for other in ({**tag, "fingerprint": "other"}, {**tag, "batch_size": "3"}):
        with pytest.raises(RuntimeError, match=r"batch-000000.safetensors: feature part of batch"):
            read_part(part, other)
