"""Small helpers shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

from pathlib import Path

from cxrlabel.labels import OBSERVATIONS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]


def chexpert_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write a CheXpert-format CSV; rows give Path/metadata and any observations (rest blank)."""
    lines = [",".join(CHEXPERT_HEADER)]
    for row in rows:
        lines.append(",".join(str(row.get(c, "")) for c in CHEXPERT_HEADER))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
