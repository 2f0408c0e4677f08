from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cxrlabel.evaluation.scoring
import cxrlabel.models.ensemble
from cxrlabel.data.formats import load_table
from cxrlabel.data.images import read_image
from cxrlabel.data.transforms import Preprocessing
from cxrlabel.evaluation.scoring import predict_table
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.factory import create_model
from cxrlabel.models.thresholds import Thresholds, combine_thresholds
from tests.helpers import count_calls

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

    pred = predict_table(both, table, batch_size=4)
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


def _normalised_checkpoint(path: Path, seed: int, prep: Preprocessing) -> Path:
    """A tiny checkpoint that resizes and normalises as `prep` says."""
    torch.manual_seed(seed)
    model = create_model("tiny", "linear", LABELS, weights="none", size=prep.size)
    model.preprocessing = prep
    save_checkpoint(path, model, config={"name": f"run{seed}"}, epoch=1, step=2)
    return path


class _Counts:
    """Counts decodes (`read_image` as `decode_module` calls it), resamplings and
    normalisations while a test runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, decode_module: object) -> None:
        self._decodes = count_calls(monkeypatch, decode_module, "read_image")
        self._resamples = count_calls(monkeypatch, Image.Image, "resize")
        self._normalisations = count_calls(
            monkeypatch, cxrlabel.models.ensemble, "to_model_input_batch"
        )

    @property
    def decodes(self) -> int:
        return self._decodes.n

    @property
    def resamples(self) -> int:
        return self._resamples.n

    @property
    def normalisations(self) -> int:
        return self._normalisations.n


def test_evaluate_decodes_and_resizes_each_film_once_for_members_normalising_differently(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _normalised_checkpoint(
        tmp_path / "a.safetensors", 1, Preprocessing(48, (0.5,) * 3, (0.25,) * 3, "pad", "bicubic")
    )
    b = _normalised_checkpoint(
        tmp_path / "b.safetensors", 2, Preprocessing(48, (0.2,) * 3, (0.5,) * 3, "pad", "bicubic")
    )
    table = load_table(tiny_dataset / "valid.csv")
    films = [read_image(p) for p in table.image_paths()]
    assert all(f.shape != (48, 48) for f in films)  # each film needs one real resampling
    singles = [load_ensemble([m], device="cpu").predict_images(films) for m in (a, b)]
    both = load_ensemble([a, b], device="cpu")

    counts = _Counts(monkeypatch, cxrlabel.evaluation.scoring)
    pred = predict_table(both, table, batch_size=4)
    n = len(films)
    assert (counts.decodes, counts.resamples) == (n, n)
    batches = -(-n // 4)
    assert counts.normalisations == 2 * batches  # once per preprocessing per batch
    np.testing.assert_allclose(pred.y_score, (singles[0] + singles[1]) / 2, atol=1e-6)
    assert pred.model == both.name and pred.thresholds == both.thresholds


def test_predict_images_resizes_once_per_geometry_and_normalises_once_per_preprocessing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preps = [
        Preprocessing(48, (0.5,) * 3, (0.25,) * 3, "pad", "bilinear"),
        Preprocessing(48, (0.5,) * 3, (0.25,) * 3, "pad", "bilinear"),  # same: shares all
        Preprocessing(48, (0.1,) * 3, (0.3,) * 3, "pad", "bilinear"),  # same geometry
        Preprocessing(40, (0.5,) * 3, (0.25,) * 3, "crop", "bilinear"),  # another geometry
    ]
    paths = [
        _normalised_checkpoint(tmp_path / f"{i}.safetensors", i, p) for i, p in enumerate(preps)
    ]
    ensemble = load_ensemble(paths, device="cpu")
    films = [np.random.default_rng(i).random((70 + i, 90), dtype=np.float32) for i in range(3)]
    expected = np.mean(
        [load_ensemble([p], device="cpu").predict_images(films) for p in paths], axis=0
    )
    counts = _Counts(monkeypatch, cxrlabel.evaluation.scoring)
    probs = ensemble.predict_images(films)
    assert counts.resamples == 2 * len(films)  # two geometries
    assert counts.normalisations == 3  # three distinct preprocessings
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_combine_thresholds_averages_members_or_takes_the_first_per_label() -> None:
    t1 = Thresholds(LABELS, (0.2, 0.4, 0.6), "youden", ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7)))
    t2 = Thresholds(LABELS, (0.4, 0.6, 0.8), "youden", ((0.3, 0.5), (0.5, 0.7), (0.7, 0.9)))
    assert combine_thresholds([t1, t1], LABELS) == t1  # identical ones pass through
    mean = combine_thresholds([t1, t2], LABELS)
    np.testing.assert_allclose(mean.values, (0.3, 0.5, 0.7))
    np.testing.assert_allclose(mean.band, ((0.2, 0.4), (0.4, 0.6), (0.6, 0.8)))
    assert mean.rule == "youden" and "mean of 2 members" in mean.chosen_on
    # A band only some members have is not invented by averaging: no band at all.
    assert combine_thresholds([t1, Thresholds(LABELS, t2.values, "youden")], LABELS).band is None

    # The labeller's union: per label, the first model (frontal) that predicts it.
    lateral = Thresholds(("Edema", "Atelectasis"), (0.9, 0.1))
    union = combine_thresholds([t1, lateral], ("Atelectasis", *LABELS), how="first")
    assert union.labels == ("Atelectasis", *LABELS)
    assert union.values == (0.1, 0.2, 0.4, 0.6)
    # The lateral-only label has no band of its own: a zero-width one marks nothing uncertain.
    assert union.band == ((0.1, 0.1), *t1.band)
    assert not union.in_band(np.array([[0.1, 0.5, 0.5, 0.5]]))[0, 0]
    with pytest.raises(KeyError, match="Edema"):
        combine_thresholds([Thresholds.fixed(["Cardiomegaly"])], ["Edema"])
    with pytest.raises(ValueError, match="how"):
        combine_thresholds([t1], LABELS, how="max")


def test_ensemble_equalises_as_the_training_dataset_does(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    from cxrlabel.data.transforms import equalize, to_model_input

    torch.manual_seed(0)
    model = create_model("tiny", "linear", LABELS, weights="none", size=64, equalize="clahe")
    save_checkpoint(tmp_path / "a.safetensors", model, config={}, epoch=1, step=1)
    ensemble = load_ensemble([tmp_path / "a.safetensors"], device="cpu")
    film = read_image(sorted(tiny_dataset.rglob("*.jpg"))[0])
    prep = ensemble.preprocessing
    assert prep.equalize == "clahe"
    x = to_model_input(equalize(prep.geometry.apply(film), "clahe"), prep)[None]
    with torch.no_grad():
        want = torch.sigmoid(ensemble.members[0].model(x)).numpy()
    np.testing.assert_allclose(ensemble.predict_images([film]), want, rtol=1e-5, atol=1e-6)
