import numpy as np
import pytest
from PIL import Image

from cxrlabel.cli import main
from tests.helpers import chexpert_csv


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
    args = ["demo", "--out", str(out), "--patients", "24", "--size", "64"]
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
    ):
        assert (out / name).is_file(), name
    # A second run into the same folder starts afresh instead of refusing the old run.
    assert main(args) == 0


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
    ]
    assert main(["train", "--preset", "tiny-cpu", "--run-dir", str(run), *overrides]) == 0
    assert "validation AUROC per label" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny-cpu", "--run-dir", str(run), *overrides]) == 2
    best = run / "checkpoints" / "best.safetensors"
    assert main(["evaluate", str(best), str(tiny_dataset / "valid.csv")]) == 0
    printed = capsys.readouterr().out
    assert "| Cardiomegaly |" in printed and "| Mean |" in printed
