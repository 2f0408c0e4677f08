"""The learning check's data and settings, in one place for its test and its benchmark.

tests/training/test_finetune.py asserts that the tiny CNN learns; benchmarks/bench_precision.py
trains it with exactly these settings over many seeds and both precisions, which is where the
test's thresholds come from. Not a test module (no `test_` prefix): plain functions.
"""

from __future__ import annotations

from pathlib import Path

from cxrlabel.config import RunConfig, build_config
from cxrlabel.data.dataset import CXRDataset
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import filter_view
from cxrlabel.evaluation.metrics import metrics_table
from cxrlabel.models.checkpoint import load_checkpoint
from cxrlabel.synth import SynthSummary, write_dataset
from cxrlabel.training.execution import choose_execution
from cxrlabel.training.finetune import TrainResult, make_loader, predict

LEARN_LABELS = ("Cardiomegaly", "Pleural Effusion")


def learning_datasets(root: Path) -> tuple[SynthSummary, SynthSummary]:
    """Training films of 300 synthetic patients and held-out films of 250 others, at 96 px."""
    # Not named "train": CheXpert paths start with "train/", which would move the root up.
    train_set = write_dataset(root / "synth_a", patients=300, size=96, seed=11)
    held_out = write_dataset(root / "synth_b", patients=250, size=96, seed=12)
    return train_set, held_out


def learning_config(
    train_set: SynthSummary, runs_dir: Path, *, precision: str, seed: int = 0, name: str = "run"
) -> RunConfig:
    """6 epochs of ~460 images at 96 px on CPU, in the given precision (never "auto": the
    outcome must not depend on the CPU that runs it)."""
    return build_config(
        "tiny-cpu",
        {
            "name": name,
            "train_csv": str(train_set.train_csv),
            "valid_csv": str(train_set.valid_csv),
            "labels": ",".join(LEARN_LABELS),
            # Blank is negative in CheXpert-format train labels; keep every image.
            "require_certain": False,
            "size": 96,
            "epochs": 6,
            "batch_size": 32,
            "lr": 0.003,
            # The validation split is ~40 images: its loss jumps with BatchNorm statistics
            # from epoch to epoch, while its AUROC tracks what the test measures.
            "select_best": "val_auroc",
            # Cosine decay steadies the short run (constant lr: effusion ~0.85-0.92 across seeds).
            "lr_schedule": "cosine",
            "device": "cpu",
            "precision": precision,
            "seed": seed,
            "runs_dir": str(runs_dir),
        },
    )


def held_out_aurocs(result: TrainResult, held_out: SynthSummary) -> dict[str, float]:
    """AUROC per label of the run's best checkpoint on the frontal held-out films (scored in
    fp32 on CPU whatever the run trained in, so only the training precision differs)."""
    model, _ = load_checkpoint(result.best_checkpoint)
    table = filter_view(load_table(held_out.train_csv), "frontal")
    dataset = CXRDataset(table, model.spec.labels, model.preprocessing)
    plan = choose_execution("cpu", "fp32")
    config = build_config("tiny-cpu", {"batch_size": 32})
    scores, targets, masks, _ = predict(model, make_loader(dataset, None, config, plan), plan)
    table = metrics_table(targets, scores, masks, model.spec.labels)
    aurocs = table.set_index("Label")["AUROC"]
    return {label: float(aurocs[label]) for label in LEARN_LABELS}
