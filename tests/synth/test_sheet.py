"""Contact sheet of a synthetic dataset (cxrlabel.synth.sheet)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from cxrlabel import synth
from cxrlabel.data.labels import OBSERVATIONS
from tests.synth.helpers import read_csvs


def test_contact_sheet_size_and_captions(dataset: Path, tmp_path: Path) -> None:
    out = synth.contact_sheet(dataset, tmp_path / "sheet.png", n=6, columns=3, tile=96)
    with Image.open(out) as im:
        caption = synth.caption_height(font_size=14)
        assert im.format == "PNG"
        assert im.size == (3 * 96, 2 * (96 + caption))
    train, _ = read_csvs(dataset)
    assert synth.caption_text(train.iloc[0].to_dict())


def test_contact_sheet_from_rows(dataset: Path, tmp_path: Path) -> None:
    train, _ = read_csvs(dataset)
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
