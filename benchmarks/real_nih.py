"""Real films: `cxrlabel cv` (5 folds by patient) on the 497 NIH films, both approaches.

- heads: frozen ImageNet Xception (the local Keras weights, computed as Keras does) + the
  method's three heads; features extracted once and shared by every fold and head.
- finetune: Xception fine-tuned per fold with the real-film recipe (preset
  `finetune-xception-nih`, see src/cxrlabel/presets).

Both on the five CheXpert competition labels, scored on their pooled out-of-fold predictions
(mean AUROC and per label, 95% bootstrap CIs), beside the independent DenseNet121 reference
predictions (`reference_chexnet_repro_preds.csv`: a CheXNet reproduction trained on ~78,000 NIH
films, these images in its held-out fold), all in one report.

    .venv/bin/python benchmarks/real_nih.py --out runs/real-nih [--parts heads,finetune]

Writes `<out>/results.md` (the table) and `<out>/report/` (report.md, report.html); each
part's own cross-validation folder (`<out>/<part>-cv`) holds its checkpoints, OOF CSV and
report.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd

from cxrlabel.config import HeadConfig, RunConfig
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import LABEL_SETS
from cxrlabel.evaluation.external import read_predictions
from cxrlabel.evaluation.metrics import Evaluation
from cxrlabel.evaluation.report import write_report
from cxrlabel.evaluation.scoring import score_predictions
from cxrlabel.evaluation.tables import fmt_ci, markdown_table
from cxrlabel.training.cv import run_cv

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NIH = SHARED / "nih-cxr14" / "labels.csv"
REFERENCE = SHARED / "nih-cxr14" / "reference_chexnet_repro_preds.csv"
WEIGHTS = SHARED / "weights" / "legacy_xception_imagenet_keras.safetensors"
LABELS = LABEL_SETS["competition"]
PARTS = ("heads", "finetune")
GOAL = 0.70  # the target for the mean AUROC over the five labels

log = logging.getLogger("real_nih")


def heads_config(args: argparse.Namespace) -> HeadConfig:
    return HeadConfig.build(
        None,
        {
            "name": "heads", "train_csv": str(NIH), "labels": "competition", "view": "all",
            "backbones": ["xception"], "heads": ["linear", "mlp3", "mlp3_dropout"],
            "weights": str(WEIGHTS), "size": args.heads_size, "keras_compat": True,
            "threshold_rule": "youden", "epochs": args.head_epochs, "lr": 1e-3,
            "valid_fraction": 0.2, "seed": args.seed, "runs_dir": str(args.out),
        },
    )  # fmt: skip


def finetune_config(args: argparse.Namespace) -> RunConfig:
    overrides = [
        "name=finetune", f"train_csv={NIH}", "labels=competition", "view=all",
        f"weights={WEIGHTS}", f"seed={args.seed}", f"runs_dir={args.out}", *args.finetune_set,
    ]  # fmt: skip
    return RunConfig.build(args.finetune_preset, overrides)


def reference_evaluation(args: argparse.Namespace) -> Evaluation:
    """The DenseNet121 reference's probabilities scored on the same 497 films and labels."""
    table = load_table(NIH)
    pred = read_predictions(REFERENCE, table, model="DenseNet121 reference (NIH-trained)")
    pred = pred.subset_labels(LABELS)
    return score_predictions([pred], n_resamples=1000, seed=args.seed)[0]


def table_rows(name: str, evaluation: Evaluation, minutes: float | None) -> dict[str, str]:
    ci = evaluation.ci.set_index("Label")
    row = {"Model": name}
    for label in (*LABELS, "Mean"):
        row[label] = fmt_ci(ci.loc[label, "AUROC"], ci.loc[label, "Low"], ci.loc[label, "High"])
    row["Minutes"] = "" if minutes is None else f"{minutes:.1f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/real-nih"))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads-size", type=int, default=299)
    parser.add_argument("--head-epochs", type=int, default=50)
    parser.add_argument("--finetune-preset", default="finetune-xception-nih")
    parser.add_argument("--set", dest="finetune_set", action="append", default=[],
                        metavar="KEY=VALUE", help="override a fine-tuning config key")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="resume unfinished fold runs")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for path in (NIH, REFERENCE, WEIGHTS):
        if not path.exists():
            raise SystemExit(f"{path} is missing: this benchmark needs ../shared/data")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if sorted(set(parts) - set(PARTS)):
        raise SystemExit(f"unknown part(s) in {parts}; parts: {PARTS}")
    args.out.mkdir(parents=True, exist_ok=True)

    evaluations, names, rows = [], [], []
    for part in parts:
        config = heads_config(args) if part == "heads" else finetune_config(args)
        start = time.perf_counter()
        result = run_cv(config, folds=args.folds, resume=args.resume and part == "finetune")
        minutes = (time.perf_counter() - start) / 60
        for evaluation in result.evaluations:
            model = evaluation.predictions.model
            name = f"{model} ({part}, {args.folds}-fold OOF)"
            evaluations.append(evaluation)
            names.append(name)
            rows.append(table_rows(name, evaluation, minutes))
            log.info("%s: fold ensemble %s", name, result.model_specs.get(model, ""))
    reference = reference_evaluation(args)
    evaluations.append(reference)
    names.append("DenseNet121 reference (trained on ~78k NIH films)")
    rows.append(table_rows(names[-1], reference, None))

    frame = pd.DataFrame(rows)
    text = (
        f"Mean AUROC over {', '.join(LABELS)} on the 497 NIH films (goal: {GOAL:.2f}); "
        "95% bootstrap CIs; minutes: the whole cross-validation of that part.\n\n"
        + markdown_table(frame)
        + "\n"
    )
    (args.out / "results.md").write_text(text)
    report_md, _ = write_report(
        evaluations, args.out / "report", title="cxrlabel on 497 real NIH films: 5-fold CV",
        dataset_names=names,
    )  # fmt: skip
    print(text)
    print(f"report: {report_md}")


if __name__ == "__main__":
    main()
