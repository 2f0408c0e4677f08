"""The main job on built-in data: synthesise a CheXpert-format dataset and describe it.

Later stages (train -> evaluate -> label) join here as they land. Everything is written under
one output folder; the returned text is what the `demo` command prints.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cxrlabel.cache import ResizeSettings, prepare_cache
from cxrlabel.fileio import atomic_write_text
from cxrlabel.formats import load_table
from cxrlabel.splits import patient_split, save_split
from cxrlabel.stats import label_stats
from cxrlabel.synth import contact_sheet, write_dataset

log = logging.getLogger(__name__)

BANNER = (
    "cxrlabel demo — the data below are SYNTHETIC radiographs drawn by cxrlabel's own\n"
    "generator, not patients. Real-data checks live in benchmarks/.\n"
)


def run_demo(out: Path, *, patients: int = 120, size: int = 128, seed: int = 0) -> str:
    """Run the demo into `out` and return the report text."""
    out = Path(out)
    data_dir = out / "data"
    write_dataset(data_dir, patients=patients, size=size, seed=seed)
    train = load_table(data_dir / "train.csv")
    valid = load_table(data_dir / "valid.csv")

    parts = [BANNER]
    for unit in ("study", "image"):
        stats = label_stats(train, unit=unit)
        parts.append(stats.to_text())
        atomic_write_text(out / "stats" / f"train_{unit}.md", stats.to_markdown())
        atomic_write_text(out / "stats" / f"train_{unit}.csv", stats.to_csv())
    parts.append(label_stats(valid, unit="study").to_text())

    split = patient_split(train, valid_fraction=0.2, seed=seed)
    save_split(split, out / "splits" / "train_valid.csv")
    fit, held_out = split.apply(train)
    parts.append(
        f"patient-level split of train.csv (seed {seed}): {len(split.train)} patients / "
        f"{len(fit)} images for training, {len(split.valid)} patients / {len(held_out)} images "
        f"for validation; no patient in both.\n"
    )

    cache = prepare_cache(
        train.image_paths(), out / "cache" / f"train-{size}", ResizeSettings(size)
    )
    parts.append(
        f"preprocessing cache: {len(cache)} images at {size} px in {cache.dir}, "
        f"{len(cache.skipped)} skipped\n"
    )

    sheet = out / "contact_sheet.png"
    contact_sheet(data_dir, sheet)
    parts.append(f"contact sheet of the synthetic films: {sheet}\n")
    report = "\n".join(parts)
    atomic_write_text(out / "report.txt", report)
    return report
