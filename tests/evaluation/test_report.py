"""Evaluation reports: every section, the paper comparison, n/a labels, band, banner, no
external references, Markdown links to PNGs that exist, and (where Chromium is installed) that
a browser shows every table and image."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cxrlabel.data.formats import load_table
from cxrlabel.data.stats import label_stats
from cxrlabel.evaluation.metrics import Evaluation, evaluate_predictions
from cxrlabel.evaluation.report import PAPER_AUROC, column_names, write_report
from cxrlabel.evaluation.results import Predictions
from cxrlabel.evaluation.tables import fmt, fmt_ci
from cxrlabel.models.run_folder import write_metrics
from cxrlabel.models.thresholds import Thresholds

LABELS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion", "Fracture")
SECTIONS = (
    "What these data are",
    "Summary",
    "AUROC per label with 95% confidence intervals",
    "Comparison with the CheXpert paper",
    "All metrics per label",
    "ROC and precision-recall curves",
    "Calibration (reliability diagram)",
    "Training loss curves",
    "Label statistics of the evaluated data",
)
CHROMIUM = Path("/usr/bin/chromium")


def make_predictions(
    seed: int,
    *,
    model: str = "Tiny_1",
    synthetic: bool = True,
    band: float | None = None,
    n: int = 80,
) -> Predictions:
    """Random but informative scores; Fracture has negatives only (AUROC n/a)."""
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, len(LABELS))) < 0.35).astype(float)
    y_true[:, -1] = 0.0
    y_score = np.clip(0.3 * y_true + 0.7 * rng.random(y_true.shape), 0.0, 1.0)
    mask = rng.random(y_true.shape) > 0.1
    thresholds = Thresholds.fixed(LABELS, 0.5)
    if band is not None:
        thresholds = thresholds.with_band(band)
    studies = [f"s{i // 2}" for i in range(n)]  # two views per study
    return Predictions(
        labels=LABELS,
        paths=tuple(f"img{i}.jpg" for i in range(n)),
        patient_ids=tuple(f"p{i // 4}" for i in range(n)),
        study_ids=tuple(studies),
        y_score=y_score,
        y_true=y_true,
        mask=mask,
        thresholds=thresholds,
        model=model,
        kind="single model",
        data="synthetic valid.csv" if synthetic else "real films",
        synthetic=synthetic,
    )


def evaluations(synthetic: bool = True, labels: tuple[str, ...] = LABELS[:3]) -> list[Evaluation]:
    """Two small evaluations (three labels: fewer panels keep the figures quick)."""
    preds = [make_predictions(seed, synthetic=synthetic).subset_labels(labels) for seed in (1, 2)]
    return [evaluate_predictions(pred, n_resamples=100) for pred in preds]


def fake_run(root: Path) -> Path:
    """A run folder with a metrics.csv in cxrlabel.models.run_folder's layout."""
    run = root / "run-a"
    rows = [
        {"kind": "step", "epoch": e, "step": 3 * e + s, "train_loss": 1.0 / (3 * e + s + 1)}
        for e in range(2)
        for s in range(3)
    ]
    rows += [
        {"kind": "epoch", "epoch": e, "step": 3 * e + 2, "train_loss": 0.5 - 0.1 * e,
         "val_loss": 0.6 - 0.05 * e}
        for e in range(2)
    ]  # fmt: skip
    write_metrics(run / "metrics.csv", rows)
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict:
    out = tmp_path_factory.mktemp("report")
    evals = [
        evaluate_predictions(make_predictions(1), n_resamples=100),
        evaluate_predictions(make_predictions(2, band=0.1), n_resamples=100),
    ]
    stats = label_stats(load_table(tiny_dataset / "valid.csv"), "study")
    md, page = write_report(
        evals,
        out / "reports",
        title="Tiny model on synthetic data",
        dataset_names=["validation", "test"],
        run_dirs=[fake_run(out)],
        label_stats=stats,
    )
    return {"md": md, "html": page, "evals": evals, "stats": stats}


def test_writes_both_files_with_every_section(report: dict) -> None:
    md, page = report["md"].read_text(), report["html"].read_text()
    assert report["md"].name == "report.md" and report["html"].name == "report.html"
    for title in SECTIONS:
        assert f"## {title}" in md, title
        assert f"<h2>{title}</h2>" in page.replace("&#x27;", "'"), title


def test_summary_has_one_row_per_evaluation_with_the_means(report: dict) -> None:
    md = report["md"].read_text()
    for evaluation, dataset in zip(report["evals"], ["validation", "test"], strict=True):
        mean = evaluation.table[evaluation.table["Label"] == "Mean"].iloc[0]
        ci = evaluation.ci[evaluation.ci["Label"] == "Mean"].iloc[0]
        auroc = fmt_ci(mean["AUROC"], ci["Low"], ci["High"])
        row = next(
            line
            for line in md.splitlines()
            if line.startswith(f"| Tiny_1 | single model | {dataset} |")
        )
        assert auroc in row
        assert f"| {fmt(mean['Accuracy'])} |" in row and f"| {fmt(mean['F1'])} |" in row
        assert "| image | 80 |" in row


def test_paper_values_and_different_dataset_marking(report: dict) -> None:
    md, page = report["md"].read_text(), report["html"].read_text()
    for label, value in PAPER_AUROC.items():
        line = next(x for x in md.splitlines() if x.startswith(f"| {label} | {value:.3f} |"))
        assert line.count("[") == 2  # both evaluations with their CIs
    assert "DIFFERENT DATASET" in md and "DIFFERENT DATASET" in page
    assert "validation (different dataset)" in md
    assert "ensemble of 30 checkpoints" in md


def test_one_class_label_is_na_and_left_out_of_the_mean(report: dict) -> None:
    md = report["md"].read_text()
    assert "AUROC is n/a for Fracture" in md and "left out of the mean AUROC" in md
    assert "only negatives" in md
    fracture = next(x for x in md.splitlines() if x.startswith("| Fracture |"))
    assert "n/a" in fracture
    table = report["evals"][0].table
    defined = table[(table["Label"] != "Mean") & (table["Label"] != "Fracture")]["AUROC"]
    mean = float(table[table["Label"] == "Mean"]["AUROC"].iloc[0])
    assert mean == pytest.approx(defined.mean())


def test_band_section_counts_predictions_in_the_band(report: dict) -> None:
    md = report["md"].read_text()
    assert "## Uncertainty band" in md
    band = report["evals"][1].band
    row = band[band["Label"] == "Edema"].iloc[0]
    line = next(x for x in md.splitlines() if x.startswith("| Edema | [0.40, 0.60) |"))
    assert f"| {int(row['In band'])} | {row['In band %']:.1f} |" in line


def test_synthetic_banner_and_data_description(report: dict) -> None:
    md, page = report["md"].read_text(), report["html"].read_text()
    assert "SYNTHETIC DATA" in md and '<div class="banner">SYNTHETIC DATA' in page
    assert "synthetic valid.csv. SYNTHETIC (built-in generated radiographs); unit: image; " in md
    assert "80 images of 20 patients; 6 labels" in md
    assert (
        "- test (Tiny_1): single model; thresholds fixed at 0.50, with an uncertainty band." in md
    )


def test_html_is_self_contained(report: dict) -> None:
    page = report["html"].read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # ROC, PR, reliability, loss
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<link" not in page and "<script" not in page
    # Internal anchors only, and each points at a section that exists.
    for target in re.findall(r'href="([^"]*)"', page):
        assert target.startswith("#") and f'id="{target[1:]}"' in page


def test_markdown_links_existing_pngs(report: dict) -> None:
    md = report["md"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(links) == {"roc_curves.png", "pr_curves.png", "reliability.png", "loss.png"}
    for link in links:
        png = report["md"].parent / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_statistics_in_table1_layout(report: dict) -> None:
    md = report["md"].read_text()
    assert report["stats"].title() in md
    first = report["stats"].formatted().iloc[0]
    assert f"| {first['Pathology']} | {first['Positive (%)']} |" in md


def test_same_dataset_as_the_paper_and_real_data(tmp_path: Path) -> None:
    evals = evaluations(synthetic=False)
    md, page = write_report(evals, tmp_path, title="On CheXpert valid", chexpert_valid=True)
    text = md.read_text()
    assert "DIFFERENT DATASET" not in text and "(different dataset)" not in text
    assert "Same dataset as the paper" in text
    assert "SYNTHETIC" not in text and 'class="banner"' not in page.read_text()
    assert "## Uncertainty band" not in text  # no band set
    assert "No training run folder was given" in text
    assert "Label statistics were not given" in text


def test_models_side_by_side_named_by_model(tmp_path: Path) -> None:
    preds = [
        make_predictions(1, model=name).subset_labels(LABELS[:3])
        for name in ("Xception_1", "DenseNet")
    ]
    preds[1] = preds[1].replace(kind="external predictions", synthetic=False, data="real films")
    evals = [evaluate_predictions(p, n_resamples=100) for p in preds]
    assert column_names(evals, ["nih", "nih"]) == ["Xception_1", "DenseNet"]
    md, _ = write_report(evals, tmp_path, title="Side by side", dataset_names=["nih", "nih"])
    text = md.read_text()
    assert "| Label | Xception_1: AUROC | Xception_1: 95% CI |" in text
    assert "| DenseNet | external predictions |" in text
    assert "SYNTHETIC DATA: the numbers of Xception_1 were measured" in text


def test_study_level_unit_is_stated(tmp_path: Path) -> None:
    pred = make_predictions(4).subset_labels(LABELS[:2]).to_study_level("max")
    md, _ = write_report([evaluate_predictions(pred, n_resamples=100)], tmp_path, title="S")
    text = md.read_text()
    assert "unit: study (max over its images); 40 studies of 20 patients; 2 labels" in text
    assert (
        "| Tiny_1 | single model | synthetic valid.csv | study (max over its images) | 40 |" in text
    )


def test_text_is_escaped_in_html(tmp_path: Path) -> None:
    pred = make_predictions(3, model="<script>alert(1)</script>").subset_labels(LABELS[:2])
    _, page = write_report([evaluate_predictions(pred, n_resamples=100)], tmp_path, title="a<b")
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<title>a&lt;b</title>" in text


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    evals = evaluations()
    with pytest.raises(ValueError, match="1 dataset name"):
        write_report(evals, tmp_path, title="x", dataset_names=["only one"])
    with pytest.raises(ValueError, match="at least one evaluation"):
        write_report([], tmp_path, title="x")
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv"):
        write_report(evals, tmp_path / "out", title="x", run_dirs=[tmp_path / "nowhere"])
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed")
def test_browser_shows_every_table_and_image(report: dict) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(report["html"].resolve().as_uri())
            loaded = page.eval_on_selector_all(
                "img", "els => els.map(e => e.complete && e.naturalWidth > 0)"
            )
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.innerText)")
            tables = page.eval_on_selector_all("table", "els => els.map(e => e.offsetHeight)")
        finally:
            browser.close()
    assert loaded == [True] * 4
    assert [h for h in headings if h in SECTIONS] == list(SECTIONS)
    assert len(tables) >= 8 and all(h > 0 for h in tables)
