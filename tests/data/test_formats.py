import numpy as np
import pytest

from cxrlabel.data.formats import NIH_TO_CHEXPERT, detect_format, load_table
from cxrlabel.data.labels import OBSERVATIONS, BlankMeaning, LabelError
from tests.helpers import SHARED_DATA, chexpert_csv


def _frontal(patient, study, **labels):
    path = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/view1_frontal.jpg"
    return {
        "Path": path,
        "Sex": "Male",
        "Age": "60",
        "Frontal/Lateral": "Frontal",
        "AP/PA": "AP",
        **labels,
    }


def test_chexpert_reads_values_ids_and_root(tmp_path):
    csv = chexpert_csv(
        tmp_path / "CheXpert-v1.0-small" / "train.csv",
        [_frontal(1, 1, Edema="1.0", **{"No Finding": ""}), _frontal(2, 1, Edema="-1.0")],
    )
    table = load_table(csv)
    assert table.blank is BlankMeaning.NEGATIVE
    assert table.root == tmp_path.resolve()  # paths start with the dataset folder's name
    assert table.frame["patient_id"].tolist() == ["patient00001", "patient00002"]
    assert table.frame["study_id"].tolist() == ["patient00001/study1", "patient00002/study1"]
    edema = table.values(["Edema"])[:, 0]
    assert edema.tolist() == [1.0, -1.0]
    assert np.isnan(table.values(["Cardiomegaly"])).all()  # blank stays blank, not 0


def test_chexpert_bad_value_names_file_line_and_column(tmp_path):
    csv = chexpert_csv(tmp_path / "train.csv", [_frontal(1, 1), _frontal(2, 1, Fracture="x")])
    with pytest.raises(LabelError, match=r"train\.csv: line 3, column 'Fracture'"):
        load_table(csv)


def test_chexpert_missing_column(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("Path,Sex,Age,Frontal/Lateral,AP/PA,Edema\na,Male,1,Frontal,AP,1.0\n")
    with pytest.raises(LabelError, match="missing observation columns"):
        load_table(csv, "chexpert")


def test_mimic_joins_metadata_and_labels(tmp_path):
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    meta.write_text(
        "dicom_id,subject_id,study_id,ViewPosition\n"
        "d1,10000032,50414267,PA\nd2,10000032,50414267,LATERAL\nd3,10000764,57375967,AP\n"
    )
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    header = "subject_id,study_id," + ",".join(OBSERVATIONS)
    row1 = "10000032,50414267," + ",".join(["1.0"] + [""] * 13)
    row2 = "10000764,57375967," + ",".join([""] * 5 + ["-1.0"] + [""] * 8)
    labels.write_text("\n".join([header, row1, row2]) + "\n")
    table = load_table(labels, "mimic", mimic_metadata=meta)
    frame = table.frame
    assert frame["Path"].tolist()[0] == "files/p10/p10000032/s50414267/d1.jpg"
    assert frame["Frontal/Lateral"].tolist() == ["Frontal", "Lateral", "Frontal"]
    assert frame["study_id"].nunique() == 2
    assert table.values(["No Finding"])[:, 0][:2].tolist() == [1.0, 1.0]
    assert table.values(["Edema"])[2, 0] == -1.0
    assert table.blank is BlankMeaning.NEGATIVE
    with pytest.raises(LabelError, match="metadata"):
        load_table(labels, "mimic")


def test_nih_mapping(tmp_path):
    csv = tmp_path / "Data_Entry_2017_v2020.csv"
    csv.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA\n"
        "00000001_001.png,Nodule|Pleural_Thickening|Infiltration,1,1,58,M,AP\n"
        "00000002_000.png,No Finding,0,2,81,F,PA\n"
    )
    assert detect_format(["Image Index", "Finding Labels", "Patient ID"]) == "nih"
    table = load_table(csv)
    assert table.blank is BlankMeaning.UNKNOWN
    v = dict(zip(OBSERVATIONS, table.values().T, strict=True))
    assert v["Pleural Effusion"].tolist() == [1, 0, 0]
    assert v["Lung Lesion"].tolist() == [0, 1, 0]
    assert v["Pleural Other"].tolist() == [0, 1, 0]
    assert v["No Finding"].tolist() == [0, 0, 1]
    for never in ("Fracture", "Support Devices", "Enlarged Cardiomediastinum", "Lung Opacity"):
        assert np.isnan(v[never]).all()
    assert table.frame["study_id"].nunique() == 3 and table.frame["patient_id"].nunique() == 2
    assert table.frame["Path"][0] == "images/00000001_000.png"
    assert set(NIH_TO_CHEXPERT.values()) <= set(OBSERVATIONS)


def test_nih_unknown_finding(tmp_path):
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID\na.png,Atelectasis|Gout,1\n")
    with pytest.raises(LabelError, match=r"line 2.*Gout"):
        load_table(csv)


def test_generic_subset_of_columns(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "Path,Patient ID,Study ID,Edema,Cardiomegaly\na.png,7,s1,1.0,\nb.png,8,s2,0.0,1.0\n"
    )
    table = load_table(csv)
    assert table.blank is BlankMeaning.UNKNOWN
    assert table.frame["patient_id"].tolist() == ["7", "8"]
    assert table.frame["study_id"].tolist() == ["s1", "s2"]
    _, mask = table.targets(["Edema", "Cardiomegaly"])
    assert mask.tolist() == [[True, False], [True, True]]
    assert np.isnan(table.values(["Fracture"])).all()


def test_missing_file():
    with pytest.raises(LabelError, match="not found"):
        load_table("/nonexistent/labels.csv", "generic")


def test_shared_nih_labels_load():
    csv = SHARED_DATA / "nih-cxr14" / "labels.csv"
    if not csv.is_file():
        pytest.skip(f"shared data absent: {csv}")
    table = load_table(csv)
    assert len(table) == 497 and table.blank is BlankMeaning.UNKNOWN
    positives = dict(zip(OBSERVATIONS, (table.values() == 1).sum(axis=0), strict=True))
    assert positives["Cardiomegaly"] == 48 and positives["Pleural Effusion"] == 69
    assert all(p.is_file() for p in table.image_paths()[:20])
    assert table.frame["patient_id"].nunique() == 497


def test_root_is_the_csv_folder_when_paths_resolve_there(tmp_path):
    folder = tmp_path / "train"  # same name as the paths' first component
    image = folder / "train" / "patient00001" / "study1" / "view1_frontal.jpg"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"x")
    row = {
        "Path": "train/patient00001/study1/view1_frontal.jpg",
        "Sex": "Male",
        "Age": "1",
        "Frontal/Lateral": "Frontal",
        "AP/PA": "AP",
    }
    table = load_table(chexpert_csv(folder / "train.csv", [row]))
    assert table.image_paths() == [image.resolve()]
