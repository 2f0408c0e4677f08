import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlabel.cli import main
from tests.helpers import SHARED_DATA, chexpert_csv


def _rows():
    return [
        {
            "Path": "train/patient00001/study1/view1_frontal.png",
            "Frontal/Lateral": "Frontal",
            "Edema": "1.0",
            "Cardiomegaly": "-1.0",
        },
        {
            "Path": "train/patient00001/study1/view2_lateral.png",
            "Frontal/Lateral": "Lateral",
            "Edema": "1.0",
            "Cardiomegaly": "-1.0",
        },
        {
            "Path": "train/patient00002/study1/view1_frontal.png",
            "Frontal/Lateral": "Frontal",
            "Edema": "0.0",
        },
    ]


def test_stats_writes_both_tables(tmp_path, capsys):
    csv = chexpert_csv(tmp_path / "train.csv", _rows())
    out = tmp_path / "stats"
    assert main(["stats", str(csv), "--by", "both", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 studies" in printed and "3 images" in printed
    assert (
        "| Edema | 1 (50.00) | 0 (0.00) | 1 (50.00) |" in (out / "train_study_all.md").read_text()
    )
    assert "Edema,2,66.67,0,0.00,1,33.33" in (out / "train_image_all.csv").read_text()


def test_stats_bad_label_is_a_clear_error(tmp_path, caplog):
    rows = _rows()
    rows[2]["Edema"] = "maybe"
    csv = chexpert_csv(tmp_path / "train.csv", rows)
    assert main(["stats", str(csv), "--out", str(tmp_path)]) == 2
    assert "line 4, column 'Edema'" in caplog.text


def test_prepare_skips_and_reports_bad_image(tmp_path, capsys):
    csv = chexpert_csv(tmp_path / "train.csv", _rows())
    for row in _rows()[:2]:
        path = tmp_path / row["Path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30), 99, np.uint8)).save(path)
    cache = tmp_path / "cache"
    assert main(["prepare", str(csv), "--size", "16", "--out", str(cache), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 images at 16 px, 1 skipped" in printed
    assert "patient00002/study1/view1_frontal.png: file does not exist" in printed


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    # Real fixture films are labelled too where ../shared/data exists (none otherwise).
    real = sorted((SHARED_DATA / "fixtures" / "nih_320").glob("*.jpg"))
    also = [str(real[0].parent)] if real else []
    args = ["demo", "--out", str(out), "--patients", "24", "--size", "64", "--also-label", *also]
    args += ["--real-data", ""]  # the real-film step has its own test
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    for model in ("Tiny_1", "Tiny_3", "Tiny_3_D", "MobileNet_1", "MobileNet_3", "MobileNet_3_D"):
        assert f"| {model} |" in printed
    assert "| Pleural Effusion |" in printed and "| Mean |" in printed
    for name in (
        "report.txt",
        "contact_sheet.png",
        "stats/train_study.md",
        "sweep.md",
        "finetune_metrics.md",
        "runs/finetune-tiny/plots/loss.png",
        "runs/finetune-tiny/checkpoints/best.safetensors",
        "runs/finetune-tiny/report/report.md",
        "runs/finetune-tiny/report/report.html",
        "runs/finetune-tiny/report/evaluation.json",
    ):
        assert (out / name).is_file(), name
    # The report's paths are printed; it covers images and studies.
    assert str(out / "runs/finetune-tiny/report/report.html") in printed
    row = "| validation (per image, frontal) | Tiny_1 (finetune-tiny) | single model | image |"
    assert row in printed
    assert "| validation (per study, max over all views) |" in printed
    assert "| study (max) |" in printed
    assert "200 bootstrap resamples" in printed
    # It ends by labelling the synthetic validation films (and a folder of real ones here).
    assert str(out / "labels" / "labels.csv") in printed
    labels = pd.read_csv(out / "labels" / "labels.csv")
    films = sorted((out / "data" / "valid").rglob("*.jpg"))
    assert len(labels) == len(films) + len(real)
    assert set(labels["Cardiomegaly"].dropna()) <= {0.0, 1.0, -1.0}
    assert labels["Fracture"].isna().all()  # not predicted by this model: blank
    assert list((out / "labels" / "heatmaps").rglob("contact_sheet.png"))
    # A second run into the same folder starts afresh instead of refusing the old run.
    assert main([*args[: args.index("--also-label") + 1]]) == 0
    assert len(pd.read_csv(out / "labels" / "labels.csv")) == len(films)


def test_split_command(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "split.csv"
    args = ["split", str(tiny_dataset / "train.csv"), "--valid-fraction", "0.3", "--out", str(out)]
    assert main(args) == 0
    assert "disjoint" in capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "patient_id,split" and {r.split(",")[1] for r in rows[1:]} == {
        "train",
        "valid",
    }


def test_train_then_evaluate(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        f"train_csv={tiny_dataset / 'train.csv'}",
        f"valid_csv={tiny_dataset / 'valid.csv'}",
        "size=64",
        "epochs=1",
        "require_certain=false",
        "device=cpu",
        "precision=fp32",
    ]
    assert main(["train", "--preset", "tiny-cpu", "--run-dir", str(run), *overrides]) == 0
    assert "validation AUROC per label" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny-cpu", "--run-dir", str(run), *overrides]) == 2
    capsys.readouterr()
    best = run / "checkpoints" / "best.safetensors"
    data = ["--data", str(tiny_dataset / "valid.csv"), "--data", str(tiny_dataset / "train.csv")]
    evaluate = ["evaluate", "--model", str(best), *data, "--bootstrap", "20", "--device", "cpu"]
    assert main(evaluate) == 0
    printed = capsys.readouterr().out
    assert "| Cardiomegaly |" in printed and "| Mean |" in printed
    assert "| validation | Tiny_1" in printed and "| test | Tiny_1" in printed
    # The report goes to the run folder of the checkpoint, with the numbers beside it.
    report = run / "report"
    for name in ("report.md", "report.html", "evaluation.json"):
        assert (report / name).is_file(), name
        assert str(report / name) in printed
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html
    saved = json.loads((report / "evaluation.json").read_text())
    assert [e["dataset"] for e in saved["evaluations"]] == ["validation", "test"]
    assert all(e["unit"] == "image" and e["n_resamples"] == 20 for e in saved["evaluations"])


def test_evaluate_study_level_ensemble_with_out(tiny_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "report"
    args = [
        "evaluate", "--model", f"{tiny_run.run_dir}:best2", "--data",
        f"train={tiny_dataset / 'train.csv'}", "--unit", "study", "--view", "all",
        "--bootstrap", "20", "--out", str(out), "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| train | Tiny_1 (tiny-run) | ensemble of 2 checkpoints | study (max) |" in printed
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    record = json.loads((out / "evaluation.json").read_text())["evaluations"][0]
    assert record["unit"] == "study" and record["aggregate"] == "max"
    assert record["kind"] == "ensemble of 2 checkpoints"


def test_evaluate_outside_a_run_needs_out(tiny_run, tiny_dataset, tmp_path, caplog):
    loose = tmp_path / "model"
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_run.run_dir / "checkpoints" / f"best{suffix}", f"{loose}{suffix}")
    args = ["evaluate", "--model", f"{loose}.safetensors", "--data", str(tiny_dataset / "a.csv")]
    assert main(args) == 2
    assert "give --out" in caplog.text


def _threshold_cells(printed: str, label: str) -> list[str]:
    """The Threshold column of `label`'s rows in printed per-label tables."""
    return [line.split("|")[2].strip() for line in printed.splitlines() if line.startswith(
        f"| {label} |"
    )]  # fmt: skip


def test_thresholds_command_changes_later_evaluations(tiny_run, tiny_dataset, tmp_path, capsys):
    run = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    data = ["--data", str(tiny_dataset / "train.csv")]
    evaluate = ["evaluate", "--model", str(run), *data, "--bootstrap", "10", "--device", "cpu"]
    assert main(evaluate) == 0
    before = capsys.readouterr().out
    assert "thresholds fixed" in before
    assert set(_threshold_cells(before, "Pleural Effusion")) == {"0.500"}

    thresholds = ["thresholds", str(run), *data, "--rule", "max_f1", "--band", "0.05"]
    assert main([*thresholds, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "stored max_f1 thresholds chosen on synthetic train.csv" in printed
    assert "uncertain in [" in printed
    meta = json.loads((run / "checkpoints" / "best.json").read_text())
    assert meta["thresholds"]["rule"] == "max_f1"

    assert main(evaluate) == 0
    after = capsys.readouterr().out
    assert "thresholds max_f1, with an uncertainty band" in after
    stored = meta["thresholds"]["values"]
    cells = _threshold_cells(after, "Pleural Effusion")
    assert cells == [f"{stored['Pleural Effusion']:.3f}"]
    assert any(f"{v:.3f}" != "0.500" for v in stored.values())


def test_compare_prints_a_row_per_run(tiny_run, tmp_path, capsys):
    other = shutil.copytree(tiny_run.run_dir, tmp_path / "second-run")
    out = tmp_path / "compare.md"
    assert main(["compare", str(tiny_run.run_dir), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Run | Model | Epochs | Best epoch |")
    assert "Accuracy | Precision | Recall | F1 | AUROC |" in rows[0]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["tiny-run", "second-run"]
    assert out.read_text() in printed
    assert main(["compare", str(tmp_path)]) == 2  # not a run folder


def test_evaluate_label_output_as_predictions_with_a_rule(tiny_run, tiny_dataset, tmp_path, capsys):
    """`cxrlabel label`'s probabilities.csv scores against the labels like the model itself,
    side by side with it in one report; --rule chooses thresholds for that report only."""
    labelled = tmp_path / "labelled"
    csv = tiny_dataset / "train.csv"
    assert main(["label", str(csv), "--model", str(tiny_run.run_dir), "--out", str(labelled),
                 "--backend", "torch", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(tiny_run.run_dir), "--predictions",
            f"labelled={labelled / 'probabilities.csv'}", "--data", str(csv), "--view", "all",
            "--bootstrap", "20", "--out", str(out), "--device", "cpu",
            "--rule", "youden"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    records = json.loads((out / "evaluation.json").read_text())["evaluations"]
    assert [r["model"] for r in records] == ["Tiny_1 (tiny-run)", "labelled"]
    model, labelled_record = ({r["Label"]: r for r in rec["labels"]} for rec in records)
    for label, row in model.items():
        if row["AUROC"] is not None:
            assert labelled_record[label]["AUROC"] == pytest.approx(row["AUROC"], abs=1e-5)
    assert records[0]["thresholds"]["rule"] == "youden" and "thresholds youden" in printed
    assert (out / "report.html").is_file()


@pytest.mark.skipif(
    not (SHARED_DATA / "kermany-pneumonia").is_dir(),
    reason="needs ../shared/data/kermany-pneumonia",
)
def test_demo_real_film_step_trains_heads_on_real_films_and_labels_them(tmp_path):
    from cxrlabel.demo import real_film_step

    text = real_film_step(SHARED_DATA, tmp_path, seed=0, patients=24)
    assert text.startswith("## REAL DATA")
    for model in ("Xception_1", "Xception_3", "Xception_3_D"):
        assert f"| {model} |" in text
    valid = pd.read_csv(tmp_path / "valid_films.csv")
    probs = pd.read_csv(tmp_path / "labels" / "probabilities.csv")
    labels = pd.read_csv(tmp_path / "labels" / "labels.csv")
    assert len(probs) == len(labels) == len(valid) > 0
    assert list(probs.columns) == ["Path", "Pneumonia"]
    assert probs["Pneumonia"].between(0, 1).all() and probs["Pneumonia"].nunique() > 1
    assert set(labels["Pneumonia"]) <= {0.0, 1.0}


def test_label_and_evaluate_with_tta_record_it(tiny_run, tiny_dataset, tmp_path, capsys, caplog):
    """--tta 2 averages two transforms of each film; label's run.json and evaluate's
    evaluation.json say so, and label's probabilities score like evaluate's own."""
    csv = tiny_dataset / "valid.csv"
    model = str(tiny_run.run_dir)
    labelled = tmp_path / "labelled"
    assert main(["label", str(csv), "--model", model, "--out", str(labelled), "--tta", "2",
                 "--backend", "torch", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    assert "TTA x2" in capsys.readouterr().out
    run = json.loads((labelled / "run.json").read_text())
    assert run["model"]["tta"] == 2 and run["model"]["tta_transforms"] == ["identity", "zoom 1.05"]
    assert run["summary"]["kind"] == "single model, TTA x2"

    out = tmp_path / "report"
    args = ["evaluate", "--model", model, "--data", str(csv), "--view", "all", "--bootstrap",
            "10", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert (
        main([*args, "--tta", "2", "--predictions", f"labelled={labelled / 'probabilities.csv'}"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "| single model, TTA x2 |" in printed
    tta_record, from_label = json.loads((out / "evaluation.json").read_text())["evaluations"]
    assert tta_record["tta"] == 2 and tta_record["kind"] == "single model, TTA x2"
    assert from_label["tta"] == 1  # a predictions file: nothing known about its TTA
    by_label = {r["Label"]: r for r in from_label["labels"]}
    scored = [row for row in tta_record["labels"] if row["AUROC"] is not None]
    assert scored
    for row in scored:
        assert by_label[row["Label"]]["AUROC"] == pytest.approx(row["AUROC"], abs=1e-5)

    assert main(args) == 0  # without --tta: no TTA
    capsys.readouterr()
    plain = json.loads((out / "evaluation.json").read_text())["evaluations"][0]
    assert plain["tta"] == 1 and plain["kind"] == "single model"
    assert main([*args, "--tta", "0"]) == 2 and "--tta must be between 1 (off)" in caplog.text
    assert (
        main(["label", str(csv), "--model", model, "--out", str(tmp_path / "x"), "--tta", "50"])
        == 2
    )


DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_label_dicom_out_keeps_patient_data_out_of_logs_errors_and_run_json(
    tmp_path, capsys, caplog
):
    """Issue 13 section 5: the fixtures' patient names, ids and birth dates appear in the SR
    (patient data by design) but in no log line, errors.csv or run.json."""
    import logging

    import pydicom

    from tests.labelling.test_batch import make_checkpoint

    folder = tmp_path / "dicom"
    shutil.copytree(DICOM_FIXTURES, folder)
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # into errors.csv
    checkpoint = make_checkpoint(tmp_path / "r" / "checkpoints" / "best.safetensors")
    out, dicom_out = tmp_path / "out", tmp_path / "dicom-out"
    caplog.set_level(logging.DEBUG)
    assert main(["label", str(folder), "--model", str(checkpoint), "--out", str(out),
                 "--dicom-out", str(dicom_out), "--heatmaps", "--backend", "torch",
                 "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    secrets = set()
    for fixture in DICOM_FIXTURES.glob("*.dcm"):
        ds = pydicom.dcmread(fixture, stop_before_pixels=True)
        secrets |= {str(ds.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate")}
    secrets.discard("")
    assert len(secrets) >= 4
    srs = list(dicom_out.rglob("sr-*.dcm"))
    assert len(srs) == 2 and list(dicom_out.rglob("sc-*.dcm"))
    assert any(str(pydicom.dcmread(p).PatientID) in secrets for p in srs)  # the SR has them
    errors = (out / "errors.csv").read_text()
    assert "broken.dcm" in errors
    texts = {
        "log": caplog.text,
        "stdout": printed.out,
        "stderr": printed.err,
        "errors.csv": errors,
        "run.json": (out / "run.json").read_text(),
    }
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{where} names a patient ({secret[:3]}...)"


def test_listen_answers_echo_and_stops_cleanly_on_sigterm(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from pynetdicom import AE

    from tests.labelling.test_batch import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "r" / "checkpoints" / "best.safetensors")
    with socket.socket() as s:  # a port free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "cxrlabel", "listen", "--model", str(checkpoint)]
    command += ["--port", str(port), "--out", str(tmp_path / "node"), "--backend", "torch"]
    proc = subprocess.Popen(
        [*command, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=os.environ.copy(),
    )  # fmt: skip
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        deadline, echoed = time.monotonic() + 60, False
        while not echoed and time.monotonic() < deadline and proc.poll() is None:
            assoc = ae.associate("127.0.0.1", port, ae_title="CXRLABEL")
            if assoc.is_established:
                echoed = int(assoc.send_c_echo().Status) == 0
                assoc.release()
            else:
                time.sleep(0.2)
        assert echoed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        output = proc.stdout.read()
        assert f"CXRLABEL listening on 127.0.0.1:{port}" in output and "stopped" in output
    finally:
        proc.kill()
        proc.wait()
