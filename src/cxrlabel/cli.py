"""The `cxrlabel` command: thin wrappers over the library, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from cxrlabel.labels import BlankMeaning, LabelTable

log = logging.getLogger("cxrlabel")


def _add_table_args(parser: argparse.ArgumentParser) -> None:
    from cxrlabel.formats import FORMATS

    parser.add_argument("csv", type=Path, help="label CSV (CheXpert, MIMIC, NIH or generic)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="label file format")
    parser.add_argument("--mimic-metadata", type=Path, help="MIMIC-CXR metadata CSV")
    parser.add_argument("--nih-image-dir", default="images", help="NIH image folder")
    parser.add_argument(
        "--blank",
        choices=[b.value for b in BlankMeaning],
        help="what an empty label cell means (default: the format's own)",
    )


def _load_table(args: argparse.Namespace) -> LabelTable:
    from cxrlabel.formats import load_table

    return load_table(
        args.csv,
        args.format,
        mimic_metadata=args.mimic_metadata,
        nih_image_dir=args.nih_image_dir,
        blank=args.blank,
    )


def cmd_stats(args: argparse.Namespace) -> int:
    from cxrlabel.fileio import atomic_write_text
    from cxrlabel.stats import label_stats

    table = _load_table(args)
    units = ("study", "image") if args.by == "both" else (args.by,)
    for unit in units:
        stats = label_stats(table, unit=unit, view=args.view)
        print(stats.to_text())
        stem = f"{args.csv.stem}_{unit}_{args.view}"
        atomic_write_text(args.out / f"{stem}.md", stats.to_markdown())
        atomic_write_text(args.out / f"{stem}.csv", stats.to_csv())
        print(f"wrote {args.out / stem}.md and .csv\n")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from cxrlabel.splits import patient_split, save_split

    table = _load_table(args)
    split = patient_split(table, valid_fraction=args.valid_fraction, seed=args.seed)
    save_split(split, args.out)
    train, valid = split.apply(table)
    print(
        f"{args.out}: {len(split.train)} patients ({len(train)} images) train, "
        f"{len(split.valid)} patients ({len(valid)} images) valid; disjoint"
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from cxrlabel.synth import contact_sheet, write_dataset

    summary = write_dataset(args.out, patients=args.patients, size=args.size, seed=args.seed)
    print(summary)
    sheet = args.out / "contact_sheet.png"
    contact_sheet(args.out, sheet)
    print(f"contact sheet: {sheet}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from cxrlabel.cache import ResizeSettings, prepare_cache

    table = _load_table(args)
    settings = ResizeSettings(args.size, args.resize_mode, args.interpolation)
    out = args.out or args.csv.parent / ".cxrlabel-cache" / f"{args.csv.stem}-{args.size}"
    cache = prepare_cache(
        table.image_paths(),
        out,
        settings,
        on_error=args.on_error,
        workers=args.workers,
        progress=lambda it: tqdm(it, total=len(table), desc="prepare", unit="img"),
    )
    print(f"{out}: {len(cache)} images at {args.size} px, {len(cache.skipped)} skipped")
    for item in cache.skipped:
        print(f"  skipped {item.path}: {item.reason}")
    return 0


def _weights_arg(value: str) -> str | Path:
    return value if value in ("imagenet", "none") else Path(value)


def cmd_extract(args: argparse.Namespace) -> int:
    from cxrlabel.features import run_extract

    features = run_extract(
        args.csv, args.out, backbone=args.backbone, weights=_weights_arg(args.weights),
        size=args.size, fmt=args.format, view=args.view, labels=args.labels,
        batch_size=args.batch_size, overwrite=args.overwrite,
    )  # fmt: skip
    state = "reused" if features.reused else "extracted"
    print(f"{args.out}: {state} {len(features.rows)} x {features.dim} features, "
          f"{len(features.skipped)} images skipped")  # fmt: skip
    return 0


def cmd_train_head(args: argparse.Namespace) -> int:
    from cxrlabel.features import run_train_head

    out = run_train_head(
        args.csv, args.features, args.out, head=args.head, epochs=args.epochs, fmt=args.format,
        view=args.view, labels=args.labels, policy=args.policy, lr=args.lr, seed=args.seed,
    )  # fmt: skip
    print(f"head written to {out} (+ .json spec)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cxrlabel.features import format_sweep_table, run_sweep

    table = run_sweep(
        args.train_csv, args.valid_csv, args.cache,
        backbones=args.backbones.split(","), heads=args.heads.split(","),
        weights=_weights_arg(args.weights), fmt=args.format, view=args.view, labels=args.labels,
        epochs=args.epochs, lr=args.lr, seed=args.seed,
        out_csv=args.out / "sweep.csv", out_markdown=args.out / "sweep.md",
    )  # fmt: skip
    print(format_sweep_table(table))
    print(f"wrote {args.out / 'sweep.md'} and sweep.csv")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cxrlabel.config import build_config, load_config, parse_overrides
    from cxrlabel.train import train

    if args.config is not None:
        base = load_config(args.config).to_dict()
        config = build_config(None, {**base, **parse_overrides(args.overrides)})
    else:
        config = build_config(args.preset, args.overrides)
    result = train(config, run_dir=args.run_dir, resume=args.resume)
    summary = result.metrics
    print(f"run folder: {result.run_dir}")
    print(f"best epoch {summary.get('best_epoch')}: validation AUROC per label")
    for label, auroc in (summary.get("val_auroc") or {}).items():
        print(f"  {label:<28}{'n/a' if auroc is None else f'{auroc:.3f}'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cxrlabel.evaluate import evaluate_checkpoint, format_metrics
    from cxrlabel.labels import filter_view

    table = filter_view(_load_table(args), args.view)
    metrics = evaluate_checkpoint(args.checkpoint, table, threshold=args.threshold)
    print(format_metrics(metrics))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cxrlabel.demo import run_demo

    print(run_demo(args.out, patients=args.patients, size=args.size, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cxrlabel.formats import FORMATS

    parser = argparse.ArgumentParser(prog="cxrlabel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="label counts in the CheXpert paper's Table 1 layout")
    _add_table_args(p)
    p.add_argument("--by", default="study", choices=["study", "image", "both"])
    p.add_argument("--view", default="all", choices=["frontal", "lateral", "all"])
    p.add_argument("--out", type=Path, default=Path("stats"), help="folder for .md and .csv")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("split", help="seeded patient-level train/validation split")
    _add_table_args(p)
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("split.csv"), help="patient_id,split CSV")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("synth", help="write a synthetic CheXpert-format dataset")
    p.add_argument("out", type=Path)
    p.add_argument("--patients", type=int, default=200)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="decode and resize a dataset once into a cache")
    _add_table_args(p)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--resize-mode", default="pad", choices=["pad", "crop"])
    p.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic"])
    p.add_argument("--out", type=Path, help="cache folder (default: beside the CSV)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes")
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"])
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("extract", help="run a frozen backbone once and cache its features")
    p.add_argument("csv", type=Path, help="label CSV")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", default="imagenet", help="imagenet, none or a weights file")
    p.add_argument("--size", type=int, help="input size (default: 224 MobileNet, 220 others)")
    p.add_argument("--view", default="all", choices=["frontal", "lateral", "all"])
    p.add_argument("--labels", default="competition")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="feature cache folder")
    p.add_argument("--overwrite", action="store_true", help="rebuild a mismatching cache")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train-head", help="train a feed-forward head on cached features")
    p.add_argument("csv", type=Path, help="the label CSV the features were extracted from")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--features", type=Path, required=True, help="folder written by extract")
    p.add_argument("--head", default="mlp3_dropout", choices=["linear", "mlp3", "mlp3_dropout"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--view", default="all", choices=["frontal", "lateral", "all"])
    p.add_argument("--labels", default="competition")
    p.add_argument("--policy", default="U-Ignore")
    p.add_argument("--out", type=Path, required=True, help="head weights (.safetensors)")
    p.set_defaults(func=cmd_train_head)

    p = sub.add_parser("sweep", help="the method's backbone x head experiment (Table I)")
    p.add_argument("train_csv", type=Path)
    p.add_argument("valid_csv", type=Path)
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--backbones", default="xception,densenet121,resnet50,vgg19,mobilenet")
    p.add_argument("--heads", default="linear,mlp3,mlp3_dropout")
    p.add_argument("--weights", default="imagenet", help="imagenet, none or a weights file")
    p.add_argument("--view", default="all", choices=["frontal", "lateral", "all"])
    p.add_argument("--labels", default="competition")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("runs/feature-cache"))
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train", help="fine-tune a backbone and head end to end")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. lr=1e-4)")
    p.add_argument("--preset", help="tiny-cpu, finetune-mobilenet, finetune-densenet121 or a YAML")
    p.add_argument("--config", type=Path, help="re-run from a saved config.yaml")
    p.add_argument("--run-dir", type=Path, help="default: <runs_dir>/<name>")
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/last")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-label metrics of a checkpoint on a labelled CSV")
    p.add_argument("checkpoint", type=Path, help="a run's checkpoints/best.safetensors")
    _add_table_args(p)
    p.add_argument("--view", default="frontal", choices=["frontal", "lateral", "all"])
    p.add_argument("--threshold", type=float, default=0.5)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the main job on built-in synthetic data")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from cxrlabel.images import ImageError
    from cxrlabel.labels import LabelError

    try:
        return args.func(args)
    except (LabelError, ImageError, FileNotFoundError, FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
