"""The `cxrlabel` command: thin wrappers over the library, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from cxrlabel.data.labels import BlankMeaning, LabelTable

if TYPE_CHECKING:  # only for annotations: the commands import lazily, for a fast --help
    from cxrlabel.distributed import DistEnv
    from cxrlabel.labelling.batch import LabelSummary
    from cxrlabel.models.predictor import Predictor

log = logging.getLogger("cxrlabel")

# Real films beside a checkout (see ../shared/data/README.md); the demo labels them when present.
DEMO_REAL_FILMS = Path("../shared/data/fixtures")


def _add_format_args(parser: argparse.ArgumentParser) -> None:
    """How to read a label file: its format and the options some formats need."""
    from cxrlabel.data.formats import FORMATS

    parser.add_argument("--format", default="auto", choices=FORMATS, help="label file format")
    parser.add_argument("--mimic-metadata", type=Path, help="MIMIC-CXR metadata CSV")
    parser.add_argument("--nih-image-dir", default="images", help="NIH image folder")
    parser.add_argument(
        "--blank",
        choices=[b.value for b in BlankMeaning],
        help="what an empty label cell means (default: the format's own)",
    )
    _add_outside_paths_arg(parser)


def _add_outside_paths_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-outside-paths", action="store_true",
        help="read label-CSV paths that lead outside the CSV's folder (absolute, ../ or "
        "symlinked out); refused by default",
    )  # fmt: skip


def _add_table_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", type=Path, help="label CSV (CheXpert, MIMIC, NIH or generic)")
    _add_format_args(parser)


def _load_table(args: argparse.Namespace, csv: Path | None = None) -> LabelTable:
    """The label table of `csv` (default: the command's positional CSV), read as the format
    arguments say."""
    from cxrlabel.data.formats import load_table

    return load_table(
        args.csv if csv is None else csv,
        args.format,
        mimic_metadata=args.mimic_metadata,
        nih_image_dir=args.nih_image_dir,
        blank=args.blank,
        allow_outside_paths=args.allow_outside_paths,
    )


def _add_eval_model_args(
    parser: argparse.ArgumentParser, *, positional: bool = False, required: bool = True
) -> None:
    """The model(s) for evaluate / thresholds: run folders, RUN:bestK or checkpoint files."""
    what = "run folder (its best checkpoint), RUN:bestK (its K best) or checkpoint file"
    if positional:
        parser.add_argument("model", nargs="+", help=what)
    else:
        parser.add_argument(
            "--model", nargs="+", required=required, help=f"{what}; several: an ensemble"
        )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _add_tta_arg(parser: argparse.ArgumentParser) -> None:
    """--tta N: average over N fixed mild transforms of each film (cxrlabel.models.tta; not
    imported here, so that building the parser does not import torch)."""
    parser.add_argument(
        "--tta", type=int, default=1, metavar="N",
        help="test-time augmentation: average probabilities over the first N of a fixed list "
        "of mild transforms of each film (identity, zooms, +/-5 deg rotations, +/-3%% shifts; "
        "never flips); 1 = off; heatmaps stay without TTA",
    )  # fmt: skip


def _add_eval_table_args(parser: argparse.ArgumentParser) -> None:
    """Label-file and scoring options shared by evaluate and thresholds."""
    _add_format_args(parser)
    parser.add_argument("--unit", default="image", choices=["image", "study"])
    parser.add_argument(
        "--aggregate", default="max", choices=["max", "mean"],
        help="a study's probability from its views (with --unit study)",
    )  # fmt: skip
    parser.add_argument("--view", default="frontal", choices=["frontal", "lateral", "all"])
    parser.add_argument(
        "--policy",
        default="U-Ignore",
        help="U-Ignore, U-Zeros or U-Ones (LSR policies score as U-Ones / U-Zeros), or per "
        "label: 'Edema=U-Ones,*=U-Zeros'",
    )


def cmd_stats(args: argparse.Namespace) -> int:
    from cxrlabel.data.stats import label_stats
    from cxrlabel.fileio import atomic_write_text

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
    from cxrlabel.data.splits import patient_split, save_split

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
    from cxrlabel.data.cache import prepare_cache
    from cxrlabel.data.transforms import ResizeGeometry

    table = _load_table(args)
    settings = ResizeGeometry(args.size, args.resize_mode, args.interpolation)
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


def _head_config(args: argparse.Namespace):
    """The approach-1 config of extract / train-head / sweep: a saved config.yaml (--config) or
    a preset, then the key=value overrides."""
    from cxrlabel.config import HeadConfig, parse_overrides

    if args.config is None:
        return HeadConfig.build(args.preset, args.overrides)
    saved = HeadConfig.load(args.config).to_dict()
    return HeadConfig.build(None, saved | parse_overrides(args.overrides))


def cmd_extract(args: argparse.Namespace) -> int:
    from cxrlabel.distributed import dist_env
    from cxrlabel.training.heads import run_extract

    found = run_extract(_head_config(args), args.run_dir, overwrite=args.overwrite)
    if not dist_env().is_main:  # under torchrun, rank 0 reports for the job
        return 0
    for backbone, parts in found.items():
        for part, features in zip(("train", "valid"), parts, strict=True):
            state = "reused" if features.reused else "extracted"
            print(f"{features.cache_dir}: {backbone} {part}: {state} {len(features)} x "
                  f"{features.dim} features, {len(features.skipped)} images skipped")  # fmt: skip
    return 0


def cmd_train_head(args: argparse.Namespace) -> int:
    from cxrlabel.training.heads import run_train_head

    checkpoint = run_train_head(_head_config(args), args.run_dir)
    print(f"checkpoint: {checkpoint} (use it, or its folder {checkpoint.parent.parent}, as "
          "--model)")  # fmt: skip
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cxrlabel.training.heads import format_sweep_table, run_dir_of, run_sweep

    config = _head_config(args)
    run_dir = args.run_dir or run_dir_of(config)
    table = run_sweep(config, run_dir)
    print(format_sweep_table(table))
    print(f"wrote {run_dir / 'sweep.md'} and sweep.csv; checkpoints are relative to {run_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cxrlabel.config import build_config, load_config, parse_overrides
    from cxrlabel.distributed import dist_env
    from cxrlabel.training.finetune import train

    if args.config is not None:
        base = load_config(args.config).to_dict()
        config = build_config(None, {**base, **parse_overrides(args.overrides)})
    else:
        config = build_config(args.preset, args.overrides)
    result = train(config, run_dir=args.run_dir, resume=args.resume)
    if not dist_env().is_main:  # under torchrun, rank 0 reports for the job
        return 0
    summary = result.metrics
    print(f"run folder: {result.run_dir}")
    print(f"best epoch {summary.get('best_epoch')}: validation AUROC per label")
    for label, auroc in (summary.get("val_auroc") or {}).items():
        print(f"  {label:<28}{'n/a' if auroc is None else f'{auroc:.3f}'}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from cxrlabel.config import config_class, parse_overrides
    from cxrlabel.training.cv import default_run_dir, format_cv_table, run_cv

    # The kind (fine-tuning or heads) is the preset's / saved config's own `kind`.
    cls = config_class(args.preset, args.config)
    if args.config is not None:
        config = cls.build(None, cls.load(args.config).to_dict() | parse_overrides(args.overrides))
    else:
        config = cls.build(args.preset, args.overrides)
    run_dir = args.run_dir or default_run_dir(config)
    result = run_cv(config, args.folds, run_dir, n_resamples=args.bootstrap, resume=args.resume)
    print(format_cv_table(result))
    for model, spec in result.model_specs.items():
        print(f"{model}: out-of-fold {result.oof_paths[model]}; fold ensemble {spec}")
    print(f"report: {result.report}\nmetrics: {run_dir / 'cv_metrics.csv'}")
    return 0


def _named_csvs(items: Sequence[str]) -> list[tuple[str | None, Path]]:
    """`--data` values: CSV or NAME=CSV (a path containing '=' needs the NAME= form)."""
    out: list[tuple[str | None, Path]] = []
    for item in items:
        name, sep, path = item.partition("=")
        out.append((name, Path(path)) if sep and name and path else (None, Path(item)))
    return out


def _report_dir(args: argparse.Namespace) -> Path:
    from cxrlabel.models.run_folder import RunFolder, run_dir_of

    if args.out is not None:
        return args.out
    run = run_dir_of(args.model[0]) if args.model else None
    if run is None:
        what = args.model[0] if args.model else "predictions files"
        raise ValueError(f"{what} not in a run folder: give --out for the report folder")
    return RunFolder(run).report


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cxrlabel.data.stats import label_stats
    from cxrlabel.evaluation.external import read_predictions
    from cxrlabel.evaluation.report import write_report
    from cxrlabel.evaluation.scoring import data_names, evaluate, score_predictions
    from cxrlabel.evaluation.tables import format_evaluations, save_evaluations
    from cxrlabel.models.run_folder import run_dir_of

    if not args.model and not args.predictions:
        raise ValueError("nothing to evaluate: give --model and/or --predictions")
    out = _report_dir(args)  # before the slow part: a missing --out fails at once
    named = _named_csvs(args.data)
    names = data_names(len(named), [name for name, _ in named])
    tables = [_load_table(args, csv) for _, csv in named]
    scoring = {"unit": args.unit, "aggregate": args.aggregate, "n_resamples": args.bootstrap,
               "seed": args.seed, "thresholds_rule": args.rule, "band": args.band}  # fmt: skip
    evaluations, rows = [], []
    if args.model:
        evaluations += evaluate(
            args.model, list(zip(names, tables, strict=True)), policy=args.policy,
            view=args.view, device=args.device, batch_size=args.batch_size, tta=args.tta,
            **scoring,
        )  # fmt: skip
        rows += names
    # Predictions files (another model's output, out-of-fold scores) on the first data.
    for model, csv in _named_csvs(args.predictions or []):
        pred = read_predictions(csv, tables[0], model=model, policy=args.policy, view=args.view)
        evaluations += score_predictions([pred], **scoring)
        rows.append(names[0])
    print(format_evaluations(evaluations, rows))
    models = list(dict.fromkeys(e.predictions.model for e in evaluations))
    run_dirs = [r for r in dict.fromkeys(run_dir_of(m) for m in args.model or []) if r]
    report_md, report_html = write_report(
        evaluations,
        out,
        title=args.title or f"Evaluation of {', '.join(models)}",
        dataset_names=rows,
        run_dirs=run_dirs,
        label_stats=label_stats(tables[0], unit=args.unit, view=args.view),
        chexpert_valid=args.chexpert_valid,
    )
    saved = save_evaluations(out / "evaluation.json", evaluations, rows, models=args.model or [])
    print(f"report: {report_md}\n        {report_html}\nnumbers: {saved}")
    return 0


def cmd_thresholds(args: argparse.Namespace) -> int:
    from cxrlabel.evaluation.scoring import choose_and_store_thresholds

    table = _load_table(args, args.data)
    stored, thresholds = choose_and_store_thresholds(
        args.model, table, rule=args.rule, band=args.band, unit=args.unit,
        aggregate=args.aggregate, policy=args.policy, view=args.view, device=args.device,
    )  # fmt: skip
    where = f" chosen on {thresholds.chosen_on}" if thresholds.chosen_on else ""
    print(f"stored {thresholds.rule} thresholds{where} in:")
    print("\n".join(f"  {path}" for path in stored))
    bands = thresholds.band or [None] * len(thresholds.labels)
    for label, value, band in zip(thresholds.labels, thresholds.values, bands, strict=True):
        extra = "" if band is None else f"  uncertain in [{band[0]:.3f}, {band[1]:.3f})"
        print(f"  {label:<28}{value:.3f}{extra}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cxrlabel.evaluation.compare import compare_runs, format_comparison
    from cxrlabel.fileio import atomic_write_text

    text = format_comparison(compare_runs(args.runs))
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0


def _has_real_films(shared: Path) -> bool:
    return (shared / "kermany-pneumonia" / "labels.csv").is_file() and (
        shared / "weights" / "legacy_xception_imagenet_keras.safetensors"
    ).is_file()


def cmd_demo(args: argparse.Namespace) -> int:
    from cxrlabel.demo import run_demo

    also = [p for p in args.also_label if p.is_dir()]
    for missing in set(args.also_label) - set(also):
        log.info("not labelling %s: no such folder", missing)
    real = args.real_data if args.real_data and _has_real_films(args.real_data) else None
    if args.real_data and real is None:
        log.info("no real-film step: %s lacks the Kermany films or the Xception weights",
                 args.real_data)  # fmt: skip
    report = run_demo(
        args.out,
        patients=args.patients,
        size=args.size,
        seed=args.seed,
        also_label=also,
        real_data=real,
    )
    print(report)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cxrlabel.labelling.service import serve, token_from_env
    from cxrlabel.models.predictor import load_model
    from cxrlabel.models.tta import check_tta, with_tta

    token = token_from_env(args.token_env)
    check_tta(args.tta)  # before the slow load
    # Checkpoints stay PyTorch (not exported on the fly), so heatmaps come from the model
    # that labels (without TTA); an .onnx file runs with ONNX Runtime.
    model = with_tta(load_model(args.model, backend="native", device=args.device), args.tta)
    print(f"serving {model.name} ({model.kind}) at http://{args.host}:{args.port}/")
    print("auth: bearer token required" if token else "auth: none (set CXRLABEL_TOKEN to add it)")
    serve(
        model, host=args.host, port=args.port, token=token,
        max_upload_bytes=int(args.max_upload_mb * 2**20), heatmap_cache=args.heatmap_cache,
        max_concurrent=args.max_concurrent, max_queue=args.max_queue,
        allowed_hosts=args.allowed_hosts or [], allowed_origins=args.allowed_origins or [],
        body_timeout=args.body_timeout, min_upload_rate=int(args.min_upload_rate * 1024),
        upload_grace=args.upload_grace, max_uploads=args.max_uploads,
        max_uploads_per_client=args.max_uploads_per_client,
    )  # fmt: skip
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from cxrlabel import distributed
    from cxrlabel.models.factory import resolve_device

    # Under torchrun (dist_env finds its variables) each rank labels its share and rank 0
    # merges; the process group is joined first, so every rank's CUDA device is its own.
    env = distributed.dist_env()
    distributed.init_process_group(env, resolve_device(args.device))
    try:
        summary = _label(args, env)
    finally:
        distributed.destroy_process_group()
    if env.is_main:
        print(summary.to_text())
        if args.fhir_out is not None:
            _write_fhir(args)
    return 0


def _write_fhir(args: argparse.Namespace) -> None:
    from cxrlabel.hospital.fhir import write_reports
    from cxrlabel.labelling.studies import study_findings

    studies = study_findings(args.out, args.inputs, allow_outside_paths=args.allow_outside_paths)
    if not studies:
        log.warning(
            "--fhir-out: no FHIR report written: the films have no study ids (DICOM Study "
            "Instance UIDs, CheXpert/MIMIC folders or a CSV's study_id column)"
        )
        return
    written = write_reports(studies, args.fhir_out)
    print(f"  fhir: {len(written)} reports in {args.fhir_out}")


def _label(args: argparse.Namespace, env: DistEnv) -> LabelSummary:
    from cxrlabel.data.labels import resolve_labels
    from cxrlabel.labelling.batch import label_inputs
    from cxrlabel.models.factory import resolve_device
    from cxrlabel.models.predictor import load_model
    from cxrlabel.models.tta import check_tta, with_tta

    check_tta(args.tta)  # before the slow load

    def load(spec: list[str]) -> Predictor:
        return with_tta(
            load_model(spec, backend=args.backend, device=args.device, compile=args.compile),
            args.tta,
        )

    model = load(args.model)
    lateral = load(args.lateral_model) if args.lateral_model else None  # the same TTA
    chosen = resolve_labels(args.heatmap_labels) if args.heatmap_labels else None
    summary = label_inputs(
        args.inputs, model, args.out, batch_size=args.batch_size,
        heatmaps=args.heatmaps or chosen is not None, heatmap_labels=chosen,
        lateral_model=lateral, progress=not args.no_progress, skip_flagged=args.skip_flagged,
        allow_outside_paths=args.allow_outside_paths, env=env,
        decode_device=resolve_device(args.device), **_read_limits(args),
    )  # fmt: skip
    # The merged outputs exist on rank 0 only once label_inputs returns: it alone writes them.
    if args.dicom_out is not None and env.is_main:
        from cxrlabel.labelling.studies import write_dicom_outputs

        written = write_dicom_outputs(
            args.out, args.inputs, args.dicom_out,
            heatmaps=args.heatmaps or chosen is not None,
            allow_outside_paths=args.allow_outside_paths,
        )  # fmt: skip
        # Why a study got no SR is logged (a warning) and recorded in run.json.
        print(f"DICOM outputs: {len(written.written)} file(s) in {args.dicom_out}")
    return summary


def cmd_listen(args: argparse.Namespace) -> int:
    import signal
    import threading
    from functools import partial

    from cxrlabel.hospital.transfer import parse_send_to, send_cstore, send_stow
    from cxrlabel.labelling.node import Node
    from cxrlabel.models.predictor import load_model

    send: Any = None
    destination = ""
    if args.send_to:
        peer = parse_send_to(args.send_to)  # before the slow load
        send = partial(
            send_cstore, host=peer.host, port=peer.port, ae_title=peer.ae_title,
            calling_ae=args.ae_title,
        )  # fmt: skip
        destination = f"C-STORE {peer}"
    elif args.stow_url:
        send, destination = partial(send_stow, url=args.stow_url), f"STOW-RS {args.stow_url}"
    model = load_model(args.model, backend=args.backend, device=args.device)
    node = Node(
        model, args.out, ae_title=args.ae_title, host=args.host, port=args.port,
        quiet_seconds=args.quiet_seconds, label_at_release=not args.no_label_at_release,
        allow_ae=args.allow_ae or (), allow_peer=args.allow_peer or (), send=send,
        destination=destination, heatmaps=args.heatmaps,
    )  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    print(f"{args.ae_title} listening on {args.host}:{node.port}; Ctrl-C stops")
    try:
        stop.wait()
    finally:
        node.stop()  # the study being labelled finishes; the others wait in --out
    return 0


def _read_limits(args: argparse.Namespace) -> dict[str, Any]:
    """label's per-film size cap and time limit; the library's defaults where not given."""
    limits: dict[str, Any] = {}
    if args.max_file_mb is not None:
        limits["max_file_bytes"] = int(args.max_file_mb * 2**20)
    if args.read_timeout is not None:
        if args.read_timeout < 0:
            raise ValueError(f"--read-timeout must be 0 (no limit) or more: {args.read_timeout}")
        limits["read_timeout"] = args.read_timeout or None
    return limits


def cmd_export(args: argparse.Namespace) -> int:
    from cxrlabel.models.onnx import export_onnx

    if args.onnx is None:
        raise ValueError("choose an export format: --onnx [FILE]")
    out = Path(args.onnx) if args.onnx else _default_onnx_path(args.model[0])
    export_onnx(args.model, out)
    print(f"wrote {out}")
    return 0


def _default_onnx_path(spec: str | Path) -> Path:
    """Where `export --onnx` writes without a FILE: RUN/model-bestK.onnx for RUN:bestK (inside
    the run, no colon in the name), RUN/model.onnx for a run folder, and beside a checkpoint
    file (its name + .onnx)."""
    from cxrlabel.models.checkpoint import WEIGHTS_SUFFIX, checkpoint_paths
    from cxrlabel.models.run_folder import split_best_k, split_folds  # as loading parses

    root, is_folds = split_folds(spec)
    if is_folds:
        return root / "model-folds.onnx"
    path, k = split_best_k(spec)
    if k is not None:
        return path / f"model-best{k}.onnx"
    if path.is_dir():
        return path / "model.onnx"
    weights = checkpoint_paths(path)[0]
    return weights.with_name(weights.name.removesuffix(WEIGHTS_SUFFIX) + ".onnx")


def build_parser() -> argparse.ArgumentParser:
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

    head_commands = (
        ("extract", "run each frozen backbone once and cache its features", cmd_extract),
        ("train-head", "train one backbone x head model on cached features", cmd_train_head),
        ("sweep", "the method's backbone x head experiment (Table I)", cmd_sweep),
    )
    for name, help_text, func in head_commands:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. epochs=5)")
        p.add_argument("--preset", help="table1-heads, tiny-heads or a YAML (kind: heads)")
        p.add_argument("--config", type=Path, help="re-run from a saved config.yaml")
        p.add_argument("--run-dir", type=Path, help="default: <runs_dir>/<name>")
        if name == "extract":
            p.add_argument("--overwrite", action="store_true", help="rebuild mismatching caches")
        p.set_defaults(func=func)

    p = sub.add_parser("train", help="fine-tune a backbone and head end to end")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. lr=1e-4)")
    p.add_argument("--preset", help="tiny-cpu, finetune-mobilenet, finetune-densenet121 or a YAML")
    p.add_argument("--config", type=Path, help="re-run from a saved config.yaml")
    p.add_argument("--run-dir", type=Path, help="default: <runs_dir>/<name>")
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/last")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="patient-level k-fold cross-validation (either approach)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. epochs=5)")
    p.add_argument(
        "--preset", help="a fine-tuning or heads preset (its `kind` says which) or a YAML"
    )
    p.add_argument("--config", type=Path, help="re-run from a saved config.yaml")
    p.add_argument("--folds", type=int, default=5, help="K (patients dealt by config seed)")
    p.add_argument("--run-dir", type=Path, help="default: <runs_dir>/<name>-cv")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for AUROC CIs")
    p.add_argument("--resume", action="store_true", help="fine-tuning: continue fold runs")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser(
        "evaluate", help="metrics with CIs of a model or ensemble; writes report.md/.html"
    )
    _add_eval_model_args(p, required=False)
    p.add_argument(
        "--predictions", action="append", metavar="[NAME=]CSV",
        help="probabilities CSV (Path or Image Index + a column per label, e.g. cxrlabel "
        "label's probabilities.csv) scored on the first --data; repeat for more",
    )  # fmt: skip
    p.add_argument("--title", help="report title")
    p.add_argument(
        "--rule", choices=["youden", "max_f1", "fixed"],
        help="choose thresholds on the first --data by this rule, for this report only "
        "(default: the thresholds stored with the model; `cxrlabel thresholds` stores them)",
    )  # fmt: skip
    p.add_argument("--band", type=float, default=0.0, help="with --rule: +/- uncertainty band")
    p.add_argument(
        "--data", action="append", required=True, metavar="[NAME=]CSV",
        help="labelled CSV; repeat for more (default names: validation, then test)",
    )  # fmt: skip
    _add_eval_table_args(p)
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for AUROC CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--batch-size", type=int, default=32)
    _add_tta_arg(p)
    p.add_argument("--out", type=Path, help="report folder (default: <first run>/report)")
    p.add_argument(
        "--chexpert-valid", action="store_true",
        help="the first data ARE CheXpert's validation set (compare with the paper as such)",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("thresholds", help="choose per-label thresholds and store them")
    _add_eval_model_args(p, positional=True)
    p.add_argument("--data", type=Path, required=True, help="labelled CSV to choose them on")
    p.add_argument("--rule", required=True, choices=["youden", "max_f1", "fixed"])
    p.add_argument("--band", type=float, default=0.0, help="+/- uncertainty band (label -1)")
    _add_eval_table_args(p)
    p.set_defaults(func=cmd_thresholds)

    p = sub.add_parser("compare", help="one table of several runs' best checkpoints")
    p.add_argument("runs", nargs="+", type=Path, help="run folders")
    p.add_argument("--out", type=Path, help="also write the table to this .md file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("serve", help="HTTP labelling API and web page for a model")
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        help="run folders, RUN:bestK or checkpoint files, or one exported .onnx file",
    )
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file")
    p.add_argument("--heatmap-cache", type=int, default=64, help="recent results kept")
    p.add_argument(
        "--max-concurrent", type=int, default=2,
        help="requests decoded and scored at once (each full-size film can be 256 MB)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=16,
        help="requests waiting beyond those; more get 503 busy (keep the sum under 40)",
    )  # fmt: skip
    p.add_argument(
        "--body-timeout", type=float, default=30.0, metavar="S",
        help="seconds for a whole upload after its headers; slower ones get 408",
    )  # fmt: skip
    p.add_argument(
        "--min-upload-rate", type=float, default=8.0, metavar="KIB_S",
        help="KiB/s an upload must average after --upload-grace; slower ones get 408 (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--upload-grace", type=float, default=5.0, metavar="S",
        help="seconds before --min-upload-rate applies",
    )  # fmt: skip
    p.add_argument(
        "--max-uploads", type=int, default=32,
        help="uploads being received at once; more get 503 busy (memory: this x the upload limit)",
    )  # fmt: skip
    p.add_argument(
        "--max-uploads-per-client", type=int, default=4,
        help="uploads being received at once from one client address; more get 429",
    )  # fmt: skip
    p.add_argument(
        "--token-env",
        metavar="NAME",
        help="require 'Authorization: Bearer <token>' with the token read from environment "
        "variable NAME (default: CXRLABEL_TOKEN when set; never pass a token as an argument)",
    )
    p.add_argument(
        "--allowed-hosts", nargs="+", action="extend", metavar="HOST",
        help="Host names answered besides the bound address and localhost (any port; "
        "*.example.org for subdomains, * for any); others get 400",
    )  # fmt: skip
    p.add_argument(
        "--allowed-origins", nargs="+", action="extend", metavar="ORIGIN",
        help="origins (https://viewer.example.org) whose pages may POST, with CORS; other "
        "cross-origin POSTs get 403",
    )  # fmt: skip
    _add_tta_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("label", help="label films (files, folders, a CSV) with a model")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or a CSV with Path")
    p.add_argument(
        "--model", nargs="+", action="extend", required=True,
        help="run folders, RUN:bestK, checkpoint files or one .onnx; several: an ensemble",
    )  # fmt: skip
    p.add_argument(
        "--lateral-model", nargs="+", action="extend",
        help="model for lateral films (else they are labelled by --model and flagged)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("labels"), help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "onnx"],
        help="auto: the fastest measured path (bf16 PyTorch on CPUs with AMX, else ONNX Runtime "
        "on CPU; PyTorch on CUDA); torch and onnx run fp32",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="run the PyTorch models through torch.compile (the first batch compiles; not "
        "with --backend onnx; auto then labels with PyTorch)",
    )  # fmt: skip
    p.add_argument("--heatmaps", action="store_true", help="Grad-CAM PNGs of positive labels")
    p.add_argument("--heatmap-labels", help="draw heatmaps for these labels (comma list or set)")
    p.add_argument(
        "--skip-flagged", action="store_true",
        help="report films the input checks flag (tiny, odd shape, colour, blank, non-chest "
        "DICOM) in errors.csv instead of labelling them",
    )  # fmt: skip
    _add_tta_arg(p)
    p.add_argument(
        "--max-file-mb", type=float, default=None,
        help="films larger than this (MiB) are reported in errors.csv, not read (default 512)",
    )  # fmt: skip
    p.add_argument(
        "--read-timeout", type=float, default=None,
        help="seconds to read one film before its reader process is stopped and the film "
        "reported (default 120; 0: no limit, read in the main process)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--fhir-out", type=Path, metavar="DIR",
        help="also write one FHIR R4 Bundle (DiagnosticReport, Observations, Device) per study "
        "to DIR/<study id>.json; it names the patient by id (patient data)",
    )  # fmt: skip
    p.add_argument(
        "--dicom-out", type=Path, metavar="DIR",
        help="also write each study's DICOM Structured Report (and, with heatmaps, one "
        "Secondary Capture per heatmap) to DIR/<Study Instance UID>/ (patient data: they copy "
        "the films' patient module)",
    )  # fmt: skip
    _add_outside_paths_arg(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("listen", help="a DICOM node: label the studies a PACS sends, send results")
    p.add_argument(
        "--model", nargs="+", action="extend", required=True,
        help="run folders, RUN:bestK, checkpoint files or one .onnx; several: an ensemble",
    )  # fmt: skip
    p.add_argument("--ae-title", default="CXRLABEL", help="this node's AE title")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default loopback only; 0.0.0.0: every interface)",
    )  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--send-to", metavar="HOST:PORT:AET", help="C-STORE the results to this DICOM peer"
    )
    where.add_argument(
        "--stow-url", metavar="URL",
        help="STOW-RS the results to this DICOMweb base URL (e.g. http://pacs:8042/dicom-web)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=Path("cxrlabel-node"),
        help="received films, per-study labels and results, state.json, errors.csv",
    )  # fmt: skip
    p.add_argument(
        "--quiet-seconds", type=float, default=10.0, metavar="S",
        help="label a study once no film of it has arrived for S seconds",
    )  # fmt: skip
    p.add_argument(
        "--no-label-at-release", action="store_true",
        help="wait for the quiet time even after the sending association is released",
    )  # fmt: skip
    p.add_argument("--heatmaps", action="store_true", help="also heatmap secondary captures")
    p.add_argument(
        "--allow-ae", action="append", metavar="AET",
        help="accept associations only from this calling AE title (repeatable; default: any)",
    )  # fmt: skip
    p.add_argument(
        "--allow-peer", action="append", metavar="ADDR",
        help="accept associations only from this IP address or network (repeatable; default: "
        "any that can reach --host)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("export", help="export a model (ONNX with preprocessing and thresholds)")
    p.add_argument("model", nargs="+", help="run folders, RUN:bestK or checkpoint files")
    p.add_argument(
        "--onnx", nargs="?", const="", metavar="FILE",
        help="write ONNX (default FILE: RUN/model.onnx, RUN/model-bestK.onnx for RUN:bestK, "
        "or beside the checkpoint)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job on built-in synthetic data")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--also-label",
        type=Path,
        nargs="*",
        default=[DEMO_REAL_FILMS],
        help="folders of films the trained model also labels (default: the real fixtures "
        "in ../shared/data/fixtures when that folder exists)",
    )
    p.add_argument(
        "--real-data",
        type=lambda s: Path(s) if s else None,
        default=DEMO_REAL_FILMS.parent,
        help="a shared data folder with the Kermany films and Xception weights: adds a short "
        "real-film step (default ../shared/data when present; '' to skip)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from cxrlabel.data.images import ImageError
    from cxrlabel.data.labels import LabelError

    try:
        return args.func(args)
    except (LabelError, ImageError, FileNotFoundError, FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
