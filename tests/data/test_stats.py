import pytest

from cxrlabel.data.formats import load_table
from cxrlabel.data.stats import label_stats
from tests.helpers import SHARED_DATA, chexpert_csv


def _row(patient, study, view, **labels):
    frontal = view == "frontal"
    return {
        "Path": f"train/patient{patient:05d}/study{study}/view{1 if frontal else 2}_{view}.jpg",
        "Sex": "Female",
        "Age": "50",
        "Frontal/Lateral": view.capitalize(),
        "AP/PA": "PA" if frontal else "",
        **labels,
    }


@pytest.fixture
def table(tmp_path):
    # 3 studies, 5 images. Edema: study A pos (frontal) + uncertain (lateral) -> pos;
    # study B uncertain + blank -> uncertain; study C blank -> negative.
    rows = [
        _row(1, 1, "frontal", Edema="1.0", Fracture="-1.0"),
        _row(1, 1, "lateral", Edema="-1.0", Fracture="0.0"),
        _row(1, 2, "frontal", Edema="-1.0"),
        _row(1, 2, "lateral", Edema=""),
        _row(2, 1, "frontal", Edema="", Cardiomegaly="1.0"),
    ]
    return load_table(chexpert_csv(tmp_path / "train.csv", rows))


def _counts(stats, name):
    row = stats.frame.set_index("Pathology").loc[name]
    return int(row["Positive"]), int(row["Uncertain"]), int(row["Negative"])


def test_study_level_counts(table):
    stats = label_stats(table, unit="study")
    assert stats.total == 3
    assert _counts(stats, "Edema") == (1, 1, 1)
    assert _counts(stats, "Fracture") == (0, 1, 2)
    assert _counts(stats, "Cardiomegaly") == (1, 0, 2)
    row = stats.frame.set_index("Pathology").loc["Edema"]
    assert row["Positive %"] == pytest.approx(33.33)


def test_image_level_counts_and_view_filter(table):
    stats = label_stats(table, unit="image")
    assert stats.total == 5
    assert _counts(stats, "Edema") == (1, 2, 2)
    frontal = label_stats(table, unit="image", view="frontal")
    assert frontal.total == 3 and _counts(frontal, "Edema") == (1, 1, 1)
    lateral_studies = label_stats(table, unit="study", view="lateral")
    assert lateral_studies.total == 2 and _counts(lateral_studies, "Edema") == (0, 1, 1)


def test_layout_and_outputs(table):
    stats = label_stats(table, unit="study")
    assert stats.frame["Pathology"].tolist()[:5] == [
        "No Finding",
        "Enlarged Cardiomediastinum",
        "Cardiomegaly",
        "Lung Lesion",
        "Lung Opacity",
    ]
    assert "| Edema | 1 (33.33) | 1 (33.33) | 1 (33.33) |" in stats.to_markdown()
    assert "Edema,1,33.33,1,33.33,1,33.33" in stats.to_csv()
    text = stats.to_text()
    assert "3 studies" in text and "Positive (%)" in text
    assert "Unlabelled" not in text  # CheXpert blanks are negatives


def test_unknown_blanks_get_their_own_column():
    csv = SHARED_DATA / "nih-cxr14" / "labels.csv"
    if not csv.is_file():
        pytest.skip(f"shared data absent: {csv}")
    stats = label_stats(load_table(csv), unit="image")
    row = stats.frame.set_index("Pathology").loc["Fracture"]
    assert (row["Negative"], row["Unlabelled"]) == (0, 497)
    assert _counts(stats, "Pleural Effusion") == (69, 0, 428)
    assert "Unlabelled (%)" in stats.to_markdown()
