"""Tests for the built-in synthetic chest radiographs (cxrlabel.synth).

Small sizes (64-128 px) and few patients keep the whole file fast. Pixel tests compare two films
drawn from equally seeded generators: the patient, technique and noise are then identical and
only the finding differs, so a measured difference is the finding's mechanism.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlabel import synth
from cxrlabel.data.labels import OBSERVATIONS

LABEL_VALUES = {1.0, 0.0, -1.0}
PATH_RE = re.compile(r"^(train|valid)/patient\d{5}/study\d+/view\d+_(frontal|lateral)\.jpg$")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


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


def _read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    # keep_default_na=False + na_values=[""] : blank cells are NaN, nothing else is.
    kw = {"keep_default_na": False, "na_values": [""]}
    return pd.read_csv(out / "train.csv", **kw), pd.read_csv(out / "valid.csv", **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synth.write_dataset(out, patients=24, size=64, seed=3)
    return out


@pytest.fixture(scope="module")
def plans() -> list[synth.StudyPlan]:
    """Labels of a few hundred patients, no pixels (fast)."""
    return synth.plan_dataset(400, seed=11)


# ------------------------------------------------------------------------------------------
# dataset layout and CSV schema
# ------------------------------------------------------------------------------------------


def test_summary_and_files(dataset: Path) -> None:
    train, valid = _read(dataset)
    assert len(train) > 0 and len(valid) > 0
    for df in (train, valid):
        for rel in df["Path"]:
            assert PATH_RE.match(rel), rel
            assert (dataset / rel).is_file()
    assert train["Path"].str.startswith("train/").all()
    assert valid["Path"].str.startswith("valid/").all()
    # No leftover temporary files from the atomic CSV writes.
    assert not [p for p in dataset.iterdir() if p.name.startswith(".")]


def test_write_dataset_summary_counts(tmp_path: Path) -> None:
    summary = synth.write_dataset(tmp_path / "d", patients=10, size=48, seed=5)
    train, valid = _read(tmp_path / "d")
    assert summary.train_images == len(train) and summary.valid_images == len(valid)
    assert summary.images == len(list((tmp_path / "d").rglob("*.jpg")))
    assert summary.train_patients + summary.valid_patients == 10
    assert summary.valid_patients >= 1
    with pytest.raises(AttributeError):
        summary.studies = 0  # type: ignore[misc]  # frozen


def test_csv_columns_and_values(dataset: Path) -> None:
    train, valid = _read(dataset)
    expected = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    assert list(train.columns) == expected
    assert list(valid.columns) == expected
    for df in (train, valid):
        assert set(df["Sex"]) <= {"Male", "Female"}
        assert df["Age"].dtype.kind == "i" and df["Age"].between(18, 90).all()
        assert set(df["Frontal/Lateral"]) <= {"Frontal", "Lateral"}
        frontal = df["Frontal/Lateral"] == "Frontal"
        assert set(df.loc[frontal, "AP/PA"]) <= {"AP", "PA"}
        assert df.loc[~frontal, "AP/PA"].isna().all()
        lateral_paths = df.loc[~frontal, "Path"]
        assert lateral_paths.str.endswith("_lateral.jpg").all()
        for name in OBSERVATIONS:
            values = set(df[name].dropna())
            assert values <= LABEL_VALUES, (name, values)
    # Train has uncertain and blank labels, valid has neither (radiologist ground truth).
    train_labels = train[list(OBSERVATIONS)]
    assert (train_labels == -1.0).any().any()
    assert train_labels.isna().any().any()
    valid_labels = valid[list(OBSERVATIONS)]
    assert not (valid_labels == -1.0).any().any()
    assert not valid_labels.isna().any().any()


def test_views_share_study_labels(dataset: Path) -> None:
    train, _ = _read(dataset)
    train["study"] = train["Path"].str.rsplit("/", n=1).str[0]
    for _, group in train.groupby("study"):
        labels = group[list(OBSERVATIONS)].fillna(99.0)
        assert (labels.nunique() == 1).all()


def test_split_sizes() -> None:
    for patients in (2, 7, 20, 100):
        plans = synth.plan_dataset(patients, seed=0)
        valid = {p.patient for p in plans if p.split == "valid"}
        train = {p.patient for p in plans if p.split == "train"}
        assert not valid & train
        assert len(valid | train) == patients
        assert len(valid) >= 1
        assert len(valid) <= max(1, math.ceil(0.16 * patients))
    assert {p.split for p in synth.plan_dataset(1, seed=0)} == {"train"}


def test_some_laterals_and_repeat_studies(plans: list[synth.StudyPlan]) -> None:
    studies_per_patient: dict[int, int] = {}
    for p in plans:
        studies_per_patient[p.patient] = max(studies_per_patient.get(p.patient, 0), p.study)
    assert max(studies_per_patient.values()) >= 3
    assert any("lateral" in p.views for p in plans)
    assert all(p.views[0] == "frontal" for p in plans)


# ------------------------------------------------------------------------------------------
# label logic (no pixels)
# ------------------------------------------------------------------------------------------


def _label_frame(plans: list[synth.StudyPlan], split: str) -> pd.DataFrame:
    return pd.DataFrame([dict(p.labels) for p in plans if p.split == split])


@pytest.mark.parametrize("split", ["train", "valid"])
def test_no_finding_consistency(plans: list[synth.StudyPlan], split: str) -> None:
    df = _label_frame(plans, split)
    others = df[[o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices")]]
    abnormal = others.isin([1.0, -1.0]).any(axis=1)
    assert ((df["No Finding"] == 1.0) == ~abnormal).all()
    assert df["No Finding"].sum() > 0


@pytest.mark.parametrize("split", ["train", "valid"])
def test_lung_opacity_consistency(plans: list[synth.StudyPlan], split: str) -> None:
    df = _label_frame(plans, split)
    parenchymal = (df[list(synth.PARENCHYMAL)] == 1.0).any(axis=1)
    assert (df.loc[parenchymal, "Lung Opacity"] == 1.0).all()
    # Pneumonia is drawn as a consolidation pattern, so it always implies an opacity.
    assert (df.loc[df["Pneumonia"] == 1.0, "Lung Opacity"] == 1.0).all()


def test_truth_hierarchy_and_pneumonia_correlation() -> None:
    rng = np.random.default_rng(0)
    draws = [synth.sample_labels(rng) for _ in range(3000)]
    for f in draws:
        assert all(0.0 < s <= 1.0 for s in f.values())
        assert "No Finding" not in f
        if any(n in f for n in synth.PARENCHYMAL):
            assert f["Lung Opacity"] == max(
                f[n] for n in (*synth.PARENCHYMAL, "Lung Opacity") if n in f
            )
    pneu = np.array(["Pneumonia" in f for f in draws])
    cons = np.array(["Consolidation" in f for f in draws])
    # Pneumonia is far more likely with consolidation than without.
    assert pneu[cons].mean() > 3 * pneu[~cons].mean()


def test_prevalence_in_intended_ranges() -> None:
    rng = np.random.default_rng(1)
    draws = [synth.sample_labels(rng) for _ in range(3000)]
    prev = {name: np.mean([name in f for f in draws]) for name in synth.FINDINGS}
    assert 0.44 <= prev["Support Devices"] <= 0.60
    assert 0.38 <= prev["Lung Opacity"] <= 0.54
    assert 0.33 <= prev["Pleural Effusion"] <= 0.47
    assert 0.19 <= prev["Edema"] <= 0.31
    for rare in ("Pleural Other", "Fracture", "Lung Lesion"):
        assert 0.005 <= prev[rare] <= 0.07, (rare, prev[rare])
    # Co-occurrence: effusion is commoner with devices (sick, ICU patients), as in CheXpert.
    dev = np.array(["Support Devices" in f for f in draws])
    eff = np.array(["Pleural Effusion" in f for f in draws])
    assert eff[dev].mean() > eff[~dev].mean() + 0.1


def test_reported_train_labels(plans: list[synth.StudyPlan]) -> None:
    df = _label_frame(plans, "train")
    assert 0.4 <= (df["Support Devices"] == 1.0).mean() <= 0.62
    assert (df == -1.0).to_numpy().mean() > 0.005  # some uncertain labels
    assert df.isna().to_numpy().mean() > 0.3  # most negatives are "not mentioned"
    # Uncertainty comes from subtle (low-severity) findings.
    train_plans = [p for p in plans if p.split == "train"]
    unc_sev = [p.findings[n] for p in train_plans for n in p.findings if p.labels[n] == -1.0]
    pos_sev = [p.findings[n] for p in train_plans for n in p.findings if p.labels[n] == 1.0]
    assert np.mean(unc_sev) < np.mean(pos_sev)


def test_report_labels_valid_is_truth() -> None:
    findings = {"Edema": 0.1, "Lung Opacity": 0.1, "Support Devices": 0.9}
    labels = synth.report_labels(findings, np.random.default_rng(0), split="valid")
    assert labels["Edema"] == 1.0 and labels["Lung Opacity"] == 1.0
    assert labels["No Finding"] == 0.0 and labels["Cardiomegaly"] == 0.0
    normal = synth.report_labels({}, np.random.default_rng(0), split="valid")
    assert normal["No Finding"] == 1.0
    with pytest.raises(ValueError):
        synth.report_labels({}, np.random.default_rng(0), split="test")


def test_config_is_one_documented_table() -> None:
    config = synth.DEFAULT_CONFIG
    assert set(config.findings) == set(synth.FINDINGS)
    with pytest.raises(AttributeError):
        config.miss_rate = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError):
        synth.SynthConfig(findings={"Not A Finding": synth.FindingSpec(0.1)})
    with pytest.raises(ValueError):
        synth.SynthConfig(miss_rate=1.5)
    quiet = synth.SynthConfig(miss_rate=0.0, false_positive_rate=0.0, uncertain_if_subtle=0.0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        f = synth.sample_labels(rng, quiet)
        labels = synth.report_labels(f, rng, "train", quiet)
        for name in f:
            if name != "Lung Opacity":
                assert labels[name] == 1.0


# ------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_identical_bytes(tmp_path: Path) -> None:
    synth.write_dataset(tmp_path / "a", patients=6, size=64, seed=42)
    synth.write_dataset(tmp_path / "b", patients=6, size=64, seed=42, workers=2)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


def test_different_seed_differs(tmp_path: Path) -> None:
    synth.write_dataset(tmp_path / "a", patients=6, size=64, seed=1)
    synth.write_dataset(tmp_path / "b", patients=6, size=64, seed=2)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a["train.csv"] != b["train.csv"]
    common = [k for k in a.keys() & b.keys() if k.endswith(".jpg")]
    assert common and any(a[k] != b[k] for k in common)


def test_image_independent_of_rendering_order() -> None:
    plans = synth.plan_dataset(5, seed=9)
    forward = [synth.render_study(p, 64, seed=9) for p in plans]
    backward = [synth.render_study(p, 64, seed=9) for p in reversed(plans)][::-1]
    for f, b in zip(forward, backward, strict=True):
        assert f.keys() == b.keys()
        assert all(np.array_equal(f[v], b[v]) for v in f)
    # A patient's plan does not depend on how many patients the dataset has.
    assert synth.plan_dataset(5, seed=9)[0] == synth.plan_dataset(30, seed=9)[0]


def test_generate_image_deterministic_and_no_global_state() -> None:
    state = np.random.get_state()[1].copy()
    a = synth.generate_image({"Edema": 0.5}, np.random.default_rng(7), 64)
    b = synth.generate_image({"Edema": 0.5}, np.random.default_rng(7), 64)
    assert np.array_equal(a, b)
    assert np.array_equal(np.random.get_state()[1], state)


# ------------------------------------------------------------------------------------------
# pixels: format and visible mechanisms
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 100, 128])
@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_image_format(size: int, view: str) -> None:
    img = synth.generate_image({"Support Devices": 0.7}, np.random.default_rng(0), size, view)
    assert img.dtype == np.uint8 and img.shape == (size, size)
    assert img.std() > 20  # a film, not a flat field


def test_jpegs_are_greyscale_of_requested_size(dataset: Path) -> None:
    for path in list(dataset.rglob("*.jpg"))[:10]:
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (64, 64)


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


# ------------------------------------------------------------------------------------------
# contact sheet
# ------------------------------------------------------------------------------------------


def test_contact_sheet_size_and_captions(dataset: Path, tmp_path: Path) -> None:
    out = synth.contact_sheet(dataset, tmp_path / "sheet.png", n=6, columns=3, tile=96)
    with Image.open(out) as im:
        caption = synth.caption_height(font_size=14)
        assert im.format == "PNG"
        assert im.size == (3 * 96, 2 * (96 + caption))
    train, _ = _read(dataset)
    assert synth.caption_text(train.iloc[0].to_dict())


def test_contact_sheet_from_rows(dataset: Path, tmp_path: Path) -> None:
    train, _ = _read(dataset)
    rows = train.head(3).to_dict("records")
    out = synth.contact_sheet(rows, tmp_path / "rows.png", n=3, root=dataset, columns=2, tile=64)
    with Image.open(out) as im:
        assert im.size[0] == 2 * 64
    with pytest.raises(ValueError):
        synth.contact_sheet(rows, tmp_path / "x.png")  # rows need a root


def test_caption_marks_uncertain() -> None:
    row = {name: math.nan for name in OBSERVATIONS}
    row.update({"Path": "train/patient00001/study1/view1_frontal.jpg", "Edema": 1.0})
    row["Pleural Effusion"] = -1.0
    text = synth.caption_text(row)
    assert "Edema" in text and "Effusion?" in text
