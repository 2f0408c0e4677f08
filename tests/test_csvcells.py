"""The spreadsheet-safe cell rule (cxrlabel.csvcells): formulas neutralised, numbers kept,
and the escape undone exactly."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrlabel.csvcells import neutralise, neutralise_frame, restore, restore_frame


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ("=cmd()+formula.jpg", "'=cmd()+formula.jpg"),
        ("+x", "'+x"),
        ("-x.png", "'-x.png"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("'=x", "''=x"),
        ("-1", "-1"),
        ("-1.0", "-1.0"),
        ("-0.5", "-0.5"),
        ("+3", "+3"),
        ("-1e-05", "-1e-05"),
        ("a=b", "a=b"),
        ("'quoted", "'quoted"),
        ("", ""),
    ],
)
def test_neutralise(cell: str, written: str) -> None:
    assert neutralise(cell) == written
    assert restore(written) == cell


def test_non_text_cells_are_unchanged() -> None:
    assert neutralise(-1.0) == -1.0 and neutralise(3) == 3 and neutralise(None) is None


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text())
def test_restore_inverts_neutralise_and_nothing_written_starts_like_a_formula(cell: str) -> None:
    written = neutralise(cell)
    assert restore(written) == cell
    if written.startswith(("=", "+", "-", "@", "\t", "\r")):
        float(written)  # only numbers may start so


def test_frames() -> None:
    frame = pd.DataFrame({"Path": ["=a.jpg", "b.jpg", "'-c"], "p": [-0.5, 0.1, 0.2]})
    written = neutralise_frame(frame)
    assert written["Path"].tolist() == ["'=a.jpg", "b.jpg", "''-c"]
    assert written["p"].tolist() == [-0.5, 0.1, 0.2]
    back = restore_frame(written.astype({"Path": str}))
    assert back["Path"].tolist() == frame["Path"].tolist()
