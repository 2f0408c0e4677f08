"""The label-CSV path rule and encoding errors at every loader (cxrlabel.data.csvfiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlabel.cli import main
from cxrlabel.config import RunConfig
from cxrlabel.data.csvfiles import NotUtf8Error, OutsidePathError, outside_reason
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.training.finetune import filtered_table
from tests.helpers import chexpert_csv

OUTSIDE = ["../secret.png", "/etc/passwd", "a/../../secret.png"]


def _frontal(path: str, **labels: str) -> dict[str, str]:
    return {"Path": path, "Sex": "Male", "Age": "60", "Frontal/Lateral": "Frontal",
            "AP/PA": "AP", "Edema": "1.0", **labels}  # fmt: skip


def test_outside_reason_lexical_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)
    assert outside_reason(root, "sub/x.png") is None
    assert outside_reason(root, str(root / "x.png")) is None  # absolute but inside
    assert outside_reason(root, "sub/../x.png") is None
    for text in [*OUTSIDE, "link/x.png"]:
        assert outside_reason(root, text) is not None, text
    assert "NUL" in (outside_reason(root, "a\x00b") or "")


@pytest.mark.parametrize("bad", OUTSIDE)
def test_generic_refuses_paths_outside_naming_csv_line_and_path(tmp_path: Path, bad: str) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(f"Path,Edema\na.png,1.0\n{bad},0.0\n")
    with pytest.raises(OutsidePathError, match=rf"labels\.csv: line 3: Path '{bad}' refused"):
        load_table(csv)
    table = load_table(csv, allow_outside_paths=True)
    assert table.image_paths()[1] == table.root / bad


def test_chexpert_root_is_the_dataset_folder_not_further(tmp_path: Path) -> None:
    csv = chexpert_csv(
        tmp_path / "CheXpert-v1.0-small" / "valid.csv",
        [
            # The dataset root is the CSV folder's parent here: this stays inside it.
            _frontal("CheXpert-v1.0-small/valid/patient00001/study1/view1_frontal.jpg"),
            _frontal("CheXpert-v1.0-small/../../patient00002/study1/view1_frontal.jpg"),
        ],
    )
    with pytest.raises(OutsidePathError, match=r"valid\.csv: line 3"):
        load_table(csv)


def test_nih_and_mimic_paths_built_from_cells_are_checked(tmp_path: Path) -> None:
    nih = tmp_path / "Data_Entry_2017.csv"
    nih.write_text("Image Index,Finding Labels,Patient ID\n../../x.png,Atelectasis,1\n")
    with pytest.raises(OutsidePathError, match=r"Data_Entry_2017\.csv: line 2"):
        load_table(nih)
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    meta.write_text("dicom_id,subject_id,study_id\nd1,1,2\n../../../../../x,1,2\n")
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    labels.write_text("subject_id,study_id," + ",".join(OBSERVATIONS) + "\n1,2" + "," * 14 + "\n")
    with pytest.raises(OutsidePathError, match=r"metadata\.csv: line 3"):
        load_table(labels, "mimic", mimic_metadata=meta)


def test_training_config_carries_the_rule(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("Path,Edema,Frontal/Lateral\n../a.png,1.0,Frontal\n")
    with pytest.raises(OutsidePathError):
        filtered_table(RunConfig(labels="Edema"), csv)
    table = filtered_table(RunConfig(labels="Edema", allow_outside_paths=True), csv)
    assert len(table) == 1


def test_prepare_refuses_and_the_flag_allows(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((20, 30), 99, np.uint8)).save(tmp_path / "outside.png")
    csv = data / "labels.csv"
    csv.write_text("Path,Edema\n../outside.png,1.0\n")
    args = ["prepare", str(csv), "--size", "16", "--out", str(tmp_path / "c"), "--workers", "1"]
    assert main(args) == 2
    assert "line 2: Path '../outside.png' refused" in caplog.text
    assert not (tmp_path / "c").exists()
    assert main([*args, "--allow-outside-paths"]) == 0


def test_a_label_csv_that_is_not_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_bytes("Path,Edema\na.png,1.0\nb_\u00e9.png,0.0\n".encode("latin-1"))
    with pytest.raises(NotUtf8Error, match=r"labels\.csv: not UTF-8 text: line 3"):
        load_table(csv)
    header = tmp_path / "header.csv"
    header.write_bytes("Path,\u00c9dema\na.png,1.0\n".encode("latin-1"))
    with pytest.raises(NotUtf8Error, match=r"header\.csv: not UTF-8 text: line 1"):
        load_table(header)  # the format detection reads the header first
