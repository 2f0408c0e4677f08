"""Frozen-feature approach: feature cache, stale-cache refusal, head training, the sweep."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from cxrlabel.data.formats import load_table
from cxrlabel.models.factory import TINY_PREPROCESSING, TinyCNN, masked_bce_loss
from cxrlabel.training.features import (
    FEATURES_FILE,
    FEATURES_META,
    StaleFeatureCacheError,
    extract_features,
    format_sweep_table,
    load_features,
    run_extract,
    run_train_head,
    sweep,
    train_head,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads'
    spin-waits make them many times slower; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def test_train_head_reduces_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    mask = rng.random(y.shape) > 0.2
    losses: list[float] = []
    head = train_head(
        x, y, mask, "mlp3", epochs=15, lr=3e-3, on_epoch=lambda _e, loss: losses.append(loss)
    )
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]
    assert not head.training


def test_train_head_is_seeded_and_leaves_global_rng_alone():
    x = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    y = (x[:, :2] > 0).astype(np.float32)
    mask = np.ones_like(y, dtype=bool)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = train_head(x, y, mask, "mlp3_dropout", epochs=2, seed=5)
    assert torch.rand(1) == expected
    # Dropout draws from the RNG too: a different global state must not change the result.
    torch.manual_seed(999)
    b = train_head(x, y, mask, "mlp3_dropout", epochs=2, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_masked_loss_ignores_masked_entries():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.randint(0, 2, (4, 3)).float()
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    flipped = torch.where(mask, targets, 1 - targets)
    loss = masked_bce_loss(logits, targets, mask)
    torch.testing.assert_close(loss, masked_bce_loss(logits, flipped, mask))
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0)


def test_sweep_rows_and_table(tiny_dataset: Path, tmp_path):
    train = load_table(tiny_dataset / "train.csv")
    valid = load_table(tiny_dataset / "valid.csv")
    kwargs = dict(weights="none", size_for={"tiny": 32}, cache_dir=tmp_path, epochs=3)
    df = sweep(train, valid, ["tiny"], progress=False, **kwargs)
    assert df["Model"].tolist() == ["Tiny_1", "Tiny_3", "Tiny_3_D"]
    for column in ("Acc", "Prec", "Recall", "F Score", "AUROC"):
        values = df[column].to_numpy(dtype=float)
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values), column
    assert all(0.0 <= v <= 1.0 for v in df["Acc"])
    caches = sorted(p.name for p in tmp_path.iterdir())
    assert len(caches) == 2 and {c.split("-")[0] for c in caches} == {"train", "valid"}
    # A second sweep with the same settings reuses both caches (no new directories).
    sweep(train, valid, ["tiny"], heads=["linear"], progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == caches

    markdown = format_sweep_table(df)
    lines = markdown.splitlines()
    assert lines[0] == "| Model | Acc | Prec | Recall | F Score | AUROC |"
    assert lines[2].startswith("| Tiny_1 | ") and len(lines) == 5


def test_run_extract_then_train_head(tiny_dataset: Path, tmp_path):
    csv = tiny_dataset / "train.csv"
    feats = run_extract(
        csv, tmp_path / "f", backbone="tiny", weights="none", size=32, progress=False
    )
    out = run_train_head(csv, tmp_path / "f", tmp_path / "head.safetensors", head="mlp3", epochs=2)
    assert out.is_file() and out.with_suffix(".safetensors.json").is_file()
    assert len(feats) > 0
