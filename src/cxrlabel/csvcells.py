"""Spreadsheet-safe CSV cells: the one rule every CSV the project writes follows.

A spreadsheet runs a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return as
a formula (CSV injection; OWASP). A film called `=cmd()+formula.jpg` would otherwise land in
labels.csv as a live formula. Every text cell that starts with one of those characters is
written with a single quote in front (`'=cmd()+formula.jpg`), which spreadsheets show as text.

Two exceptions keep the files usable as data:
- numbers stay numbers: `-1.0` (an uncertain label), `-0.5`, `+3`, `-1e-05` are written as
  they are (a number is not a formula);
- the escape is lossless: a text that already starts with quotes followed by one of those
  characters (`'=x`) gets one more quote, so `restore` (one quote off wherever quotes precede
  such a character) gives back exactly the original. The project's own readers of CSV text
  (label CSVs, splits, predictions) apply `restore`, so its outputs stay valid inputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

# Characters that make a spreadsheet treat the cell as a formula (OWASP CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_DANGER = "=+\\-@\t\r"
# A cell the escape applies to: any quotes, then a formula character.
_ESCAPABLE = re.compile(f"'*[{_DANGER}]", re.DOTALL)
# A written cell the escape was applied to: at least one quote, then a formula character.
_ESCAPED = re.compile(f"'+[{_DANGER}]", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def neutralise(value: Any) -> Any:
    """The cell as it is safe to write: text starting like a formula gets a leading `'`;
    numbers and non-text values are returned unchanged."""
    if not isinstance(value, str) or _NUMBER.fullmatch(value):
        return value
    return "'" + value if _ESCAPABLE.match(value) else value


def restore(text: str) -> str:
    """The original text of a cell written by `neutralise` (its exact inverse on text)."""
    # A written cell starting with a quote is never a number, so no number check is needed.
    return text[1:] if _ESCAPED.match(text) else text


def neutralise_row(row: Iterable[Any]) -> list[Any]:
    return [neutralise(cell) for cell in row]


def _text_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]


def neutralise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells (and column names) are safe to write with to_csv."""
    out = frame.copy()
    for column in _text_columns(out):
        out[column] = out[column].map(neutralise)
    out.columns = [neutralise(str(c)) if isinstance(c, str) else c for c in out.columns]
    return out


def restore_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`restore` over every text cell of a frame read with dtype=str (vectorised)."""
    out = frame.copy()
    for column in _text_columns(out):
        cells = out[column]
        escaped = cells.str.match(_ESCAPED.pattern, flags=re.DOTALL).fillna(False).astype(bool)
        if escaped.any():
            out[column] = cells.where(~escaped, cells.str[1:])
    out.columns = [restore(c) if isinstance(c, str) else c for c in out.columns]
    return out


def frame_csv(frame: pd.DataFrame, **to_csv: Any) -> str:
    """`frame.to_csv(**to_csv)` with every text cell neutralised: how the project writes a
    DataFrame as CSV."""
    return neutralise_frame(frame).to_csv(**to_csv)
