"""Input sanity flags in batch labelling: the images.csv `flags` column, --skip-flagged."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlabel.cli import main
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.labelling.journal import PARTIAL_DIR
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.factory import create_model
from cxrlabel.models.predictor import load_model
from cxrlabel.synth import generate_image
from tests.helpers import SHARED_DATA

LABELS = ("Cardiomegaly", "Edema")
TIBIA = SHARED_DATA / "fixtures" / "non_chest" / "pydicom_RG3_J2KI_tibia.dcm"
# name -> the flags its film must get (the tibia DICOM is added when the shared data is here).
EXPECTED = {
    "a_good.png": "",
    "b_one_pixel.png": "small;constant",
    "c_wide.png": "aspect",
    "d_photo.png": "colour",
    "e_blank.png": "constant",
    "f_good.jpg": "",
}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = create_model("tiny", "linear", LABELS, weights="none", size=64)
    path = tmp_path_factory.mktemp("runs") / "flags-run" / "checkpoints" / "best.safetensors"
    save_checkpoint(path, net, config={"name": "flags-run"}, epoch=0, step=0)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    return load_model([checkpoint], backend="torch", device="cpu")


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder of films, some that the input checks must flag; and name -> expected flags."""
    folder = tmp_path_factory.mktemp("flagged") / "films"
    folder.mkdir()
    film = generate_image({}, np.random.default_rng(5), size=320)
    Image.fromarray(film).save(folder / "a_good.png")
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(folder / "b_one_pixel.png")
    Image.fromarray(np.hstack([film, film, film])).save(folder / "c_wide.png")
    tinted = np.stack([film, film // 2, film // 4], axis=-1)
    Image.fromarray(tinted).save(folder / "d_photo.png")
    Image.fromarray(np.full((320, 320), 128, np.uint8)).save(folder / "e_blank.png")
    Image.fromarray(film).save(folder / "f_good.jpg", quality=90)
    expected = dict(EXPECTED)
    if TIBIA.is_file():
        shutil.copy(TIBIA, folder / "g_tibia.dcm")
        expected["g_tibia.dcm"] = "body_part:EXTREMITY"
    return folder, expected


def test_flags_are_written_to_images_csv_and_nothing_is_dropped(
    films: tuple[Path, dict[str, str]], model, tmp_path: Path
) -> None:
    folder, expected = films
    summary = label_inputs([folder], model, tmp_path, batch_size=3, progress=False)
    images = read_rows(tmp_path / "images.csv")
    assert "flags" in images[0]
    assert {Path(r["Path"]).name: r["flags"] for r in images} == expected
    labelled = {Path(r["Path"]).name for r in read_rows(tmp_path / "labels.csv")}
    assert labelled == set(expected)  # flagged films are labelled all the same
    assert read_rows(tmp_path / "errors.csv") == []
    n_flagged = sum(bool(v) for v in expected.values())
    assert (summary.labelled, summary.flagged_inputs, summary.skipped) == (
        len(expected),
        n_flagged,
        0,
    )
    assert f"{n_flagged} flagged by the input checks" in summary.to_text()


def test_skip_flagged_reports_them_in_errors_csv_instead(
    films: tuple[Path, dict[str, str]], model, tmp_path: Path
) -> None:
    folder, expected = films
    summary = label_inputs(
        [folder], model, tmp_path, batch_size=3, progress=False, skip_flagged=True
    )
    good = {name for name, flags in expected.items() if not flags}
    assert {Path(r["Path"]).name for r in read_rows(tmp_path / "labels.csv")} == good
    assert {Path(r["Path"]).name for r in read_rows(tmp_path / "images.csv")} == good
    errors = {Path(r["Path"]).name: r for r in read_rows(tmp_path / "errors.csv")}
    assert set(errors) == set(expected) - good
    for name, row in errors.items():
        assert row["error"] == "FlaggedInput"
        assert "--skip-flagged" in row["reason"]
        for flag in expected[name].split(";"):
            assert flag in row["reason"], (flag, row["reason"])
    assert "small (smallest side under 128 px)" in errors["b_one_pixel.png"]["reason"]
    assert (summary.labelled, summary.errors, summary.skipped) == (len(good), 0, len(errors))
    assert summary.flagged_inputs == len(errors)


def test_skip_flagged_resumes_like_an_uninterrupted_run_and_must_match(
    films: tuple[Path, dict[str, str]], model, tmp_path: Path
) -> None:
    folder, _ = films
    label_inputs([folder], model, tmp_path / "whole", batch_size=2, progress=False,
                 skip_flagged=True)  # fmt: skip
    out = tmp_path / "resumed"

    def stop(done: int) -> None:
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_inputs([folder], model, out, batch_size=2, progress=False, skip_flagged=True,
                     on_batch=stop)  # fmt: skip
    # The flags decide which file a film lands in: a resume must judge them alike.
    with pytest.raises(ValueError, match=r"different arguments.*skip_flagged"):
        label_inputs([folder], model, out, batch_size=2, progress=False)
    summary = label_inputs([folder], model, out, batch_size=2, progress=False, skip_flagged=True)
    assert summary.resumed_after == 4 and not (out / PARTIAL_DIR).exists()
    for name in ("labels.csv", "images.csv", "errors.csv"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    assert summary.skipped == len(read_rows(out / "errors.csv"))


def test_cli_label_skip_flagged(
    films: tuple[Path, dict[str, str]], checkpoint: Path, tmp_path: Path
) -> None:
    folder, expected = films
    out = tmp_path / "out"
    argv = ["label", str(folder), "--model", str(checkpoint), "--out", str(out)]
    assert main([*argv, "--backend", "torch", "--device", "cpu", "--no-progress",
                 "--skip-flagged"]) == 0  # fmt: skip
    errors = read_rows(out / "errors.csv")
    assert len(errors) == sum(bool(v) for v in expected.values())
    assert {r["error"] for r in errors} == {"FlaggedInput"}
