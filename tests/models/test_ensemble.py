from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlabel.data.formats import load_table
from cxrlabel.data.images import read_image
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.factory import create_model
from cxrlabel.models.thresholds import Thresholds

LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion")


def _checkpoint(path: Path, seed: int, size: int = 64, thresholds: Thresholds | None = None):
    torch.manual_seed(seed)
    model = create_model("tiny", "linear", LABELS, weights="none", size=size)
    extra_meta = {} if thresholds is None else {"thresholds": thresholds.to_dict()}
    meta = save_checkpoint(path, model, config={"name": f"run{seed}"}, epoch=1, step=2)
    if extra_meta:
        import json

        data = json.loads(meta.read_text())
        data.update(extra_meta)
        meta.write_text(json.dumps(data))
    return path


def test_ensemble_averages_members_with_their_own_preprocessing(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    a = _checkpoint(tmp_path / "a.safetensors", seed=1, size=64)
    b = _checkpoint(tmp_path / "b.safetensors", seed=2, size=48)
    table = load_table(tiny_dataset / "train.csv")
    images = [read_image(p) for p in table.image_paths()[:5]]
    single_a = load_ensemble([a], device="cpu")
    single_b = load_ensemble([b], device="cpu")
    both = load_ensemble([a, b], device="cpu")
    assert single_a.kind == "single model" and both.kind == "ensemble of 2 checkpoints"
    pa, pb, pab = (e.predict_images(images) for e in (single_a, single_b, both))
    assert pab.shape == (5, len(LABELS))
    assert not np.allclose(pa, pb)
    np.testing.assert_allclose(pab, (pa + pb) / 2, atol=1e-6)

    pred = both.predict_table(table, batch_size=4)
    assert len(pred) == len(table.frame)
    np.testing.assert_allclose(pred.y_score[:5], pab, atol=1e-5)
    assert pred.kind == "ensemble of 2 checkpoints" and pred.labels == LABELS
    info = both.model_info()
    assert [m["preprocessing"]["size"] for m in info["members"]] == [64, 48]


def test_thresholds_from_metadata_and_mismatched_labels(tmp_path: Path) -> None:
    t1 = Thresholds(LABELS, (0.2, 0.4, 0.6), "youden")
    t2 = Thresholds(LABELS, (0.4, 0.6, 0.8), "youden")
    a = _checkpoint(tmp_path / "a.safetensors", seed=1, thresholds=t1)
    b = _checkpoint(tmp_path / "b.safetensors", seed=2, thresholds=t2)
    assert load_ensemble([a], device="cpu").thresholds == t1
    mixed = load_ensemble([a, b], device="cpu").thresholds
    np.testing.assert_allclose(mixed.values, (0.3, 0.5, 0.7))
    plain = _checkpoint(tmp_path / "plain.safetensors", seed=3)
    assert load_ensemble([plain], device="cpu").thresholds.values == (0.5, 0.5, 0.5)

    torch.manual_seed(0)
    other = create_model("tiny", "linear", ("Edema",), weights="none", size=64)
    save_checkpoint(tmp_path / "other.safetensors", other, config={}, epoch=0, step=0)
    with pytest.raises(ValueError, match="must share their labels"):
        load_ensemble([a, tmp_path / "other.safetensors"], device="cpu")
