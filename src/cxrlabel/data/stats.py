"""Label statistics in the layout of the CheXpert paper's Table 1.

For each observation: positive, uncertain and negative counts with percentages. By study (the
paper's unit: CheXpert labels come from the study's report) a study counts once: positive if
any of its images is positive, else uncertain if any is uncertain, else negative. Negative is
everything that is neither positive nor uncertain, blanks included, as in the paper. Where a
dataset's blanks mean "unknown" (NIH never labels Fracture), they are counted in a separate
Unlabelled column instead, since calling them negative would be false.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrlabel.csvcells import frame_csv
from cxrlabel.data.labels import (
    POSITIVE,
    TABLE1_ORDER,
    UNCERTAIN,
    BlankMeaning,
    LabelTable,
    filter_view,
)

UNITS = ("study", "image")


@dataclass(frozen=True)
class LabelStats:
    """Counts per observation; `frame` has one row per observation in Table 1 order."""

    frame: pd.DataFrame
    unit: str
    view: str
    total: int
    source: str

    @property
    def has_unlabelled(self) -> bool:
        return bool(self.frame["Unlabelled"].sum())

    def _columns(self) -> list[str]:
        return ["Positive", "Uncertain", "Negative"] + (
            ["Unlabelled"] if self.has_unlabelled else []
        )

    def formatted(self) -> pd.DataFrame:
        """Cells like the paper's: '16627 (8.86)'."""
        out = pd.DataFrame({"Pathology": self.frame["Pathology"]})
        for column in self._columns():
            counts = self.frame[column]
            pct = self.frame[f"{column} %"]
            out[f"{column} (%)"] = [f"{c} ({p:.2f})" for c, p in zip(counts, pct, strict=True)]
        return out

    def title(self) -> str:
        unit = "studies" if self.unit == "study" else "images"
        return f"{self.source}: {self.total} {unit} ({self.view} views)"

    def to_markdown(self) -> str:
        table = self.formatted()
        header = "| " + " | ".join(table.columns) + " |"
        rule = "|" + "|".join(["---"] + ["---:"] * (len(table.columns) - 1)) + "|"
        rows = ["| " + " | ".join(map(str, r)) + " |" for r in table.itertuples(index=False)]
        return "\n".join([f"**{self.title()}**", "", header, rule, *rows, ""])

    def to_csv(self) -> str:
        columns = ["Pathology"]
        for c in self._columns():
            columns += [c, f"{c} %"]
        return frame_csv(self.frame[columns], index=False, float_format="%.2f")

    def to_text(self) -> str:
        """A plain terminal table with aligned columns."""
        table = self.formatted()
        widths = [max(len(str(v)) for v in [c, *table[c]]) for c in table.columns]
        lines = [self.title()]
        cells = [list(table.columns), *table.astype(str).to_numpy().tolist()]
        for i, row in enumerate(cells):
            pairs = zip(row[1:], widths[1:], strict=True)
            just = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in pairs]
            lines.append("  ".join(just))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines) + "\n"


def study_values(table: LabelTable, labels: tuple[str, ...] = TABLE1_ORDER) -> np.ndarray:
    """One row per study: positive beats uncertain beats negative beats blank."""
    values = table.values(labels)
    # Rank so that a max over a study's images gives the study label.
    rank = np.select(
        [values == POSITIVE, values == UNCERTAIN, ~np.isnan(values)], [3.0, 2.0, 1.0], 0.0
    )
    ranked = pd.DataFrame(rank).groupby(table.frame["study_id"].to_numpy()).max().to_numpy()
    lookup = np.array([np.nan, 0.0, UNCERTAIN, POSITIVE])
    return lookup[ranked.astype(int)]


def label_stats(table: LabelTable, unit: str = "study", view: str = "all") -> LabelStats:
    """Positive / uncertain / negative counts per observation, per study or per image."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, not {unit!r}")
    table = filter_view(table, view)
    values = study_values(table) if unit == "study" else table.values(TABLE1_ORDER)
    total = len(values)
    positive = (values == POSITIVE).sum(axis=0)
    uncertain = (values == UNCERTAIN).sum(axis=0)
    if table.blank is BlankMeaning.UNKNOWN:
        unlabelled = np.isnan(values).sum(axis=0)
    else:
        unlabelled = np.zeros(len(TABLE1_ORDER), dtype=int)
    negative = total - positive - uncertain - unlabelled
    frame = pd.DataFrame({"Pathology": TABLE1_ORDER})
    for name, counts in (
        ("Positive", positive),
        ("Uncertain", uncertain),
        ("Negative", negative),
        ("Unlabelled", unlabelled),
    ):
        frame[name] = counts.astype(int)
        frame[f"{name} %"] = np.round(100.0 * counts / total, 2) if total else 0.0
    return LabelStats(frame=frame, unit=unit, view=view, total=total, source=table.source)
