"""Contact sheet of a synthetic dataset (cxrlabel.synth.sheet)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
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


def test_contact_sheet_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    a = synth.contact_sheet(dataset, tmp_path / "a.png", n=5, columns=2, tile=80, font_size=10)
    b = synth.contact_sheet(dataset, tmp_path / "b.png", n=5, columns=2, tile=80, font_size=10)
    assert a.read_bytes() == b.read_bytes()


def test_contact_sheet_tiles_are_the_films_with_a_framed_caption(
    dataset: Path, tmp_path: Path
) -> None:
    train, _ = read_csvs(dataset)
    rows = train.head(2).to_dict("records")
    out = synth.contact_sheet(rows, tmp_path / "s.png", n=2, root=dataset, columns=2, tile=64)
    sheet = np.asarray(Image.open(out)).astype(int)
    caption = synth.caption_height(font_size=14)
    assert sheet.shape == (64 + caption, 2 * 64)
    with Image.open(dataset / rows[0]["Path"]) as im:
        film = np.asarray(im.convert("L").resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    # Inside the frame, the tile is the film; the frame and the caption band are drawn over it.
    assert np.array_equal(sheet[1:63, 1:63], film[1:63, 1:63])
    assert (sheet[0, :64] == 170).all() and (sheet[64 + caption - 1, :64] == 170).all()
    band = sheet[64 : 64 + caption - 1, 1:63]
    assert (band == 255).mean() > 0.5 and (band < 128).any()  # white band with dark text
