"""`label` and the CSV rules: paths outside a CSV's root, formula cells, label values, encoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cxrlabel.data.labels import LabelError
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.models.predictor import load_model
from cxrlabel.models.thresholds import Thresholds
from tests.labelling.test_batch import LABELS, make_checkpoint, read_rows


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    # As test_batch's model: Cardiomegaly always -1 (a band over [0, 1]), so a label value
    # that starts with '-' is in every labels.csv row.
    thresholds = Thresholds(LABELS, (0.5, 0.0, 1.0), "fixed", ((0.0, 1.0), (0.0, 0.0), (1.0, 1.0)))
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    ckpt = make_checkpoint(run / "checkpoints" / "best.safetensors", thresholds=thresholds)
    return load_model([ckpt], backend="torch", device="cpu")


def _film(tiny_dataset: Path) -> Path:
    return next((tiny_dataset / "train").rglob("*.jpg"))


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_paths_outside_its_folder_go_to_errors(
    tiny_dataset: Path,
    model,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(_film(tiny_dataset), data / "inside.jpg")
    outside = tmp_path / "outside.jpg"
    shutil.copy(_film(tiny_dataset), outside)
    (data / "sub").mkdir()
    (data / "link.jpg").symlink_to(outside)
    csv_path = _write(
        data / "films.csv",
        ["Path", "inside.jpg", "../outside.jpg", str(outside), "sub/../../outside.jpg", "link.jpg"],
    )
    summary = label_inputs([csv_path], model, tmp_path / "out", progress=False)
    assert [r["Path"] for r in read_rows(tmp_path / "out" / "labels.csv")] == ["inside.jpg"]
    errors = read_rows(tmp_path / "out" / "errors.csv")
    assert [r["Path"] for r in errors] == [
        "../outside.jpg",
        str(outside),
        "sub/../../outside.jpg",
        "link.jpg",
    ]
    assert {r["error"] for r in errors} == {"OutsidePathError"}
    assert all(str(csv_path) in r["reason"] and "--allow-outside-paths" in r["reason"]
               for r in errors)  # fmt: skip
    assert summary.errors == 4


def test_allow_outside_paths_reads_them(
    tiny_dataset: Path,
    model,
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside.jpg"
    shutil.copy(_film(tiny_dataset), outside)
    csv_path = _write(tmp_path / "data" / "films.csv", ["Path", "../outside.jpg"])
    out = tmp_path / "out"
    summary = label_inputs([csv_path], model, out, progress=False, allow_outside_paths=True)
    assert summary.labelled == 1 and summary.errors == 0


def test_formula_film_name_is_neutralised_in_every_output(
    tiny_dataset: Path,
    model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(_film(tiny_dataset), folder / "=cmd()+formula.jpg")
    (folder / "@bad.png").write_bytes(b"not a png")
    monkeypatch.chdir(folder)
    label_inputs(["."], model, tmp_path / "o", progress=False)
    for name in ("labels.csv", "probabilities.csv", "images.csv"):
        rows = read_rows(tmp_path / "o" / name)
        assert rows[0]["Path"] == "'=cmd()+formula.jpg", name
    labels = read_rows(tmp_path / "o" / "labels.csv")[0]
    # Label values stay numbers: -1.0 is not a formula to neutralise.
    assert labels["Cardiomegaly"] == "-1.0"
    errors = read_rows(tmp_path / "o" / "errors.csv")
    assert errors[0]["Path"] == "'@bad.png"
    assert not any(c.startswith(("=", "+", "@")) for r in errors for c in r.values())


def test_labels_csv_round_trips_as_an_input(
    tiny_dataset: Path,
    model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An escaped Path cell is read back as the file's real name (the escape is lossless)."""
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(_film(tiny_dataset), folder / "=cmd()+formula.jpg")
    monkeypatch.chdir(folder)
    label_inputs(["."], model, tmp_path / "o", progress=False)
    shutil.copy(tmp_path / "o" / "labels.csv", folder / "again.csv")
    summary = label_inputs([folder / "again.csv"], model, tmp_path / "o2", progress=False)
    assert summary.labelled == 1 and summary.errors == 0


def test_invalid_label_values_in_a_csv_input_are_rejected(
    tiny_dataset: Path,
    model,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(_film(tiny_dataset), data / "a.jpg")
    csv_path = _write(data / "films.csv", ["Path,Edema,Cardiomegaly", "a.jpg,1.0,", "a.jpg,yes,0"])
    with pytest.raises(LabelError, match=r"films.csv: line 3, column 'Edema'.*'yes'"):
        label_inputs([csv_path], model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "labels.csv").exists()


def test_a_csv_input_that_is_not_utf8_names_the_file(
    tiny_dataset: Path,
    model,
    tmp_path: Path,
) -> None:
    csv_path = tmp_path / "films.csv"
    csv_path.write_bytes("Path\nfilm_\u00e9.jpg\n".encode("latin-1"))
    with pytest.raises(LabelError, match=r"films.csv.*not UTF-8.*line 2"):
        label_inputs([csv_path], model, tmp_path / "out", progress=False)
