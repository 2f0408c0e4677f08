"""Synthetic labels without pixels (cxrlabel.synth.labels and .config)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlabel import synth
from cxrlabel.data.labels import OBSERVATIONS


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
