"""The main job on built-in data: synthesise -> describe -> frozen-feature sweep -> fine-tune ->
evaluate -> report, on synthetic radiographs, in a few minutes on a laptop CPU.

Everything is written under one output folder; the returned text is what `demo` prints. No
weights are downloaded: the sweep's backbones are randomly initialised here, which the report
says plainly. The fine-tuned model's evaluation report (report.md and a self-contained
report.html) goes into its run folder, `runs/finetune-tiny/report/`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cxrlabel.config import HeadConfig, build_config
from cxrlabel.csvcells import frame_csv
from cxrlabel.data.formats import load_table
from cxrlabel.data.splits import load_split
from cxrlabel.data.stats import label_stats
from cxrlabel.evaluation.report import write_report
from cxrlabel.evaluation.scoring import predict_datasets, score_predictions
from cxrlabel.evaluation.tables import format_evaluations, save_evaluations
from cxrlabel.fileio import atomic_write_text
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.predictor import load_model
from cxrlabel.models.run_folder import RunFolder
from cxrlabel.synth import contact_sheet, write_dataset
from cxrlabel.training.finetune import train
from cxrlabel.training.heads import format_sweep_table, run_sweep

log = logging.getLogger(__name__)

BANNER = (
    "cxrlabel demo — every film below is a SYNTHETIC radiograph drawn by cxrlabel's own\n"
    "generator, not a patient. Real-film checks live in benchmarks/.\n"
)

# Two backbones x the method's three heads, each at its default size (the tiny CNN's native
# 128 px, MobileNet the method's 224).
SWEEP_BACKBONES = ("tiny", "mobilenet")
# Bootstrap resamples for the demo's AUROC intervals: fewer than the CLI's 1000 to keep the
# demo short; the report states the number used.
DEMO_RESAMPLES = 200


def run_demo(
    out: Path,
    *,
    patients: int = 300,
    size: int = 128,
    seed: int = 0,
    also_label: Sequence[Path] = (),
    real_data: Path | None = None,
) -> str:
    """Run the demo into `out` and return the report text.

    The trained model finally labels the synthetic validation films and every folder in
    `also_label` (e.g. the real fixtures in ../shared/data/fixtures), with heatmaps. With
    `real_data` (a ../shared/data folder holding the Kermany films and the offline Xception
    weights) a last, clearly marked step runs approach 1 on a few hundred real films.
    """
    out = Path(out)
    data = out / "data"
    write_dataset(data, patients=patients, size=size, seed=seed)
    train_csv, valid_csv = data / "train.csv", data / "valid.csv"
    parts = [BANNER, f"## Data: {patients} synthetic patients at {size} px\n"]
    for unit in ("study", "image"):
        stats = label_stats(load_table(train_csv), unit=unit)
        parts.append(stats.to_text())
        atomic_write_text(out / "stats" / f"train_{unit}.md", stats.to_markdown())
    sheet = contact_sheet(data, out / "contact_sheet.png")
    parts.append(f"contact sheet of the films: {sheet}\n")

    parts.append(
        "## Approach 1: frozen backbone + feed-forward head (five competition labels, "
        "frontal films with a certain label, U-Ignore)\n"
        "Backbones are randomly initialised (no downloads here): this shows the machinery; "
        "run `cxrlabel sweep --preset table1-heads` for the real experiment.\n"
    )
    heads_config = HeadConfig.build(
        None,
        {
            "name": "heads", "train_csv": str(train_csv), "valid_csv": str(valid_csv),
            "backbones": SWEEP_BACKBONES, "weights": "none", "view": "frontal", "epochs": 30,
            "seed": seed,
        },
    )  # fmt: skip
    heads_dir = out / "runs" / "heads"
    shutil.rmtree(heads_dir, ignore_errors=True)  # a second demo run starts afresh
    sweep = format_sweep_table(run_sweep(heads_config, heads_dir, progress=False))
    atomic_write_text(out / "sweep.md", sweep)
    parts.append(sweep)

    parts.append("## Approach 2: end-to-end fine-tuning (tiny CNN, tiny-cpu preset)\n")
    config = build_config(
        "tiny-cpu",
        {
            "name": "finetune-tiny",
            "train_csv": str(train_csv),
            "valid_csv": str(valid_csv),
            "epochs": 6,
            "lr_schedule": "cosine",
            "select_best": "val_auroc",
            "seed": seed,
            "runs_dir": str(out / "runs"),
        },
    )
    # The demo owns its output folder: a rerun (maybe with other data) trains afresh.
    shutil.rmtree(Path(config.runs_dir) / config.name, ignore_errors=True)
    result = train(config)
    parts.append(f"run folder: {result.run_dir} (loss plot: plots/loss.png)\n")
    parts.append(evaluate_finetuned(result.run_dir, valid_csv, config.view, seed=seed, out=out))
    parts.append(label_films(result.run_dir, [data / "valid", *also_label], out / "labels"))
    if real_data is not None:
        parts.append(real_film_step(real_data, out / "real", seed=seed))
    report = "\n".join(parts)
    atomic_write_text(out / "report.txt", report)
    return report


REAL_BANNER = (
    "## REAL DATA: frozen ImageNet Xception + a head on real paediatric chest films\n"
    "These are real patients' films (Kermany et al. 2018, CC BY 4.0; {films} films of {patients} "
    "children, pneumonia vs normal), split by patient. The full-scale run is "
    "benchmarks/real_kermany.py.\n"
)
REAL_PATIENTS = 200  # about 400 films: a minute of Xception features on two cores


def real_film_step(shared: Path, out: Path, *, seed: int, patients: int = REAL_PATIENTS) -> str:
    """Approach 1 on `patients` Kermany patients: frozen Xception (the offline Keras weights)
    at the method's 220 px, the three heads, thresholds by Youden on a patient split; the best
    head labels the validation films."""
    kermany = shared / "kermany-pneumonia" / "labels.csv"
    weights = shared / "weights" / "legacy_xception_imagenet_keras.safetensors"
    frame = pd.read_csv(kermany)
    chosen = frame["Patient ID"].drop_duplicates().sample(patients, random_state=seed)
    subset = frame[frame["Patient ID"].isin(chosen)].copy()
    subset["Path"] = [str((kermany.parent / p).resolve()) for p in subset["Path"]]
    out.mkdir(parents=True, exist_ok=True)
    subset_csv = out / "kermany_subset.csv"
    atomic_write_text(subset_csv, frame_csv(subset, index=False))
    config = HeadConfig.build(
        None,
        {
            "name": "real-heads", "train_csv": str(subset_csv), "labels": "Pneumonia",
            "view": "all", "backbones": ["xception"], "weights": str(weights), "size": 220,
            "keras_compat": True, "threshold_rule": "youden", "valid_fraction": 0.25,
            "epochs": 30, "seed": seed,
            # The subset CSV names the shared films by absolute path, outside its own folder.
            "allow_outside_paths": True,
        },
    )  # fmt: skip
    run_dir = out / "runs" / config.name
    shutil.rmtree(run_dir, ignore_errors=True)
    sweep = run_sweep(config, run_dir, progress=False)
    best = sweep.loc[sweep["AUROC"].idxmax()]
    _, valid = load_split(RunFolder(run_dir).split).apply(
        load_table(subset_csv, allow_outside_paths=True)
    )
    films = out / "valid_films.csv"
    atomic_write_text(films, frame_csv(pd.DataFrame({"Path": valid.frame["Path"]}), index=False))
    labelled = label_films(
        run_dir / best["Checkpoint"], [films], out / "labels", allow_outside_paths=True
    )
    return (
        REAL_BANNER.format(films=len(subset), patients=patients)
        + "validation split, thresholds chosen on it (Youden):\n\n"
        + format_sweep_table(sweep)
        + f"\nbest: {best['Model']}\n"
        + labelled
    )


def label_films(
    model_path: Path, inputs: Sequence[Path], out: Path, *, allow_outside_paths: bool = False
) -> str:
    """What users come for: label folders of films with the trained model, with heatmaps."""
    # The demo owns its output folder: a rerun labels afresh rather than resuming.
    shutil.rmtree(out, ignore_errors=True)
    model = load_model([model_path])
    summary = label_inputs(
        inputs, model, out, heatmaps=True, progress=False, allow_outside_paths=allow_outside_paths
    )
    names = ", ".join(str(p) for p in inputs)
    return f"## Labelling films with the trained model\ninputs: {names}\n{summary.to_text()}\n"


def evaluate_finetuned(run_dir: Path, valid_csv: Path, view: str, *, seed: int, out: Path) -> str:
    """Evaluate the run's best checkpoint on valid.csv per image (the views it was trained on)
    and per study (max over all of a study's views, as the CheXpert paper scores its
    validation set), write the report into the run folder and return the terminal text."""
    valid = load_table(valid_csv)
    ensemble = load_ensemble([run_dir])
    (images,) = predict_datasets(ensemble, [("validation", valid)], view=view)
    (every_view,) = predict_datasets(ensemble, [("validation", valid)], view="all")
    names = [f"validation (per image, {view})", "validation (per study, max over all views)"]
    evaluations = [
        *score_predictions([images], unit="image", n_resamples=DEMO_RESAMPLES, seed=seed),
        *score_predictions([every_view], unit="study", n_resamples=DEMO_RESAMPLES, seed=seed),
    ]
    report_dir = RunFolder(run_dir).report
    report_md, report_html = write_report(
        evaluations,
        report_dir,
        title="cxrlabel demo: tiny CNN fine-tuned on synthetic radiographs",
        dataset_names=names,
        run_dirs=[run_dir],
        label_stats=label_stats(valid, unit="study", view=view),
    )
    save_evaluations(report_dir / "evaluation.json", evaluations, names, models=[run_dir])
    table = format_evaluations(evaluations, names)
    atomic_write_text(out / "finetune_metrics.md", table)
    rule = evaluations[0].predictions.thresholds.rule
    return (
        f"validation set (valid.csv, {view}), best checkpoint, the thresholds stored with it "
        f"(rule: {rule}); AUROC 95% CIs from {DEMO_RESAMPLES} bootstrap resamples of studies "
        "(the evaluate command's default is 1000):\n\n"
        f"{table}\n"
        f"evaluation report: {report_md}\n"
        f"                   {report_html}\n"
    )
