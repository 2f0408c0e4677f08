"""Contact sheet of a synthetic (or any CheXpert-layout) dataset: captioned example films."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageFont

from cxrlabel.data.csvfiles import check_path
from cxrlabel.data.labels import OBSERVATIONS, POSITIVE, UNCERTAIN
from cxrlabel.data.pictures import SheetStyle, encode_png, render_sheet
from cxrlabel.fileio import atomic_write_bytes

# Short names so captions fit under a tile; uncertain labels get a trailing "?".
_SHORT = {
    "Enlarged Cardiomediastinum": "Enl. Cardiomed.",
    "Lung Opacity": "Opacity",
    "Lung Lesion": "Lesion",
    "Pleural Effusion": "Effusion",
    "Support Devices": "Devices",
}
_CAPTION_LINES = 4


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_text(value: Any) -> str:
    """CSV cell as text; blank for missing (None, NaN from pandas, "" from csv)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def caption_text(row: Mapping[str, Any]) -> str:
    """Labels of a CSV row for a caption: positives, then uncertain ones marked with "?"."""
    positive = [o for o in OBSERVATIONS if _as_float(row.get(o)) == POSITIVE]
    uncertain = [o for o in OBSERVATIONS if _as_float(row.get(o)) == UNCERTAIN]
    parts = [_SHORT.get(o, o) for o in positive] + [_SHORT.get(o, o) + "?" for o in uncertain]
    return ", ".join(parts) if parts else "(no positive labels)"


def caption_height(font_size: int = 14, lines: int = _CAPTION_LINES) -> int:
    """Height in pixels of the caption band under each contact-sheet tile."""
    return 6 + lines * (font_size + 3)


def _caption_lines(row: Mapping[str, Any], rel: str, font: Any, tile: int) -> list[str]:
    """Patient/study and view, then the labels wrapped to the tile; "..." when cut short."""
    parts = rel.split("/")
    where = "/".join(parts[1:3]) if len(parts) > 3 else rel
    view = _as_text(row.get("AP/PA")) or _as_text(row.get("Frontal/Lateral"))
    head = f"{where} {view}".strip()
    lines = [head, *_wrap(caption_text(row), font, tile - 8)]
    if len(lines) > _CAPTION_LINES:
        lines = [*lines[: _CAPTION_LINES - 1], lines[_CAPTION_LINES - 1] + " ..."]
    return lines


def _wrap(text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        trial = f"{current} {word}".strip()
        if font.getlength(trial, mode="L") <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def _read_rows(source: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name in ("train.csv", "valid.csv"):
        path = source / name
        if path.exists():
            with path.open(newline="", encoding="utf-8") as fh:
                rows.extend(csv.DictReader(fh))
    if not rows:
        raise FileNotFoundError(f"no train.csv/valid.csv with rows in {source}")
    return rows


def _patient_of(row: Mapping[str, Any]) -> str:
    parts = _as_text(row.get("Path")).split("/")
    return parts[1] if len(parts) > 1 else ""


def _pick_rows(rows: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """Deterministic, varied pick: every observation shown when possible, one film per patient
    first (several studies of one patient look alike), then fill up in file order."""
    chosen: list[int] = []
    patients: set[str] = set()
    shown: set[str] = set()

    def take(i: int) -> None:
        chosen.append(i)
        patients.add(_patient_of(rows[i]))
        shown.update(o for o in OBSERVATIONS if _as_float(rows[i].get(o)) == POSITIVE)

    # Rarest observations first, so common ones do not use up the slots.
    counts = {o: sum(_as_float(r.get(o)) == POSITIVE for r in rows) for o in OBSERVATIONS}
    for name in sorted(OBSERVATIONS, key=lambda o: counts[o]):
        if len(chosen) >= n or name in shown or counts[name] == 0:
            continue
        for i, row in enumerate(rows):
            if _as_float(row.get(name)) == POSITIVE and _patient_of(row) not in patients:
                take(i)
                break
    # Show a lateral film too when there is one.
    laterals = [i for i, r in enumerate(rows) if _as_text(r.get("Frontal/Lateral")) == "Lateral"]
    if laterals and len(chosen) < n and not any(i in laterals for i in chosen):
        take(laterals[0])
    for new_patient_only in (True, False):
        for i, row in enumerate(rows):
            if len(chosen) >= n:
                break
            if i not in chosen and not (new_patient_only and _patient_of(row) in patients):
                take(i)
    return [rows[i] for i in chosen[:n]]


def contact_sheet(
    source: Path | Sequence[Mapping[str, Any]],
    out_png: Path,
    n: int = 16,
    *,
    root: Path | None = None,
    columns: int = 4,
    tile: int = 256,
    font_size: int = 14,
) -> Path:
    """Write one PNG grid of example films captioned with their labels, for people to look at.

    ``source`` is a dataset directory (its train.csv and valid.csv are read) or CSV-like rows
    (mappings with "Path" and the observation columns; ``root`` is then the directory the paths
    are relative to). Each caption shows the patient/study/view and the positive labels, then the
    uncertain ones marked "?". The sheet is ``columns * tile`` wide and
    ``ceil(n / columns) * (tile + caption_height(font_size))`` high.
    """
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        rows: Sequence[Mapping[str, Any]] = _read_rows(root)
    else:
        rows = list(source)
        if root is None:
            raise ValueError("root (the dataset directory) is required when rows are given")
    if n < 1 or not rows:
        raise ValueError("need at least one row and n >= 1")
    picked = _pick_rows(rows, n)
    font = ImageFont.load_default(size=font_size)
    films, captions = [], []
    for row in picked:
        rel = _as_text(row["Path"])
        # The rule of every label-CSV reader: no path outside the dataset folder.
        film = check_path(Path(root), rel, source=Path(root), line=None, allow_outside=False)
        with Image.open(film) as im:
            films.append(im.convert("L").resize((tile, tile), Image.Resampling.LANCZOS))
        captions.append(_caption_lines(row, rel, font, tile))
    style = SheetStyle(
        mode="L",
        background=255,
        caption_height=caption_height(font_size),
        caption_at=(4, 3),
        line_height=font_size + 3,
        head_fill=100,
        fill=0,
        font=font,
        outline=170,
    )
    sheet = render_sheet(films, captions, tile=tile, columns=columns, style=style)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_png, encode_png(sheet))
    return out_png
