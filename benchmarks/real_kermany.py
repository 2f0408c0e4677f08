"""Real films: the method's two approaches on the Kermany paediatric pneumonia training set.

5,216 real films (`../shared/data/kermany-pneumonia`), one label (Pneumonia), split by patient
into training and validation (`--valid-fraction`, seeded; every part uses the same split, and
the script checks that it does). Parts (`--parts`, comma-separated, each in its own folder
under `--out`):

- `frozen-220`, `frozen-299`: approach 1, frozen ImageNet Xception (the local Keras weights,
  computed exactly as Keras does) + the method's three heads, at the method's 220 px and at
  Xception's native 299 px; thresholds chosen on the validation split (Youden).
- `finetune`: approach 2, Xception fine-tuned with the real-film recipe (preset
  `finetune-xception-real`: see src/cxrlabel/presets), thresholds chosen on validation.

Every model is scored on the validation split: AUROC, accuracy, sensitivity and specificity at
the checkpoint's stored threshold, each with a 95% patient-bootstrap CI, beside Kermany et al.'s
figures on their (held-out) test split. The best model (validation AUROC) then labels the
validation films and the NIH fixture films with `cxrlabel label`, unchanged, and is exported to
ONNX with `cxrlabel export`; the script checks that label's probabilities equal its own.

    .venv/bin/python benchmarks/real_kermany.py --out runs/real-kermany
    .venv/bin/python benchmarks/real_kermany.py --out runs/real-kermany --parts finetune

Results go to `<out>/results.csv` and `<out>/results.md` (merged with earlier parts' rows).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlabel.config import HeadConfig, RunConfig
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import LabelTable
from cxrlabel.data.splits import load_split
from cxrlabel.evaluation.metrics import bootstrap_auroc, bootstrap_rates
from cxrlabel.evaluation.scoring import evaluate_checkpoint
from cxrlabel.models.checkpoint import load_checkpoint, thresholds_from_metadata
from cxrlabel.models.run_folder import RunFolder
from cxrlabel.training.finetune import train
from cxrlabel.training.heads import CHECKPOINT_COLUMN, _prepare, backbone_data, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
KERMANY = SHARED / "kermany-pneumonia" / "labels.csv"
WEIGHTS = SHARED / "weights" / "legacy_xception_imagenet_keras.safetensors"
NIH_FIXTURES = SHARED / "fixtures" / "nih_320"
LABEL = "Pneumonia"
# Kermany et al. 2018 (Cell), ImageNet Inception v3 transfer learning, on their test split.
PUBLISHED = {"AUROC": 0.968, "Accuracy": 0.928, "Sensitivity": 0.932, "Specificity": 0.901}
PARTS = ("frozen-220", "frozen-299", "finetune")
METRICS = tuple(PUBLISHED)

log = logging.getLogger("real_kermany")


def score(
    truth: np.ndarray, probs: np.ndarray, patients: np.ndarray, threshold: float, seed: int
) -> dict[str, Any]:
    """Validation figures at `threshold`, each with a 95% CI resampling patients."""
    auroc = bootstrap_auroc(
        truth[:, None], probs[:, None], np.ones((len(truth), 1), bool), patients, [LABEL],
        seed=seed,
    ).iloc[0]  # fmt: skip
    rates = bootstrap_rates(truth, probs, threshold, patients, seed=seed).set_index("Metric")
    out: dict[str, Any] = {"AUROC": auroc["AUROC"], "AUROC low": auroc["Low"],
                           "AUROC high": auroc["High"]}  # fmt: skip
    for name, row in rates.iterrows():
        out.update({name: row["Value"], f"{name} low": row["Low"], f"{name} high": row["High"]})
    out["Threshold"] = threshold
    out["Valid films"] = len(truth)
    out["Valid patients"] = len(set(patients))
    return out


def valid_table(table: LabelTable, split_csv: Path) -> LabelTable:
    return load_split(split_csv).apply(table)[1]


def frozen_part(size: int, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Approach 1 at `size` px: the sweep's three heads, scored on the cached valid features."""
    config = HeadConfig.build(
        overrides={
            "name": f"frozen-{size}", "train_csv": str(KERMANY), "labels": LABEL, "view": "all",
            "backbones": ["xception"], "heads": ["linear", "mlp3", "mlp3_dropout"],
            "weights": str(WEIGHTS), "size": size, "keras_compat": True,
            "threshold_rule": "youden", "valid_fraction": args.valid_fraction, "seed": args.seed,
            "epochs": args.head_epochs, "extract_batch_size": 32,
        }
    )  # fmt: skip
    run_dir = out / config.name
    start = time.perf_counter()
    sweep = run_sweep(config, run_dir, progress=False)
    took = time.perf_counter() - start
    # The features are cached now: score each saved checkpoint's head on them.
    run = _prepare(config, run_dir)
    data = backbone_data(run, "xception", progress=False)
    truth, _ = data.valid.targets(run.valid, [LABEL])
    patients = run.valid.frame["patient_id"].astype(str).to_numpy()[data.valid.rows]
    features = torch.from_numpy(data.valid.features).float()
    rows = []
    for _, sweep_row in sweep.iterrows():
        checkpoint = run_dir / sweep_row[CHECKPOINT_COLUMN]
        model, meta = load_checkpoint(checkpoint)
        with torch.no_grad():
            probs = torch.sigmoid(model.head.eval()(features)).numpy()[:, 0]
        threshold = thresholds_from_metadata(meta).values[0]
        paths = run.valid.frame["Path"].to_numpy()[data.valid.rows]
        probs_csv = save_probabilities(checkpoint.parent / "valid_probabilities.csv", paths, probs)
        rows.append(
            {
                "Model": f"{sweep_row['Model']} frozen, {size} px",
                **score(truth[:, 0], probs, patients, threshold, args.seed),
                "Minutes": took / 60,  # the whole sweep: extraction + three heads
                "Checkpoint": str(checkpoint),
                "Split": str(RunFolder(run_dir).split),
                "Probabilities": str(probs_csv),
            }
        )
    return rows


def save_probabilities(path: Path, paths: np.ndarray, probs: np.ndarray) -> Path:
    """The validation probabilities this script scored, for the label check and for users."""
    pd.DataFrame({"Path": paths, LABEL: probs}).to_csv(path, index=False)
    return path


def finetune_part(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Approach 2: Xception fine-tuned with the real-film recipe, scored on the valid films."""
    overrides = {
        "name": "finetune", "train_csv": str(KERMANY), "labels": LABEL, "view": "all",
        "weights": str(WEIGHTS), "valid_fraction": args.valid_fraction, "seed": args.seed,
    }  # fmt: skip
    overrides.update(dict(item.split("=", 1) for item in args.finetune_set))
    config = RunConfig.build(args.finetune_preset, overrides=_typed(overrides))
    run_dir = out / config.name
    start = time.perf_counter()
    result = train(config, run_dir=run_dir, resume=args.resume)
    took = time.perf_counter() - start
    table = valid_table(load_table(KERMANY), RunFolder(run_dir).split)
    evaluation = evaluate_checkpoint(result.best_checkpoint, table, view="all", n_resamples=10)
    pred = evaluation.predictions
    threshold = pred.thresholds.values[0]
    probs_csv = save_probabilities(
        result.run_dir / "valid_probabilities.csv", np.array(pred.paths), pred.y_score[:, 0]
    )
    return [
        {
            "Model": f"Xception fine-tuned ({config.size or 299} px, {config.epochs} epochs)",
            **score(
                pred.y_true[:, 0],
                pred.y_score[:, 0],
                np.array(pred.patient_ids),
                threshold,
                args.seed,
            ),
            "Minutes": took / 60,
            "Checkpoint": str(result.best_checkpoint),
            "Split": str(RunFolder(run_dir).split),
            "Probabilities": str(probs_csv),
        }
    ]


def _typed(values: dict[str, Any]) -> list[str]:
    """Overrides as key=value strings, so the config parses their types as the CLI does."""
    return [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in values.items()]


def check_same_split(rows: list[dict[str, Any]]) -> None:
    """Every part must have validated on the same patients, or their figures do not compare."""
    splits = {row["Split"]: load_split(Path(row["Split"])) for row in rows}
    if len(set(splits.values())) > 1:
        raise SystemExit(f"the parts used different patient splits: {sorted(splits)}")


def cli(*argv: str) -> None:
    """`cxrlabel ...` from this environment, as a user would run it."""
    cmd = [str(Path(sys.executable).with_name("cxrlabel")), *argv]
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def label_with_best(best: pd.Series, out: Path) -> None:
    """`cxrlabel label` on the validation films and the NIH fixtures, `cxrlabel export` to ONNX,
    and a check that label's probabilities on the validation films are this script's."""
    table = valid_table(load_table(KERMANY), Path(best["Split"]))
    films = out / "best-valid-films.csv"
    paths = [str(p) for p in table.image_paths()]
    pd.DataFrame({"Path": paths}).to_csv(films, index=False)
    labelled = out / "labels-kermany-valid"
    # The films CSV names the shared films by absolute path, outside its own folder.
    cli("label", str(films), "--model", best["Checkpoint"], "--out", str(labelled), "--no-progress",
        "--allow-outside-paths")  # fmt: skip
    fixtures = out / "labels-nih-fixtures"
    cli("label", str(NIH_FIXTURES), "--model", best["Checkpoint"], "--out", str(fixtures),
        "--no-progress")  # fmt: skip
    cli("export", best["Checkpoint"], "--onnx", str(out / "best.onnx"))
    got = pd.read_csv(labelled / "probabilities.csv")
    ours = pd.read_csv(best["Probabilities"])
    root = load_table(KERMANY).root  # the label file's paths are relative to it
    ours["Path"] = [str(root / p) for p in ours["Path"]]
    both = got.merge(ours, on="Path", suffixes=(" label", " script"))
    gap = (both[f"{LABEL} label"] - both[f"{LABEL} script"]).abs().max()
    print(f"cxrlabel label: {len(got)} of {len(paths)} validation films; probabilities match "
          f"this script's on {len(both)} films within {gap:.2e}")  # fmt: skip
    if len(both) != len(paths) or gap > 1e-3:
        raise SystemExit("cxrlabel label disagrees with the benchmark's own probabilities")


def markdown(frame: pd.DataFrame) -> str:
    def cell(row: pd.Series, m: str) -> str:
        return f"{row[m]:.3f} ({row[f'{m} low']:.3f}-{row[f'{m} high']:.3f})"

    lines = ["| Model | " + " | ".join(METRICS) + " | Threshold | Minutes | Checkpoint |",
             "|---" * (len(METRICS) + 4) + "|"]  # fmt: skip
    for _, row in frame.iterrows():
        cells = [cell(row, m) for m in METRICS]
        lines.append(
            f"| {row['Model']} | "
            + " | ".join(cells)
            + f" | {row['Threshold']:.3f} | {row['Minutes']:.1f} | {row['Checkpoint']} |"
        )
    lines.append("| Kermany et al. 2018 (their test split) | "
                 + " | ".join(f"{PUBLISHED[m]:.3f}" for m in METRICS) + " | | | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/real-kermany"))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--valid-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--finetune-preset", default="finetune-xception-real")
    parser.add_argument(
        "--set",
        dest="finetune_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a fine-tuning config key",
    )
    parser.add_argument("--resume", action="store_true", help="resume the finetune part")
    parser.add_argument("--no-label", action="store_true", help="skip labelling with the best")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for path in (KERMANY, WEIGHTS):
        if not path.exists():
            raise SystemExit(f"{path} is missing: this benchmark needs ../shared/data")
    torch.set_num_threads(torch.get_num_threads())  # the machine's cores, as the CLI would
    args.out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; parts: {PARTS}")

    rows: list[dict[str, Any]] = []
    for part in parts:
        log.info("part %s", part)
        rows += finetune_part(args.out, args) if part == "finetune" else frozen_part(
            int(part.split("-")[1]), args.out, args)  # fmt: skip
    results_csv = args.out / "results.csv"
    if results_csv.is_file():  # keep other parts' rows from earlier invocations
        old = pd.read_csv(results_csv)
        rows = [
            r for r in old.to_dict("records") if r["Model"] not in {x["Model"] for x in rows}
        ] + rows
    frame = pd.DataFrame(rows)
    check_same_split(rows)
    frame.to_csv(results_csv, index=False)
    (args.out / "results.md").write_text(markdown(frame))
    print(markdown(frame))
    if not args.no_label:
        label_with_best(frame.loc[frame["AUROC"].idxmax()], args.out)


if __name__ == "__main__":
    main()
