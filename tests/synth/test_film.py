"""Synthetic films (cxrlabel.synth.film and the views): format and visible mechanisms.

Small sizes (64-128 px) keep the file fast. Pixel tests compare two films drawn from equally
seeded generators: the patient, technique and noise are then identical and only the finding
differs, so a measured difference is the finding's mechanism.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxrlabel import synth


def _film(findings: dict[str, float], seed: int, size: int = 128, view: str = "frontal"):
    return synth.generate_image(findings, np.random.default_rng(seed), size, view).astype(float)


def _heart_width(img: np.ndarray) -> float:
    """Median width of the bright central shadow over rows at heart level."""
    size = img.shape[0]
    widths = []
    for row in img[int(0.55 * size) : int(0.7 * size)]:
        c = size // 2
        thr = (np.percentile(row[int(0.1 * size) : int(0.9 * size)], 10) + row[c]) / 2
        bright = row > thr
        left = c
        while left > 0 and bright[left - 1]:
            left -= 1
        right = c
        while right < size - 1 and bright[right + 1]:
            right += 1
        widths.append(right - left + 1)
    return float(np.median(widths))


def test_generate_image_deterministic_and_no_global_state() -> None:
    state = np.random.get_state()[1].copy()
    a = synth.generate_image({"Edema": 0.5}, np.random.default_rng(7), 64)
    b = synth.generate_image({"Edema": 0.5}, np.random.default_rng(7), 64)
    assert np.array_equal(a, b)
    assert np.array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("size", [64, 100, 128])
@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_image_format(size: int, view: str) -> None:
    img = synth.generate_image({"Support Devices": 0.7}, np.random.default_rng(0), size, view)
    assert img.dtype == np.uint8 and img.shape == (size, size)
    assert img.std() > 20  # a film, not a flat field


def test_frontal_grey_levels_look_like_a_chest_film() -> None:
    img = _film({}, seed=4, size=128)
    s = 128
    lungs = np.concatenate([img[40:70, 22:45].ravel(), img[40:70, 83:106].ravel()])
    mediastinum = img[40:70, 60:68]
    abdomen = img[115:125, 40:90]
    assert lungs.mean() + 40 < mediastinum.mean()  # dark lungs, bright central shadow
    assert lungs.mean() + 40 < abdomen.mean()  # bright below the diaphragm
    assert img[:, : s // 16].mean() < lungs.mean() + 60  # dark air/arm margin at the side


# The simplified lateral view does not draw pneumothorax, pleural thickening or fractures.
_NOT_ON_LATERAL = ("Pneumothorax", "Pleural Other", "Fracture")


@pytest.mark.parametrize(
    ("name", "view"),
    [(n, "frontal") for n in synth.FINDINGS]
    + [(n, "lateral") for n in synth.FINDINGS if n not in _NOT_ON_LATERAL],
)
def test_every_finding_changes_the_film(name: str, view: str) -> None:
    normal = _film({}, seed=5, size=96, view=view)
    sick = _film({name: 0.9}, seed=5, size=96, view=view)
    assert np.abs(sick - normal).mean() > 0.05, name


def test_cardiomegaly_widens_the_heart() -> None:
    for seed in range(4):
        normal = _heart_width(_film({}, seed))
        mild = _heart_width(_film({"Cardiomegaly": 0.2}, seed))
        severe = _heart_width(_film({"Cardiomegaly": 0.9}, seed))
        assert normal + 4 < mild < severe, (seed, normal, mild, severe)


def test_enlarged_cardiomediastinum_widens_upper_mediastinum() -> None:
    for seed in range(3):
        normal = _film({}, seed)
        wide = _film({"Enlarged Cardiomediastinum": 0.8}, seed)
        band = slice(int(0.3 * 128), int(0.42 * 128))
        # The bright central column at hilum level covers more columns.
        assert (wide[band] > 150).sum() > (normal[band] > 150).sum() + 50


def test_effusion_brightens_the_lung_bases() -> None:
    for seed in range(4):
        normal = _film({}, seed)
        effusion = _film({"Pleural Effusion": 0.6}, seed)
        bases = slice(int(0.6 * 128), int(0.76 * 128))
        left, right = slice(10, 50), slice(78, 118)
        gain = max(
            (effusion[bases, left] - normal[bases, left]).mean(),
            (effusion[bases, right] - normal[bases, right]).mean(),
        )
        assert gain > 8, (seed, gain)
        apices = slice(int(0.2 * 128), int(0.3 * 128))
        assert abs((effusion[apices] - normal[apices]).mean()) < 1.0


def _gradient(img: np.ndarray) -> np.ndarray:
    """Per-pixel fine-structure map: absolute differences to the next pixel down and right."""
    g = np.zeros_like(img)
    g[:-1] += np.abs(np.diff(img, axis=0))
    g[:, :-1] += np.abs(np.diff(img, axis=1))
    return g


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_pneumothorax_removes_lung_markings() -> None:
    for seed in range(4):
        normal = _film({}, seed, size=256)
        ptx = _film({"Pneumothorax": 0.8}, seed, size=256)
        # The pleural air: where the film got darker, away from its edges (the pleural line).
        air = _erode(ptx - normal < -8, 3)
        assert air.sum() > 500
        assert ptx[air].mean() < normal[air].mean() - 10
        # Same ribs and the same film grain in both films: less structure = no vessels there.
        ratio = _gradient(ptx)[air].mean() / _gradient(normal)[air].mean()
        assert ratio < 0.85, (seed, ratio)


def test_pneumonia_draws_an_airspace_opacity() -> None:
    for seed in range(3):
        normal = _film({}, seed)
        pneumonia = _film({"Pneumonia": 0.7}, seed)
        diff = pneumonia - normal
        assert diff.max() > 30  # a dense patch somewhere in the lungs
        assert (diff > 15).sum() > 60  # covering an area, not a line


def test_lesion_is_a_compact_bright_spot() -> None:
    normal = _film({}, 6)
    nodule = _film({"Lung Lesion": 0.3}, 6)
    ys, xs = np.nonzero(nodule - normal > 20)
    assert len(ys) > 5
    assert np.ptp(ys) < 20 and np.ptp(xs) < 20  # small and round, not a band


def test_devices_add_bright_thin_structures() -> None:
    for seed in range(3):
        normal = _film({}, seed)
        devices = _film({"Support Devices": 0.9}, seed)
        brighter = devices - normal > 25
        assert brighter.sum() > 40
        assert (devices - normal).min() > -3  # devices only add density
        # Thin: the changed pixels are lines, not a region (few have all 4 neighbours changed).
        core = brighter[1:-1, 1:-1] & brighter[:-2, 1:-1] & brighter[2:, 1:-1]
        core &= brighter[1:-1, :-2] & brighter[1:-1, 2:]
        assert core.sum() < 0.6 * brighter.sum()


def test_severity_is_monotone_for_effusion_extent() -> None:
    normal = _film({}, 8)
    extents = [(_film({"Pleural Effusion": s}, 8) - normal > 10).sum() for s in (0.1, 0.5, 0.95)]
    assert extents[0] < extents[1] < extents[2]


def test_invalid_inputs() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        synth.generate_image({"Not A Finding": 0.5}, rng, 64)
    with pytest.raises(ValueError):
        synth.generate_image({"Edema": 1.5}, rng, 64)
    with pytest.raises(ValueError):
        synth.generate_image({}, rng, 64, view="oblique")
    with pytest.raises(ValueError):
        synth.plan_dataset(0)
    assert synth.generate_image({"Edema": 0.0}, np.random.default_rng(1), 48).shape == (48, 48)
