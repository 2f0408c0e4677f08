"""Batch labelling: inputs, three-valued labels, errors, study rows, lateral routing, resume."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlabel.data.images import read_image
from cxrlabel.data.inputs import InputItem
from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.labelling import batch as predict
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.labelling.journal import PARTIAL_DIR, Journal
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.factory import create_model
from cxrlabel.models.predictor import load_model
from cxrlabel.models.thresholds import Thresholds
from tests.helpers import SHARED_DATA, count_calls

LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion")
OUTPUT_FILES = ("labels.csv", "probabilities.csv", "images.csv", "errors.csv")


def make_checkpoint(
    path: Path, *, seed: int = 0, labels=LABELS, thresholds: Thresholds | None = None
) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny", "linear", labels, weights="none", size=64)
    save_checkpoint(
        path,
        model,
        config={"name": path.parent.parent.name},
        epoch=0,
        step=0,
        thresholds=thresholds,
    )
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Cardiomegaly: a band over all of [0, 1] -> always -1; Edema: threshold 0 -> always 1;
    # Pleural Effusion: threshold 1 -> 0 for any unsaturated probability.
    thresholds = Thresholds(LABELS, (0.5, 0.0, 1.0), "fixed", ((0.0, 1.0), (0.0, 0.0), (1.0, 1.0)))
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    return make_checkpoint(run / "checkpoints" / "best.safetensors", thresholds=thresholds)


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    return load_model([checkpoint], backend="torch", device="cpu")


def test_folder_three_valued_labels_blank_columns_and_studies(
    tiny_dataset: Path, model, tmp_path: Path
) -> None:
    summary = label_inputs([tiny_dataset / "train"], model, tmp_path, progress=False)
    n_images = len(list((tiny_dataset / "train").rglob("*.jpg")))
    labels = read_rows(tmp_path / "labels.csv")
    assert len(labels) == n_images == summary.labelled
    assert list(labels[0]) == ["Path", *OBSERVATIONS]
    for row in labels:
        assert (row["Cardiomegaly"], row["Edema"], row["Pleural Effusion"]) == (
            "-1.0",
            "1.0",
            "0.0",
        )
        assert all(row[o] == "" for o in OBSERVATIONS if o not in LABELS)
    probs = read_rows(tmp_path / "probabilities.csv")
    assert list(probs[0]) == ["Path", *LABELS]
    assert [r["Path"] for r in probs] == [r["Path"] for r in labels]
    assert all(0.0 < float(r["Edema"]) < 1.0 for r in probs)
    # Paths as given: the folder argument joined with the relative path, sorted.
    assert labels[0]["Path"].startswith(str(tiny_dataset / "train") + "/")
    assert [r["Path"] for r in labels] == sorted(r["Path"] for r in labels)
    # Study rows: one per patientN/studyM, the max over its films.
    studies = read_rows(tmp_path / "study_probabilities.csv")
    images = read_rows(tmp_path / "images.csv")
    expected = {r["study_id"] for r in images}
    assert {r["Path"] for r in studies} == expected and summary.studies == len(expected)
    by_study: dict[str, list[float]] = {}
    for img, p in zip(images, probs, strict=True):
        by_study.setdefault(img["study_id"], []).append(float(p["Edema"]))
    for row in studies:
        assert float(row["Edema"]) == pytest.approx(max(by_study[row["Path"]]), abs=1e-6)
        assert int(row["images"]) == len(by_study[row["Path"]])
    study_labels = read_rows(tmp_path / "study_labels.csv")
    assert {r["Cardiomegaly"] for r in study_labels} == {"-1.0"}
    assert {r["Fracture"] for r in study_labels} == {""}
    assert not (tmp_path / PARTIAL_DIR).exists()


def test_csv_input_keeps_its_paths_and_flags_laterals(
    tiny_dataset: Path, model, tmp_path: Path
) -> None:
    csv_path = tiny_dataset / "valid.csv"
    summary = label_inputs([csv_path], model, tmp_path, progress=False)
    source = read_rows(csv_path)
    images = read_rows(tmp_path / "images.csv")
    assert [r["Path"] for r in images] == [r["Path"] for r in source]
    lateral = [r for r in images if r["view"] == "lateral"]
    assert lateral and all(r["view_source"] == "csv" for r in images)
    assert all("no lateral model" in r["flag"] for r in lateral)
    assert all(r["flag"] == "" for r in images if r["view"] == "frontal")
    assert summary.flagged == len(lateral)


def test_lateral_model_labels_lateral_films(tiny_dataset: Path, model, tmp_path: Path) -> None:
    lateral_ckpt = make_checkpoint(tmp_path / "lat" / "c.safetensors", seed=3, labels=("Edema",))
    lateral = load_model([lateral_ckpt], backend="torch", device="cpu")
    summary = label_inputs(
        [tiny_dataset / "valid.csv"],
        model,
        tmp_path / "out",
        lateral_model=lateral,
        progress=False,
    )
    images = read_rows(tmp_path / "out" / "images.csv")
    probs = read_rows(tmp_path / "out" / "probabilities.csv")
    labels = read_rows(tmp_path / "out" / "labels.csv")
    assert summary.flagged == 0
    for img, p, y in zip(images, probs, labels, strict=True):
        if img["view"] == "lateral":
            assert img["labelled_by"] == "lateral model"
            # The lateral model predicts Edema only (fixed 0.5): the others are blank.
            assert p["Cardiomegaly"] == "" and y["Cardiomegaly"] == ""
            expected = lateral.predict_images([read_image(tiny_dataset / img["Path"])])[0, 0]
            assert float(p["Edema"]) == pytest.approx(float(expected), abs=1e-6)
            assert y["Edema"] == ("1.0" if expected >= 0.5 else "0.0")
        else:
            assert img["labelled_by"] == "model" and y["Cardiomegaly"] == "-1.0"


def test_bad_files_go_to_errors_and_the_rest_is_labelled(
    tiny_dataset: Path, model, tmp_path: Path
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    good = sorted((tiny_dataset / "valid").rglob("*.jpg"))
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"good{i}.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    data = good[0].read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    summary = label_inputs([folder], model, tmp_path / "out", batch_size=2, progress=False)
    errors = {Path(r["Path"]).name: r for r in read_rows(tmp_path / "out" / "errors.csv")}
    assert set(errors) == {"empty.png", "notes.jpg", "cut.jpg"}
    assert errors["empty.png"]["error"] == "EmptyImageError"
    assert errors["cut.jpg"]["error"] == "TruncatedImageError"
    assert all(r["reason"] for r in errors.values())
    labelled = {Path(r["Path"]).name for r in read_rows(tmp_path / "out" / "labels.csv")}
    assert labelled == {f"good{i}.jpg" for i in range(len(good))}
    assert (summary.labelled, summary.errors) == (len(good), 3)


def _outputs(folder: Path) -> dict[str, str]:
    return {name: (folder / name).read_text() for name in (*OUTPUT_FILES, "study_labels.csv")}


def test_resume_after_interruption_equals_an_uninterrupted_run(
    tiny_dataset: Path, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [tiny_dataset / "train", tiny_dataset / "valid"]
    label_inputs(inputs, model, tmp_path / "whole", batch_size=4, progress=False)
    reference = _outputs(tmp_path / "whole")

    out = tmp_path / "resumed"

    def stop_after_two(done: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_inputs(inputs, model, out, batch_size=4, progress=False, on_batch=stop_after_two)
    assert (out / PARTIAL_DIR / "state.json").is_file() and not (out / "labels.csv").exists()

    # Second interruption: rows of a batch appended but not committed (a crash between the
    # write and the state update) must be dropped on restart, not duplicated.
    real_commit = Journal.commit
    calls = {"n": 0}

    def crash_on_second_commit(self, state, files):
        calls["n"] += 1
        if calls["n"] == 2:
            for f in files:
                f.flush()
            raise KeyboardInterrupt
        real_commit(self, state, files)

    monkeypatch.setattr(Journal, "commit", crash_on_second_commit)
    with pytest.raises(KeyboardInterrupt):
        label_inputs(inputs, model, out, batch_size=4, progress=False)
    monkeypatch.setattr(Journal, "commit", real_commit)

    summary = label_inputs(inputs, model, out, batch_size=4, progress=False)
    assert summary.resumed_after == 12
    assert _outputs(out) == reference
    paths = [r["Path"] for r in read_rows(out / "labels.csv")]
    assert len(paths) == len(set(paths))


def test_restart_with_different_arguments_is_refused(
    tiny_dataset: Path, model, tmp_path: Path
) -> None:
    def stop(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_inputs(
            [tiny_dataset / "train"], model, tmp_path, batch_size=2, progress=False, on_batch=stop
        )
    with pytest.raises(ValueError, match=r"different arguments.*inputs"):
        label_inputs([tiny_dataset / "valid"], model, tmp_path, progress=False)
    other = load_model(
        [make_checkpoint(tmp_path / "o" / "c.safetensors", seed=9)], backend="torch", device="cpu"
    )
    with pytest.raises(ValueError, match=r"different arguments.*model"):
        label_inputs([tiny_dataset / "train"], other, tmp_path, progress=False)


def test_bf16_is_recorded_in_run_json_and_refused_on_an_fp32_resume(
    tiny_dataset: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """bf16 and fp32 probabilities differ (within the stated tolerance), so a run is never
    resumed in the other precision; run.json says which one labelled."""
    import json

    def stop(done: int) -> None:
        raise KeyboardInterrupt

    bf16 = load_model([checkpoint], backend="torch", device="cpu", precision="bf16")
    fp32 = load_model([checkpoint], backend="torch", device="cpu", precision="fp32")
    inputs = [tiny_dataset / "train"]
    with pytest.raises(KeyboardInterrupt):
        label_inputs(inputs, bf16, tmp_path, batch_size=2, progress=False, on_batch=stop)
    with pytest.raises(ValueError, match=r"different arguments.*model"):
        label_inputs(inputs, fp32, tmp_path, progress=False)
    label_inputs(inputs, bf16, tmp_path, batch_size=2, progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["model"]["precision"] == "bf16"
    # fp32 leaves the fingerprint as it was, so runs from before bf16 inference still resume.
    assert "precision" not in predict._model_fingerprint(fp32)


def test_missing_input_fails_before_labelling(model, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        label_inputs([tmp_path / "nope"], model, tmp_path / "out", progress=False)
    bad_csv = tmp_path / "x.csv"
    bad_csv.write_text("File\nfoo.png\n")
    with pytest.raises(ValueError, match="'Path' column"):
        label_inputs([bad_csv], model, tmp_path / "out2", progress=False)


def test_heatmaps_for_chosen_labels(tiny_dataset: Path, model, tmp_path: Path) -> None:
    summary = label_inputs(
        [tiny_dataset / "valid.csv"],
        model,
        tmp_path,
        heatmaps=True,
        heatmap_labels=["Edema", "Cardiomegaly"],
        progress=False,
    )
    images = read_rows(tmp_path / "images.csv")
    for row in images:
        folder = tmp_path / row["heatmaps"]
        assert {p.name for p in folder.iterdir()} == {
            "Edema.png",
            "Cardiomegaly.png",
            "contact_sheet.png",
        }
    assert summary.heatmaps == 3 * len(images)


def test_onnx_backend_matches_torch_probabilities(
    tiny_dataset: Path, checkpoint: Path, model, tmp_path: Path
) -> None:
    onnx_model = load_model([checkpoint], backend="onnx", device="cpu")
    assert type(onnx_model).__name__ == "OnnxModel"
    label_inputs([tiny_dataset / "valid"], model, tmp_path / "t", progress=False)
    label_inputs([tiny_dataset / "valid"], onnx_model, tmp_path / "o", progress=False)
    a = read_rows(tmp_path / "t" / "probabilities.csv")
    b = read_rows(tmp_path / "o" / "probabilities.csv")
    assert [r["Path"] for r in a] == [r["Path"] for r in b]
    diff = max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b, strict=True) for k in LABELS)
    assert diff < 1e-4
    assert read_rows(tmp_path / "t" / "labels.csv") == read_rows(tmp_path / "o" / "labels.csv")


DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_dicom_views_and_study_ids_from_tags(model, tmp_path: Path) -> None:
    import pydicom

    folder = tmp_path / "dicom"
    shutil.copytree(DICOM_FIXTURES, folder)
    # A lateral twin of the SIIM film: its ViewPosition tag says LL; and no file suffix.
    siim = next(folder.glob("siim_*.dcm"))
    ds = pydicom.dcmread(siim)
    ds.ViewPosition = "LL"
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(folder / "lateral_no_suffix")
    label_inputs([folder], model, tmp_path / "out", progress=False)
    images = {Path(r["Path"]).name: r for r in read_rows(tmp_path / "out" / "images.csv")}
    errors = read_rows(tmp_path / "out" / "errors.csv")
    assert len(images) + len(errors) == 4 and "lateral_no_suffix" in images
    lateral = images["lateral_no_suffix"]
    assert (lateral["view"], lateral["view_source"]) == ("lateral", "dicom")
    assert "no lateral model" in lateral["flag"]
    assert images[siim.name]["view"] == "frontal"
    assert images[siim.name]["study_id"] == str(ds.StudyInstanceUID)
    studies = read_rows(tmp_path / "out" / "study_probabilities.csv")
    siim_study = next(r for r in studies if r["Path"] == str(ds.StudyInstanceUID))
    # The SIIM film, its MONOCHROME1 twin and the lateral copy share one study.
    assert int(siim_study["images"]) == 3


def test_a_fresh_run_removes_old_heatmaps_and_a_resume_keeps_them(
    tiny_dataset: Path, model, tmp_path: Path
) -> None:
    inputs = [tiny_dataset / "valid.csv"]
    out = tmp_path / "out"
    label_inputs(inputs, model, out, heatmaps=True, heatmap_labels=["Edema"], progress=False)
    stale = out / predict.HEATMAP_DIR / "999999_old_run"
    stale.mkdir()
    (stale / "Edema.png").write_bytes(b"old")
    # A new (not resumed) run into the same folder: nothing of the old run's heatmaps is left.
    label_inputs(inputs, model, out, heatmaps=True, heatmap_labels=["Edema"], progress=False)
    assert not stale.exists()
    folders = {r["heatmaps"] for r in read_rows(out / "images.csv")}
    assert {p.relative_to(out).as_posix() for p in (out / "heatmaps").iterdir()} == folders
    label_inputs(inputs, model, out, progress=False)
    assert not (out / "heatmaps").exists()

    # A resume keeps the heatmaps its finished batches drew (images.csv points at them).
    def stop(done: int) -> None:
        raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        label_inputs(
            inputs, model, resumed, batch_size=1, heatmaps=True, progress=False, on_batch=stop
        )
    assert len(list((resumed / "heatmaps").iterdir())) == 1
    summary = label_inputs(inputs, model, resumed, batch_size=1, heatmaps=True, progress=False)
    assert summary.resumed_after == 1
    for row in read_rows(resumed / "images.csv"):
        assert (resumed / row["heatmaps"] / "contact_sheet.png").is_file()

    # A heatmaps/ folder in an --out that holds no earlier run is not ours to delete.
    theirs = tmp_path / "theirs"
    (theirs / "heatmaps").mkdir(parents=True)
    (theirs / "heatmaps" / "keep.txt").write_text("mine")
    label_inputs(inputs, model, theirs, progress=False)
    assert (theirs / "heatmaps" / "keep.txt").is_file()


def test_heatmap_films_are_kept_at_display_size_only(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "big.png"
    Image.fromarray(np.full((1500, 1200), 128, np.uint8)).save(path)
    item = InputItem(path, str(path))
    film = predict.read_film(0, item, None, True)
    assert film.pixels is not None and film.pixels.shape == (1500, 1200)
    assert film.display_image is not None
    assert film.display_image.shape == (predict.HEATMAP_MAX_SIDE, 819)
    assert predict.read_film(0, item, None, False).display_image is None


def test_a_fresh_run_without_studies_leaves_no_old_study_files(
    tiny_dataset: Path, model, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    label_inputs([tiny_dataset / "valid.csv"], model, out, progress=False)
    assert (out / "study_labels.csv").is_file()  # patientN/studyM paths give study rows
    flat = tmp_path / "flat"
    flat.mkdir()
    film = next((tiny_dataset / "valid").rglob("*.jpg"))
    shutil.copy(film, flat / "film.jpg")  # no patient/study layout: no study ids
    summary = label_inputs([flat], model, out, progress=False)
    assert summary.studies == 0 and summary.labelled == 1
    assert not (out / "study_labels.csv").exists()
    assert not (out / "study_probabilities.csv").exists()


def test_label_decodes_and_resizes_each_film_once_for_members_normalising_differently(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two members that resize alike but normalise differently: each film is decoded once and
    resampled once (as it is read), and the probabilities are the members' mean."""
    from PIL import Image

    from cxrlabel.data.transforms import Preprocessing

    paths = []
    for seed, (mean, std) in enumerate((((0.5,) * 3, (0.25,) * 3), ((0.2,) * 3, (0.5,) * 3))):
        torch.manual_seed(seed)
        net = create_model("tiny", "linear", LABELS, weights="none", size=48)
        net.preprocessing = Preprocessing(48, mean, std, "pad", "bilinear")
        path = tmp_path / f"m{seed}.safetensors"
        save_checkpoint(path, net, config={"name": f"m{seed}"}, epoch=0, step=0)
        paths.append(path)
    both = load_model(paths, backend="torch", device="cpu")
    films = sorted((tiny_dataset / "valid").rglob("*.jpg"))
    assert all(read_image(f).shape != (48, 48) for f in films)

    decodes = count_calls(monkeypatch, predict, "read_image_with_info")
    resamples = count_calls(monkeypatch, Image.Image, "resize")
    # read_timeout=None: read in this process, where the counters are (the reader child's
    # calls would be counted in its own memory).
    label_inputs(
        [tiny_dataset / "valid"], both, tmp_path / "out", batch_size=4, progress=False,
        read_timeout=None,
    )  # fmt: skip
    assert (decodes.n, resamples.n) == (len(films), len(films))
    monkeypatch.undo()

    rows = {r["Path"]: r for r in read_rows(tmp_path / "out" / "probabilities.csv")}
    singles = [load_model([p], backend="torch", device="cpu") for p in paths]
    images = [read_image(f) for f in films]
    expected = np.mean([m.predict_images(images) for m in singles], axis=0)
    got = np.array([[float(rows[str(f)][k]) for k in LABELS] for f in films])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_tta_probabilities_run_json_and_resume_fingerprint(
    tiny_dataset: Path, model, tmp_path: Path
) -> None:
    import json

    from cxrlabel.models.tta import TTAPredictor

    tta = TTAPredictor(model, 2)
    folder = tiny_dataset / "valid"
    summary = label_inputs([folder], tta, tmp_path, progress=False, heatmaps=True)
    probs = read_rows(tmp_path / "probabilities.csv")
    films = [read_image(Path(r["Path"])) for r in probs]
    expected, plain = tta.predict_images(films), model.predict_images(films)
    got = np.array([[float(r[k]) for k in LABELS] for r in probs])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, plain, atol=1e-6)  # TTA changed the probabilities
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["model"]["tta"] == 2 and run["model"]["kind"] == "single model, TTA x2"
    assert run["arguments"]["model"]["tta"] == 2 and summary.kind == "single model, TTA x2"
    assert "without the labels' 2-transform TTA" in run["heatmaps"]["model"]
    # Without TTA the fingerprint has no tta key (runs interrupted before --tta still resume).
    assert "tta" not in predict._model_fingerprint(model)
